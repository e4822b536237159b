"""Throughput of `kd.convert` vs the same KD step written by hand, side by side in one process.

    python benchmarks/engine_overhead.py [--device cpu|cuda] [--variants fp32,tf32,bf16]
                                         [--steps 15] [--repeats 10] [--batch 256] [--mem-steps 5]

Both loops train the same student against the same teacher with the same loss in every variant
(0.3·CE + 0.5·T²·KL at T=4 + 0.2·FeatureMSE on an intermediate pair through a learned adapter).

How it is kept fair:
  * the hand-written loop has its own teacher, deep-copied *before* `kd.convert` hooks the
    engine's, so it does not pay for the engine's capture hooks;
  * the hand loop registers its two feature hooks once, not every step;
  * time is measured over blocks of `--steps` steps between two syncs (throughput, not per-step
    latency); engine and hand blocks alternate and the order flips every repeat so load drift
    hits both alike; the result is the median over blocks of the per-step time, and the ratio
    engine / hand of those medians;
  * precision variants: fp32; tf32 (CUDA only: TF32 matmul/cuDNN, restored afterwards); bf16
    (`torch.autocast` with bfloat16 around forward + loss, on CPU too);
  * peak memory per variant in its own phase: on CUDA, `reset_peak_memory_stats()`, then
    `--mem-steps` steps of one loop only, then `max_memory_allocated()` (both setups stay resident,
    so the peaks include ~the other loop's weights; `resident_mib` is that baseline). On CPU there
    is no allocator peak counter: the fields are null and `peak_mem_note` says so.

Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL

T = 4.0
W_CE, W_KL, W_MSE = 0.3, 0.5, 0.2
MiB = 2**20


def mlp(width: int, depth: int, d_in: int = 256, classes: int = 100) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class HandKD:
    """The KD step written by hand: own teacher copy, feature hooks registered once."""

    def __init__(self, student: nn.Sequential, teacher: nn.Sequential, adapter: nn.Module) -> None:
        self.student, self.teacher, self.adapter = student, teacher, adapter
        self.opt = torch.optim.AdamW([*student.parameters(), *adapter.parameters()], lr=1e-3)
        self.feats: dict[str, torch.Tensor] = {}
        student[1].register_forward_hook(lambda m, i, o: self.feats.__setitem__("s", o))
        teacher[1].register_forward_hook(lambda m, i, o: self.feats.__setitem__("t", o))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        ce = F.cross_entropy(s_logits, y)
        kl = F.kl_div(
            F.log_softmax(s_logits.float() / T, -1),
            F.log_softmax(t_logits.float() / T, -1),
            reduction="batchmean",
            log_target=True,
        )
        mse = F.mse_loss(self.adapter(self.feats.pop("s")), self.feats.pop("t"))
        return W_CE * ce + W_KL * T * T * kl + W_MSE * mse


class EngineKD:
    def __init__(self, dm: kd.DistillationModel) -> None:
        self.dm = dm
        self.opt = torch.optim.AdamW(dm.parameters(), lr=1e-3)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.dm(x)
        loss = self.dm.compute_kd_loss(student_loss=F.cross_entropy(logits, y))
        assert isinstance(loss, torch.Tensor)
        return loss


def run_block(
    runners: dict[str, HandKD | EngineKD],
    cpu_times: dict[str, list[float]],
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    sync: Callable[[], None],
    name: str,
    n: int,
) -> float:
    """n steps of one loop between two syncs; wall ms per step (CPU ms appended to cpu_times)."""
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        train_step(runners[name], x, y, autocast)
    sync()
    cpu_times[name].append((time.process_time() - start_cpu) / n * 1000)
    return (time.perf_counter() - start) / n * 1000


def train_step(
    runner: HandKD | EngineKD, x, y, autocast: Callable[[], contextlib.AbstractContextManager]
) -> None:
    with autocast():
        loss = runner.loss(x, y)
    runner.opt.zero_grad(set_to_none=True)
    loss.backward()
    runner.opt.step()


@contextlib.contextmanager
def precision(
    variant: str, device: torch.device
) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Global settings for the variant (restored on exit); yields the per-step autocast context."""
    if variant == "tf32":
        saved = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        try:
            yield contextlib.nullcontext
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
            torch.set_float32_matmul_precision(saved[2])
    elif variant == "bf16":
        yield lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        yield contextlib.nullcontext


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def supported_variants(device: torch.device) -> list[str]:
    return ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of fp32,tf32,bf16 (default: all the device supports; tf32 is CUDA only)",
    )
    parser.add_argument("--steps", type=int, default=15, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=10, help="timed blocks per loop and variant")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--mem-steps", type=int, default=5, help="steps of the peak-memory phase (CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop and variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    supported = supported_variants(device)
    variants = args.variants.split(",") if args.variants else supported
    for v in variants:
        if v not in supported:
            parser.error(
                f"--variants: {v!r} is not available on {device.type} (choose from {supported})"
            )

    torch.manual_seed(0)
    teacher = mlp(1024, 4).to(device).eval().requires_grad_(False)
    student0 = mlp(256, 2).to(device)
    x = torch.randn(args.batch, 256, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)

    hand_teacher = copy.deepcopy(teacher)  # before kd.convert hooks `teacher`
    dm = kd.convert(
        copy.deepcopy(student0),
        teacher=teacher,
        criterion={("", ""): LogitsKL(temperature=T), ("1", "1"): FeatureMSE()},
        balancer=kd.StaticBalancer([W_KL, W_MSE]),
        example_input=x[:2],
    )
    engine_adapter = [p for n, p in dm.named_parameters() if n.endswith("adapter.weight")]
    adapter = nn.Linear(256, 1024, bias=False).to(device)
    if len(engine_adapter) == 1:  # same start as the engine's, so the two losses can be compared
        with torch.no_grad():
            adapter.weight.copy_(engine_adapter[0])
    runners: dict[str, HandKD | EngineKD] = {
        "hand": HandKD(copy.deepcopy(student0), hand_teacher, adapter),
        "engine": EngineKD(dm),
    }

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def clear_grads() -> None:
        for r in runners.values():
            r.opt.zero_grad(set_to_none=True)

    for variant in variants:
        with precision(variant, device) as autocast:
            cpu_times: dict[str, list[float]] = {name: [] for name in runners}
            block = functools.partial(run_block, runners, cpu_times, x, y, autocast, sync)

            # same loss: both runners have taken the same steps from the same start, so their
            # losses at the start of each variant agree (exactly at the first one)
            with torch.no_grad(), autocast():
                loss0 = {name: float(r.loss(x, y)) for name, r in runners.items()}
            for name in runners:
                block(name, args.warmup)
                cpu_times[name].clear()
            times: dict[str, list[float]] = {name: [] for name in runners}
            for repeat in range(args.repeats):
                order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
                for name in order:
                    times[name].append(block(name, args.steps))

            peak: dict[str, float | None] = {name: None for name in runners}
            resident = None
            if cuda:
                for name in runners:
                    clear_grads()
                    sync()
                    resident = torch.cuda.memory_allocated(device) / MiB
                    torch.cuda.reset_peak_memory_stats(device)
                    block(name, args.mem_steps)
                    peak[name] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
            clear_grads()

        hand, engine = statistics.median(times["hand"]), statistics.median(times["engine"])
        result = {
            "benchmark": "engine_overhead",
            "variant": variant,
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "steps": args.steps,
            "repeats": args.repeats,
            "hand_ms": round(hand, 3),
            "engine_ms": round(engine, 3),
            "ratio": round(engine / hand, 3),
            # median over repeats of engine block / the hand block next to it in time
            "ratio_paired_median": round(
                statistics.median(
                    e / h for e, h in zip(times["engine"], times["hand"], strict=True)
                ),
                3,
            ),
            # best block of each: the least disturbed by other load on a shared machine
            "hand_min_ms": round(min(times["hand"]), 3),
            "engine_min_ms": round(min(times["engine"]), 3),
            "ratio_min": round(min(times["engine"]) / min(times["hand"]), 3),
            # process CPU time per step (all threads): on a shared CPU less hit by other load
            "hand_cpu_ms": round(statistics.median(cpu_times["hand"][: args.repeats]), 3),
            "engine_cpu_ms": round(statistics.median(cpu_times["engine"][: args.repeats]), 3),
            "hand_ms_blocks": [round(t, 2) for t in times["hand"]],
            "engine_ms_blocks": [round(t, 2) for t in times["engine"]],
            "peak_mem_hand_mib": peak["hand"],
            "peak_mem_engine_mib": peak["engine"],
            "resident_mib": None if resident is None else round(resident, 1),
            "peak_mem_note": (
                f"torch.cuda.max_memory_allocated over {args.mem_steps} steps of one loop"
                if cuda
                else "null: not measured on CPU (no allocator peak counter)"
            ),
            "loss_at_start_hand": round(loss0["hand"], 6),
            "loss_at_start_engine": round(loss0["engine"], 6),
            "loadavg_1m": round(os.getloadavg()[0], 2),  # other load on the machine at the end
            "date": datetime.date.today().isoformat(),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
