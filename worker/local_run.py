"""`kdlab train CONFIG`: run one config on this machine, with no server.

Everything lands in `<out_root>/<config.name>/`: `config.json`, `metrics.jsonl`, `metadata.json`,
`latest.pt`, `best.safetensors`, `student.safetensors`. A distill config names its teacher as
`teacher.weights.path` (a file, relative to the current directory) or `teacher.weights.run_id`:
the `name` of an earlier `kdlab train` run under the same `out_root` (`checkpoint: best` →
its `best.safetensors`, `latest` → its final `student.safetensors`, or the weights in its
`latest.pt` while it has not finished). Ctrl-C (or SIGTERM) writes `latest.pt` and stops;
`--resume` continues from it exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdlab.worker.config import load_run_config
from kdlab.worker.console_sink import ConsoleSink
from kdlab.worker.echo import Echo, print_line
from kdlab.worker.names import LATEST_FILE, METADATA_FILE, METRICS_FILE, STUDENT_FILE
from kdlab.worker.pipeline import TrainingPipeline
from kdlab.worker.stop_signals import StopFlag, stop_on_signals
from kdlab.worker.teacher_weights import load_teacher_state, teacher_weights_file
from kdlab.worker.trainer import TrainResult

__all__ = [  # `kdlab train`'s pieces, importable from here as before
    "ConsoleSink",
    "StopFlag",
    "TrainResult",
    "load_teacher_state",
    "run_local",
    "stop_on_signals",
    "teacher_weights_file",
]


def _prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The `latest.pt` to resume from, if any; refuses to overwrite a run without --resume."""
    latest = out_dir / LATEST_FILE
    if resume and latest.is_file():
        return latest
    if not resume and (latest.exists() or (out_dir / STUDENT_FILE).exists()):
        raise ValueError(
            f"{out_dir} already holds run {out_dir.name!r}; pass --resume to continue it, or "
            "pick another --out or config name"
        )
    for stale in (METRICS_FILE, METADATA_FILE):  # a run that died before its first save
        (out_dir / stale).unlink(missing_ok=True)
    return None


def run_local(
    config_path: str | os.PathLike,
    out_root: str | os.PathLike = "runs",
    *,
    resume: bool = False,
    device: str | None = None,
    data_root: Path | None = None,
    echo: Echo = print_line,
) -> TrainResult:
    """Train (or distil) one config into `<out_root>/<name>/` and return the result."""
    config = load_run_config(Path(config_path))
    out_root = Path(out_root)
    out_dir = out_root / config.name
    resume_from = _prepare_out_dir(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")

    flag = StopFlag()
    pipeline = TrainingPipeline(config, out_dir, echo)
    try:
        trainer = pipeline.build(
            lambda: teacher_weights_file(config, out_root),
            device=device,
            data_root=data_root,
            should_stop=flag,
            resume_from=resume_from,
        )
        if resume_from is not None:
            echo(f"resuming from {resume_from}")
        with stop_on_signals(flag, echo):
            result = trainer.fit()
    finally:
        pipeline.close()
    if result.stopped:
        echo(f"stopped at step {result.global_step}; continue with --resume ({result.latest_path})")
    else:
        echo(f"done: {result.student_path}")
    return result
