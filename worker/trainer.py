"""The training loop behind every run: supervised (`kind: train`) or distillation (`kind: distill`).

Read top to bottom: `Trainer.fit` → `_setup` (data, models, `kd.convert`, optimizer, resume) →
`_train_epoch` → `_step` → `_log_train` → `_evaluate` → `_finish` (export, save, re-check).

Conventions:
- steps count optimizer steps; metrics of step N are logged with `step=N` (1-based), the teacher's
  pre-training evaluation with `step=0`;
- train metrics are means over the logging interval, accumulated as detached tensors on the device
  and read back once per interval (no host sync per step);
- data order in epoch e is `randperm(n, generator=manual_seed(seed + e))`, so a resume at
  (epoch, batch index) needs no replay and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker import catalog, kd
from kdlab.worker.batches import BatchSource
from kdlab.worker.checkpoint import config_hash, load_latest, save_latest, seed_everything
from kdlab.worker.config import RunConfig
from kdlab.worker.data_order import epoch_order
from kdlab.worker.devices import PeakMemory, resolve_device, synchronize
from kdlab.worker.ema import EMA
from kdlab.worker.evaluation import best_is_max, check_best_metric, evaluate
from kdlab.worker.kd.losses import IGNORE_INDEX
from kdlab.worker.metrics import MetricSink
from kdlab.worker.names import BEST_FILE, LATEST_FILE, STUDENT_FILE
from kdlab.worker.numerics import amp_dtype, cast_for_autocast, numerics
from kdlab.worker.optim import build_optimizer, clip_and_measure_grads, lr_factor, total_grad_norm
from kdlab.worker.run_metadata import loss_metadata
from kdlab.worker.student_export import check_export, save_student
from kdlab.worker.teacher_outputs import TeacherOutputs
from kdlab.worker.teacher_setup import (
    attach_teacher,
    build_teacher,
    build_teacher_adapter,
    check_teacher_accuracy,
)
from kdlab.worker.teacher_timer import TeacherTimer
from kdlab.worker.train_guards import check_finite, check_labels
from kdlab.worker.training_state import capture_training_state, restore_training_state

__all__ = ["STUDENT_FILE", "TrainResult", "Trainer", "build_optimizer", "total_grad_norm"]


@dataclass
class TrainResult:
    """What `Trainer.fit` produced. `metrics` holds the last logged value of every key."""

    metrics: dict[str, float]
    out_dir: Path
    global_step: int
    stopped: bool = False  # True when `should_stop` ended the run early (latest.pt is written)
    student_path: Path | None = None
    best_path: Path | None = None
    latest_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train `config.student` (supervised, or distilled from `config.teacher`) into `out_dir`.

    `teacher_state`: the teacher's state dict (required in practice for `kind: distill`; None
    leaves it randomly initialised, which the weak-teacher guard refuses unless allowed).
    `data`: a ready `catalog.DataBundle` instead of building `config.dataset`.
    `should_stop(global_step)`: checked after every step; True writes `latest.pt` and returns.
    `resume_from`: a `latest.pt` to continue from (exactly).
    `checkpoint_every_steps`: also write `latest.pt` every N steps (it is always written at
    each epoch end and on a stop request).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path,
        sink: MetricSink,
        teacher_state: dict[str, torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        *,
        data: catalog.DataBundle | None = None,
        data_root: Path | None = None,
        should_stop: Callable[[int], bool] | None = None,
        resume_from: str | Path | None = None,
        checkpoint_every_steps: int | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        self.sink = sink
        self.teacher_state = teacher_state
        self.device = resolve_device(device, config.resources.gpus)
        self.data = data
        self.data_root = data_root
        self.should_stop = should_stop
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.checkpoint_every_steps = checkpoint_every_steps
        self.distill = config.kind == "distill"
        self.config_hash = config_hash(config.model_dump(mode="json"))
        # training position
        self.global_step = 0
        self.epoch = 0
        self.batch_index = 0
        self.best_value: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.final_student_acc: float | None = None  # last in-training eval (EMA if enabled)
        self.eval_step: int | None = None  # global step of that evaluation
        self.metadata: dict[str, Any] = {}
        # per-interval accumulators
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_steps = 0
        self._grad_norm: torch.Tensor | None = None
        self._lr = config.train.optimizer.lr
        self._interval_start = time.perf_counter()
        # built in _setup
        self.teacher: nn.Module | None = None
        self.teacher_fingerprint: str | None = None
        self.teacher_adapter: nn.Module | None = None
        self.dm: kd.DistillationModel | None = None
        self.timer: TeacherTimer | None = None
        self.ema: EMA | None = None
        self.train_batches: BatchSource | None = None
        self.val_batches: BatchSource | None = None
        self.teacher_outputs = TeacherOutputs(self.device)
        self.peak_memory = PeakMemory(self.device)

    # ----------------------------------------------------------------------------- main flow
    def fit(self) -> TrainResult:
        """Train to the end (or to a stop request), under the run's numerics (TF32,
        determinism) and with `self.device` as the current CUDA device."""
        cuda_device = (
            torch.cuda.device(self.device)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with numerics(self.config.train, self.device), cuda_device:
            return self._fit()

    def _fit(self) -> TrainResult:
        self._setup()
        while self.global_step < self.total_steps:
            if self._train_epoch():
                return self._stop()
            self.epoch, self.batch_index = self.epoch + 1, 0
            done = self.global_step >= self.total_steps
            if done:
                self._log_train()  # the last, possibly partial, interval
            if done or self.epoch % self.config.train.eval_every_epochs == 0:
                self._evaluate_and_log()
            self._save_latest()
        self._log_train()  # no-op unless resumed right at the end of training
        if self.eval_step != self.global_step:
            self._evaluate_and_log()
        return self._finish()

    # ----------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.config
        seed_everything(cfg.seed)
        if self.data is None:
            self.data = catalog.build_dataset(cfg.dataset, cfg.seed, self.data_root)
        info = self.data.info
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.train.batch_size)  # type: ignore[arg-type]
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        check_best_metric(cfg.train.best_metric, self.distill)
        self._log_run_metadata()
        self.train_batches = BatchSource(self.data.train, cfg.train.batch_size, self.device)
        self.val_batches = BatchSource(self.data.val, cfg.train.batch_size, self.device)

        seed_everything(cfg.seed)  # model init must not depend on what the dataset code drew
        student = catalog.build_model(cfg.student, info).to(self.device)
        resume = None
        if self.distill:
            assert cfg.distill is not None
            self.teacher = self._build_teacher(info)
            self.teacher_fingerprint = kd.fingerprint(self.teacher)
            self.teacher_adapter = build_teacher_adapter(
                cfg.distill, cfg.dataset, info, self.device
            )  # for the check
            resume = self._load_resume()  # refuses another teacher before anything else
            if resume is None:
                self._check_teacher()
            # the optimizer is built afterwards, so the loss adapters train
            self.dm = attach_teacher(
                student, self.teacher, cfg.distill, self.teacher_adapter, info, self.device
            )
            self.timer = TeacherTimer(self.teacher, self.device)
            self.model = self.dm
            dtype = amp_dtype(cfg.train.amp)
            if dtype is not None:  # after the fingerprint: that is of the weights as given
                cast_for_autocast(self.teacher, dtype)
        else:
            resume = self._load_resume()
            self.model = student
        self.model.to(self.device)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.train.optimizer, self.device)
        sched = cfg.train.scheduler
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(sched.name, sched.warmup_steps, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        if cfg.train.ema_decay is not None:
            self.ema = EMA(self.model, cfg.train.ema_decay)
        if resume is not None:
            restore_training_state(self, resume)
        self._log_loss_metadata()
        self._interval_start = time.perf_counter()
        self.peak_memory.start()

    def _build_teacher(self, info: catalog.DataInfo) -> nn.Module:
        assert self.config.teacher is not None
        return build_teacher(self.config.teacher, self.teacher_state, info, self.device)

    def _check_teacher(self) -> None:
        """Evaluate the teacher before step 0; refuse one at chance level (unless allowed)."""
        assert self.distill and self.config.distill is not None and self.data is not None
        acc = self._evaluate(student=None, teacher=self.teacher)["eval/teacher_acc"]
        self._log(0, {"eval/teacher_acc": acc})
        check_teacher_accuracy(
            acc, self.data.info.num_classes, self.config.distill.allow_weak_teacher
        )

    def _log_run_metadata(self) -> None:
        cfg = self.config
        self.metadata = {
            "run": cfg.name,
            "kind": cfg.kind,
            "config_hash": self.config_hash,
            "device": str(self.device),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }
        self.sink.log_metadata(dict(self.metadata))

    def _log_loss_metadata(self) -> None:
        """Record what this run optimises: the exact loss formula, sizes, fingerprints."""
        meta = loss_metadata(
            self.config, self.model, self.dm, self.teacher, self.teacher_fingerprint
        )
        self.sink.log_metadata(meta)
        self.metadata.update(meta)

    # ------------------------------------------------------------------------------ training
    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when `should_stop` asked to stop."""
        assert self.train_batches is not None
        order = epoch_order(self.train_batches.size, self.config.seed, self.epoch)
        self.model.train()
        for batch in self.train_batches.batches(order, start=self.batch_index):
            if self.global_step >= self.total_steps:
                break
            check_labels(batch.labelled, self.batch_index, self.epoch, self.global_step + 1)
            self._step(batch.x, batch.y)
            self.batch_index += 1
            if self.global_step % self.config.train.log_every == 0:
                self._log_train()
            every = self.checkpoint_every_steps
            if every and self.global_step % every == 0:
                self._save_latest()
            if self.should_stop is not None and self.should_stop(self.global_step):
                return True
        return False

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.config.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on a batch already on the device; no host sync."""
        use_student_loss = self.config.train.student_loss != "none"
        if self.timer is not None:
            self.timer.active = True
        with self._autocast():
            logits = self.model(x)
            student_loss = None
            if use_student_loss:
                student_loss = F.cross_entropy(
                    logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX
                )
            if self.dm is not None:
                loss = self.dm.compute_kd_loss(student_loss=student_loss, labels=y)
            else:
                assert student_loss is not None
                loss = student_loss
        if self.timer is not None:
            self.timer.active = False
        assert isinstance(loss, torch.Tensor)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._clip_and_measure_grads()
        self._lr = float(self.scheduler.get_last_lr()[0])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.global_step += 1
        self._accumulate(loss, student_loss)

    def _clip_and_measure_grads(self) -> None:
        """Clip every step when `grad_clip` is set; measure the norm on logging steps only."""
        next_step = self.global_step + 1
        logging = next_step % self.config.train.log_every == 0 or next_step == self.total_steps
        norm = clip_and_measure_grads(
            self.optimizer, self.scaler, self.config.train.grad_clip, logging
        )
        if norm is not None:
            self._grad_norm = norm

    def _accumulate(self, loss: torch.Tensor, student_loss: torch.Tensor | None) -> None:
        """Add this step's terms to the interval sums (device tensors: no sync)."""
        terms: dict[str, torch.Tensor] = {}
        if student_loss is not None:
            terms["train/loss_student"] = student_loss
        if self.dm is not None:
            for key, value in self.dm.kd_loss_components.items():
                terms[f"train/kd/{key}"] = value
            for key, value in self.dm.kd_loss_weighted.items():
                terms[f"train/kd_weighted/{key}"] = value
        terms["train/loss_total"] = loss
        for key, value in terms.items():
            value = value.detach().float()
            self._acc[key] = self._acc[key] + value if key in self._acc else value
        self._acc_steps += 1

    def _log_train(self) -> None:
        """Read the interval back (the interval's one host sync), check it is finite, log it."""
        if self._acc_steps == 0:
            return
        keys = list(self._acc)
        parts = [self._acc[k] for k in keys]
        if self._grad_norm is not None:
            parts.append(self._grad_norm.float().reshape(()))
        values = torch.stack(parts).tolist()  # waits for the interval's queued steps
        elapsed = time.perf_counter() - self._interval_start
        grad_norm = values.pop() if self._grad_norm is not None else None
        metrics = {k: v / self._acc_steps for k, v in zip(keys, values, strict=True)}
        # grad_norm is exempt: fp16 overflows are skipped
        check_finite(metrics, self.global_step, self._acc_steps, self.config.train.amp)
        metrics["train/lr"] = self._lr
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics["sys/step_time_ms"] = 1000.0 * elapsed / self._acc_steps
        if self.timer is not None:
            metrics["sys/teacher_time_share"] = self.timer.pop_seconds() / max(elapsed, 1e-9)
        if self.peak_memory.enabled:
            metrics["sys/gpu_mem_gib"] = self.peak_memory.pop_gib()
        self._log(self.global_step, metrics)
        self._acc, self._acc_steps, self._grad_norm = {}, 0, None
        self._interval_start = time.perf_counter()

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.last_metrics.update(metrics)
        self.sink.log_metrics(step, metrics)

    # ---------------------------------------------------------------------------- evaluation
    def _eval_weights(self) -> contextlib.AbstractContextManager:
        """Evaluation (and the best checkpoint) use the EMA weights when EMA is on."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _off_the_clock(self) -> Iterator[None]:
        """Keep evaluation and checkpoint writes out of `sys/step_time_ms` and
        `sys/gpu_mem_gib`. The steps queued before the block finish first: their time is theirs."""
        synchronize(self.device)
        self.peak_memory.pause()
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self._interval_start += time.perf_counter() - started
            self.peak_memory.resume()

    def _evaluate_and_log(self) -> None:
        with self._off_the_clock(), self._eval_weights():
            metrics = self._evaluate(student=self.model, teacher=self.teacher)
            self.final_student_acc = metrics["eval/student_acc"]
            self.eval_step = self.global_step
            self._save_best_if_improved(metrics)
        self._log(self.global_step, metrics)

    def _evaluate(self, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, float]:
        """The `eval/*` metrics of `student` and/or `teacher`; see `kdlab.worker.evaluation`."""
        assert self.val_batches is not None
        forward = self._teacher_forward if teacher is not None else None
        return evaluate(self.val_batches, student, forward, self.teacher_outputs, self._autocast)

    def _teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher(self.teacher_adapter(x) if self.teacher_adapter is not None else x)

    def _save_best_if_improved(self, metrics: dict[str, float]) -> None:
        name = self.config.train.best_metric
        value = metrics[name]
        better = self.best_value is None or (
            value > self.best_value if best_is_max(name) else value < self.best_value
        )
        if better:
            self.best_value = value
            meta = {
                "run": self.config.name,
                "step": self.global_step,
                name: value,
                "teacher_fingerprint": self.teacher_fingerprint,  # hashed once, at the start
            }
            kd.save(self.model, self.out_dir / BEST_FILE, metadata=meta)

    # ---------------------------------------------------------------------------- checkpoints
    def _save_latest(self) -> Path:
        with self._off_the_clock():
            return save_latest(self.out_dir / LATEST_FILE, capture_training_state(self))

    def _load_resume(self) -> dict[str, Any] | None:
        if self.resume_from is None:
            return None
        return load_latest(self.resume_from, self.teacher_fingerprint, self.config_hash)

    def _stop(self) -> TrainResult:
        latest = self._save_latest()
        return TrainResult(
            metrics=dict(self.last_metrics),
            out_dir=self.out_dir,
            global_step=self.global_step,
            stopped=True,
            latest_path=latest,
            metadata=self.metadata,
        )

    # ---------------------------------------------------------------------------------- finish
    def _finish(self) -> TrainResult:
        """Export the student (EMA weights if on), save it, and check the saved file evaluates
        exactly like the student did in training."""
        assert self.data is not None
        if self.ema is not None:
            self.model.load_state_dict(self.ema.shadow)
        in_training = self.final_student_acc
        assert in_training is not None and self.eval_step == self.global_step
        student_path = self.out_dir / STUDENT_FILE
        meta = {
            "run": self.config.name,
            "step": self.global_step,
            "config_hash": self.config_hash,
            "loss": self.metadata.get("loss", {}),
            "teacher_fingerprint": self.teacher_fingerprint,
        }
        save_student(self.model, student_path, meta)
        exported = self._evaluate_saved_student(student_path)
        self._log(self.global_step, {"eval/exported_student_acc": exported})
        check_export(exported, in_training, student_path)
        best = self.out_dir / BEST_FILE
        return TrainResult(
            metrics=dict(self.last_metrics),
            out_dir=self.out_dir,
            global_step=self.global_step,
            student_path=student_path,
            best_path=best if best.exists() else None,
            latest_path=self.out_dir / LATEST_FILE,
            metadata=self.metadata,
        )

    def _evaluate_saved_student(self, path: Path) -> float:
        """Load the saved file into a fresh catalog student and evaluate it."""
        assert self.data is not None
        fresh = catalog.build_model(self.config.student, self.data.info)
        kd.restore(fresh, path)
        fresh.to(self.device)
        return self._evaluate(student=fresh, teacher=None)["eval/student_acc"]
