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

import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker import catalog, kd
from worker.checkpoint import BEST, LATEST
from worker.config import RunConfig, load_run_config
from worker.metrics import JsonlSink, MultiSink
from worker.trainer import STUDENT_FILE, Trainer, TrainResult

Echo = Callable[[str], None]


def _echo(line: str) -> None:
    print(line, flush=True)


class ConsoleSink:
    """Prints one progress line per logging interval and per evaluation."""

    def __init__(self, echo: Echo = _echo):
        self.echo = echo
        self.steps_per_epoch = 0
        self.total_steps = 0

    def log_metadata(self, meta: dict[str, Any]) -> None:
        self.steps_per_epoch = int(meta.get("steps_per_epoch", self.steps_per_epoch))
        self.total_steps = int(meta.get("total_steps", self.total_steps))
        if "loss" in meta:
            self.echo(f"loss: {meta['loss']['formula']}")

    def _where(self, step: int) -> str:
        if step == 0:
            return "before training"
        epoch = math.ceil(step / self.steps_per_epoch) if self.steps_per_epoch else 0
        return f"epoch {epoch} step {step}/{self.total_steps}"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss_total" in metrics:
            parts = [
                f"{k.removeprefix('train/')} {v:.4f}"
                for k, v in metrics.items()
                if k.startswith("train/") and k not in ("train/lr", "train/grad_norm")
            ]
            parts.append(f"lr {metrics['train/lr']:.2e}")
            if "train/grad_norm" in metrics:
                parts.append(f"grad_norm {metrics['train/grad_norm']:.3f}")
            parts.append(f"{metrics.get('sys/step_time_ms', 0.0):.2f} ms/step")
            self.echo(f"{self._where(step)} | " + " | ".join(parts))
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            parts = [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in evals.items()]
            self.echo(f"{self._where(step)} | eval | " + " | ".join(parts))

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- teacher weights


def teacher_weights_file(config: RunConfig, out_root: Path) -> Path | None:
    """The file holding the teacher's weights (None when the config gives none)."""
    assert config.teacher is not None
    weights = config.teacher.weights
    if weights is None:
        return None
    if weights.upload_id is not None:
        raise ValueError(
            "teacher.weights.upload_id: uploads live on the KD Lab server; for `kdlab train` "
            "give teacher.weights.path (a file) or run_id (a run under --out)"
        )
    if weights.path is not None:
        path = Path(weights.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher.weights.path: no file {path.resolve()}")
        return path
    assert weights.run_id is not None
    run_dir = out_root / weights.run_id
    candidates = (
        [run_dir / BEST]
        if weights.checkpoint == "best"
        else [
            run_dir / STUDENT_FILE,
            run_dir / LATEST,
        ]
    )
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"teacher.weights.run_id {weights.run_id!r}: no {weights.checkpoint} weights in "
        f"{run_dir} (looked for {', '.join(p.name for p in candidates)}); train it first with "
        f"`kdlab train <its config> --out {out_root}`"
    )


def load_teacher_state(
    config: RunConfig, path: Path, info: catalog.DataInfo
) -> dict[str, torch.Tensor]:
    """Load `path` into a fresh catalog teacher (checks class and keys); its state dict.

    `path`: a `kd.save` safetensors file, a plain safetensors state dict (an upload), or a
    run's `latest.pt` (its model entry, loss adapters dropped)."""
    assert config.teacher is not None
    teacher = catalog.build_model(config.teacher, info)
    if path.suffix == ".pt":  # an unfinished run's latest.pt: the model entry, adapters dropped
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        prefix = kd.DistillationModel.KD_PREFIX
        _load_strict(teacher, {k: v for k, v in state.items() if not k.startswith(prefix)}, path)
        return teacher.state_dict()
    if not _has_kdlab_metadata(path):  # a plain safetensors state dict (e.g. an upload)
        from safetensors.torch import load_file

        _load_strict(teacher, load_file(str(path)), path)
        return teacher.state_dict()
    try:
        kd.restore(teacher, path)
    except TypeError as err:  # another model class
        raise ValueError(f"teacher.weights: {err}") from None
    return teacher.state_dict()


def _has_kdlab_metadata(path: Path) -> bool:
    """Whether a safetensors file carries KD Lab's header metadata (written by `kd.save`)."""
    from safetensors import safe_open

    from worker.kd.serialization import METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        return METADATA_KEY in (handle.metadata() or {})


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"teacher.weights: {path} does not fit the teacher model: {err}") from None


# --------------------------------------------------------------------------- stop on a signal


class StopFlag:
    """`should_stop` for the trainer, set by the first Ctrl-C / SIGTERM."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, step: int) -> bool:
        return self.requested


@contextmanager
def stop_on_signals(flag: StopFlag, echo: Echo) -> Iterator[None]:
    """SIGINT/SIGTERM ask the trainer to checkpoint and stop; a second SIGINT interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        echo(f"received {signal.Signals(signum).name}: writing latest.pt and stopping")
        flag.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the run


def _prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The `latest.pt` to resume from, if any; refuses to overwrite a run without --resume."""
    latest = out_dir / LATEST
    if resume and latest.is_file():
        return latest
    if not resume and (latest.exists() or (out_dir / STUDENT_FILE).exists()):
        raise ValueError(
            f"{out_dir} already holds run {out_dir.name!r}; pass --resume to continue it, or "
            "pick another --out or config name"
        )
    for stale in ("metrics.jsonl", "metadata.json"):  # a run that died before its first save
        (out_dir / stale).unlink(missing_ok=True)
    return None


def run_local(
    config_path: str | os.PathLike,
    out_root: str | os.PathLike = "runs",
    *,
    resume: bool = False,
    device: str | None = None,
    data_root: Path | None = None,
    echo: Echo = _echo,
) -> TrainResult:
    """Train (or distil) one config into `<out_root>/<name>/` and return the result."""
    config = load_run_config(Path(config_path))
    out_root = Path(out_root)
    out_dir = out_root / config.name
    resume_from = _prepare_out_dir(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")

    data = catalog.build_dataset(config.dataset, config.seed, data_root)
    teacher_state = None
    if config.kind == "distill":
        weights = teacher_weights_file(config, out_root)
        if weights is not None:
            echo(f"teacher weights: {weights}")
            teacher_state = load_teacher_state(config, weights, data.info)
    if resume_from is not None:
        echo(f"resuming from {resume_from}")

    sink = MultiSink(JsonlSink(out_dir / "metrics.jsonl"), ConsoleSink(echo))
    flag = StopFlag()
    trainer = Trainer(
        config,
        out_dir,
        sink,
        teacher_state,
        device,
        data=data,
        data_root=data_root,
        should_stop=flag,
        resume_from=resume_from,
    )
    try:
        with stop_on_signals(flag, echo):
            result = trainer.fit()
    finally:
        sink.close()
    if result.stopped:
        echo(f"stopped at step {result.global_step}; continue with --resume ({result.latest_path})")
    else:
        echo(f"done: {result.student_path}")
    return result
