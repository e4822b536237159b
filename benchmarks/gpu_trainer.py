"""The Trainer on one GPU: step time and peak memory per precision, the cost of
`train.deterministic`, and how far a resumed run drifts from an uninterrupted one without it.

    python benchmarks/gpu_trainer.py [--device cuda] [--steps 60] [--quick]

Workload: GPT-2 logits KD on a synthetic LM (vocab 8,192, 256 tokens, batch 32); teacher 6×768,
student 2×256, both built from configs (random weights, so `allow_weak_teacher`). Every variant
trains the same steps from the same seed in this one process, one after the other. Step time is
the median of the trainer's own `sys/step_time_ms` over the logging intervals after the first
(warm-up); peak memory the largest `sys/gpu_mem_gib`. Prints one JSON line per variant, then
one per resume check. `--quick` shrinks the workload (a smoke run on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kdlab.worker import catalog
from kdlab.worker.config import RunConfig
from kdlab.worker.trainer import Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "none", "tf32": False},
    "tf32 (default)": {"amp": "none"},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "bf16 deterministic": {"amp": "bf16", "deterministic": True},
}


def config(steps: int, quick: bool, **train: Any) -> RunConfig:
    vocab, seq, width = (512, 64, 128) if quick else (8192, 256, 768)
    return RunConfig.model_validate(
        {
            "name": "gpu-bench",
            "kind": "distill",
            "seed": 0,
            "dataset": {
                "name": "synthetic_lm",
                "params": {"n_sequences": 2048, "seq_len": seq, "vocab_size": vocab},
            },
            "student": {"name": "gpt2", "params": {"n_layer": 2, "n_head": 4, "n_embd": 256}},
            "teacher": {
                "name": "gpt2",
                "params": {"n_layer": 2 if quick else 6, "n_head": 8, "n_embd": width},
            },
            "distill": {
                "pairs": [
                    {
                        "student_layer": "",
                        "teacher_layer": "",
                        "loss": {"name": "logits_kl", "params": {"temperature": 1.0}},
                    }
                ],
                "balancer": {"name": "static", "params": {"kd_weight": 0.5}},
                "allow_weak_teacher": True,
            },
            "train": {
                "epochs": 100,
                "max_steps": steps,
                "batch_size": 32,
                "log_every": 10,
                "eval_every_epochs": 100,
                "optimizer": {"name": "adamw", "lr": 3e-4},
                **train,
            },
        }
    )


class Capture:
    """A metric sink that keeps every point."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.points.setdefault(key, []).append((step, value))

    def log_metadata(self, metadata: dict[str, Any]) -> None:
        pass

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.points.get(key, [])]


def run(
    cfg: RunConfig, out: Path, data: Any, device: str, **kwargs: Any
) -> tuple[Trainer, Capture]:
    sink = Capture()
    trainer = Trainer(cfg, out, sink, None, device, data=data, **kwargs)
    trainer.fit()
    return trainer, sink


def variant_line(name: str, sink: Capture, cfg: RunConfig, device_name: str) -> dict[str, Any]:
    step_ms = sink.values("sys/step_time_ms")[1:]  # the first interval warms up
    tokens = cfg.train.batch_size * cfg.dataset.params["seq_len"]
    median = statistics.median(step_ms)
    return {
        "benchmark": "gpu_trainer",
        "variant": name,
        "device": device_name,
        "torch": torch.__version__,
        "step_ms": round(median, 3),
        "tokens_per_s": round(tokens / median * 1000),
        "peak_mem_gib": round(max(sink.values("sys/gpu_mem_gib") or [0.0]), 3),
        "teacher_time_share": round(statistics.median(sink.values("sys/teacher_time_share")), 3),
        "final_loss": round(sink.values("train/loss_total")[-1], 5),
    }


def resume_drift(
    base: RunConfig, data: Any, device: str, root: Path, deterministic: bool
) -> dict[str, Any]:
    """Train N steps straight, and N/2 + resume + N/2: how far apart are the weights?"""
    cfg = base.model_copy(
        update={"train": base.train.model_copy(update={"deterministic": deterministic})}
    )
    steps = cfg.train.max_steps or 0
    whole, _ = run(cfg, root / f"whole-{deterministic}", data, device)
    split = root / f"split-{deterministic}"
    run(cfg, split, data, device, should_stop=lambda step: step == steps // 2)
    resumed, _ = run(cfg, split, data, device, resume_from=split / "latest.pt")
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    diffs = [
        float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()
    ]
    return {
        "benchmark": "gpu_trainer_resume",
        "deterministic": deterministic,
        "amp": cfg.train.amp,
        "steps": steps,
        "max_abs_weight_diff": max(diffs),
        "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
    }


def report(name: str, measure: Callable[[], dict[str, Any]]) -> None:
    """One JSON line: the measurement, or the error that stopped it (the next one still runs)."""
    try:
        line = measure()
    except Exception as err:  # a failed variant is a result too
        line = {
            "benchmark": "gpu_trainer",
            "variant": name,
            "error": f"{type(err).__name__}: {err}",
        }
    print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="a small workload (CPU smoke run)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = config(args.steps, args.quick)
    data = catalog.build_dataset(base.dataset, base.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.variants.split(","):
            cfg = config(args.steps, args.quick, **VARIANTS[name])

            def measure(cfg: RunConfig = cfg, name: str = name) -> dict[str, Any]:
                _, sink = run(cfg, root / name.replace(" ", "-"), data, args.device)
                return variant_line(name, sink, cfg, device_name)

            report(name, measure)
        resume_base = config(
            args.steps, args.quick, amp="bf16" if device.type == "cuda" else "none"
        )
        for deterministic in (False, True):
            report(
                f"resume, deterministic={deterministic}",
                partial(resume_drift, resume_base, data, args.device, root, deterministic),
            )


if __name__ == "__main__":
    main()
