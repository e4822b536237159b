"""Step time of `kd.convert` vs the same KD step written by hand, side by side in one process.

    python benchmarks/engine_overhead.py [--device cpu|cuda] [--steps 50] [--repeats 5]

Both loops train the same student against the same teacher with the same loss
(0.3·CE + 0.7·T²·KL at T=4, plus an intermediate FeatureMSE pair); rounds alternate step by step so drift
(thermal, other load) hits both equally. Prints one JSON line with the median step times and
their ratio (engine / hand-written).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from worker import kd
from worker.kd.losses import FeatureMSE, LogitsKL


def mlp(width: int, depth: int, d_in: int = 256, classes: int = 100) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def hand_written_step(student, teacher, adapter, opt, x, y):
    feats = {}
    h_s = student[1].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    h_t = teacher[1].register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x)
    h_s.remove()
    h_t.remove()
    ce = F.cross_entropy(s_logits, y)
    kl = (
        F.kl_div(
            F.log_softmax(s_logits / 4, -1),
            F.log_softmax(t_logits / 4, -1),
            reduction="batchmean",
            log_target=True,
        )
        * 16
    )
    mse = F.mse_loss(adapter(feats["s"]), feats["t"])
    loss = 0.3 * ce + 0.5 * kl + 0.2 * mse
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def engine_step(dm, opt, x, y):
    logits = dm(x)
    loss = dm.compute_kd_loss(student_loss=F.cross_entropy(logits, y))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(step, steps: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = mlp(1024, 4).to(device).eval().requires_grad_(False)
    student0 = mlp(256, 2).to(device)
    x = torch.randn(args.batch, 256, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)

    student_a = copy.deepcopy(student0)
    adapter = nn.Linear(256, 1024, bias=False).to(device)
    opt_a = torch.optim.AdamW([*student_a.parameters(), *adapter.parameters()], lr=1e-3)

    dm = kd.convert(
        copy.deepcopy(student0),
        teacher=teacher,
        criterion={("", ""): LogitsKL(temperature=4.0), ("1", "1"): FeatureMSE()},
        balancer=kd.StaticBalancer([0.5, 0.2]),
        example_input=x[:2],
    )
    opt_b = torch.optim.AdamW(dm.parameters(), lr=1e-3)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {
        "hand": lambda: hand_written_step(student_a, teacher, adapter, opt_a, x, y),
        "engine": lambda: engine_step(dm, opt_b, x, y),
    }
    for step in steps.values():
        timed(step, 5, sync)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        # alternate step by step (and flip the order each repeat) so load drift hits both alike
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for _ in range(args.steps):
            for name in order:
                times[name].append(timed(steps[name], 1, sync))
    hand, engine = times["hand"], times["engine"]
    result = {
        "benchmark": "engine_overhead",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "hand_ms": round(statistics.median(hand), 3),
        "engine_ms": round(statistics.median(engine), 3),
        "ratio": round(statistics.median(engine) / statistics.median(hand), 3),
        "steps_timed": len(engine),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
