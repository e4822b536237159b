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
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker import catalog, kd
from worker.batches import BatchSource
from worker.checkpoint import (
    BEST,
    LATEST,
    capture_rng_state,
    config_hash,
    load_latest,
    restore_rng_state,
    save_latest,
    seed_everything,
)
from worker.config import RunConfig
from worker.devices import PeakMemory, resolve_device, synchronize
from worker.kd.losses import IGNORE_INDEX
from worker.loss_formula import loss_formula
from worker.metrics import MetricSink
from worker.numerics import amp_dtype, cast_for_autocast, numerics
from worker.teacher_outputs import TeacherOutputs

WEAK_TEACHER_FACTOR = 1.5  # a teacher below 1.5 × chance accuracy looks untrained
EXPORT_TOLERANCE = 1e-6  # |exported − in-training| student accuracy allowed after export
STUDENT_FILE = "student.safetensors"


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


# --------------------------------------------------------------------------- small building blocks


def build_optimizer(
    params: list[nn.Parameter], spec: Any, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The optimizer of `spec`. On CUDA, Adam(W) is the fused kernel: one launch for every
    parameter, and with a GradScaler it skips an overflowed step without a host sync."""
    fused = True if device is not None and device.type == "cuda" else None  # None: torch's default
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    raise ValueError(f"train.optimizer.name: unknown optimizer {spec.name!r}")


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, on their device (no host sync). Written out
    because `torch.nn.utils.get_total_norm` only exists from torch 2.6."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def lr_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at step s: linear warm-up to 1 over `warmup_steps`, then cosine/linear decay
    to 0 at `total_steps` (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0

    return factor


class EMA:
    """Exponential moving average of a model's state: floating entries averaged, others copied.

    The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates (TensorFlow's
    `num_updates` rule), so short runs are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        live = model.state_dict()  # detached views of the parameters: in-place updates show
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        floating = {k for k, v in live.items() if v.is_floating_point()}
        self._float_live = [live[k] for k in live if k in floating]
        self._float_shadow = [self.shadow[k] for k in live if k in floating]
        self._other = [(live[k], self.shadow[k]) for k in live if k not in floating]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._float_live:
            torch._foreach_lerp_(self._float_shadow, self._float_live, 1.0 - decay)
        for live, shadow in self._other:
            shadow.copy_(live)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, `model` holds the averaged weights."""
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


class TeacherTimer:
    """Time spent in the teacher's forward during training steps, without a sync per step:
    CUDA events read back at logging time, or wall-clock on the CPU (synchronous anyway)."""

    def __init__(self, teacher: nn.Module, device: torch.device):
        self.active = False
        self.device = device
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None
        teacher.register_forward_pre_hook(self._before)
        teacher.register_forward_hook(self._after)

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the teacher's device, not GPU 0
        return event

    def _before(self, *_: Any) -> None:
        if self.active:
            self._start = self._now()

    def _after(self, *_: Any) -> None:
        if self.active and self._start is not None:
            end = self._now()
            if self.cuda:
                self._events.append((self._start, end))
            else:
                self._seconds += end - self._start
            self._start = None

    def pop_seconds(self) -> float:
        """Teacher seconds since the last call (call after a sync: the events are complete)."""
        seconds = self._seconds + sum(s.elapsed_time(e) / 1000.0 for s, e in self._events)
        self._seconds, self._events = 0.0, []
        return seconds


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch; depends only on (seed, epoch)."""
    return torch.randperm(n, generator=private_generator(seed + epoch)).tolist()


def private_generator(seed: int) -> torch.Generator:
    """A generator of its own, so the data order does not draw from the global RNG (which would
    shift dropout etc. between an uninterrupted and a resumed run)."""
    return torch.Generator().manual_seed(seed)


def best_is_max(metric: str) -> bool:
    return not ("loss" in metric or metric.endswith("/kl"))


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
        self._check_best_metric()
        self._log_run_metadata()
        self.train_batches = BatchSource(self.data.train, cfg.train.batch_size, self.device)
        self.val_batches = BatchSource(self.data.val, cfg.train.batch_size, self.device)

        seed_everything(cfg.seed)  # model init must not depend on what the dataset code drew
        student = catalog.build_model(cfg.student, info).to(self.device)
        resume = None
        if self.distill:
            self.teacher = self._build_teacher(info)
            self.teacher_fingerprint = kd.fingerprint(self.teacher)
            self.teacher_adapter = self._build_teacher_adapter()  # the teacher check needs it
            resume = self._load_resume()  # refuses another teacher before anything else
            if resume is None:
                self._check_teacher()
            self.model = self._convert(student, info)
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
            self._restore(resume)
        self._log_loss_metadata()
        self._interval_start = time.perf_counter()
        self.peak_memory.start()

    def _check_best_metric(self) -> None:
        available = ["eval/student_acc", "eval/student_loss"]
        if self.distill:
            available += ["eval/teacher_acc", "eval/agreement", "eval/kl"]
        if self.config.train.best_metric not in available:
            raise ValueError(
                f"train.best_metric: {self.config.train.best_metric!r} is not an eval metric of "
                f"this run; choose one of {available}"
            )

    def _build_teacher(self, info: catalog.DataInfo) -> nn.Module:
        assert self.config.teacher is not None
        teacher = catalog.build_model(self.config.teacher, info)
        if self.teacher_state is not None:
            try:
                teacher.load_state_dict(self.teacher_state)
            except RuntimeError as err:
                raise ValueError(
                    f"the teacher weights do not fit teacher {self.config.teacher.name!r} with "
                    f"params {self.config.teacher.params}: {err}"
                ) from None
        teacher.requires_grad_(False)
        return teacher.to(self.device).eval()

    def _check_teacher(self) -> None:
        """Evaluate the teacher before step 0; refuse one at chance level (unless allowed)."""
        assert self.distill and self.config.distill is not None and self.data is not None
        acc = self._evaluate(student=None, teacher=self.teacher)["eval/teacher_acc"]
        self._log(0, {"eval/teacher_acc": acc})
        num_classes = self.data.info.num_classes
        chance = 1.0 / num_classes
        if acc < WEAK_TEACHER_FACTOR * chance and not self.config.distill.allow_weak_teacher:
            raise ValueError(
                f"the teacher weights look untrained: eval/teacher_acc = {acc:.4f} on the val "
                f"split, chance is {chance:.4f} (1/{num_classes} classes). Check teacher.weights "
                "(run_id, checkpoint or path), or set distill.allow_weak_teacher: true to distil "
                "from it anyway"
            )

    def _build_teacher_adapter(self) -> nn.Module | None:
        spec = self.config.distill
        assert spec is not None
        if spec.teacher_input_adapter is None:
            return None
        params = {  # "normalization", the one kind there is
            k: v if isinstance(v, list) else [v]
            for k, v in spec.teacher_input_adapter.params.items()
        }
        return kd.NormalizationAdapter(**params).to(self.device)

    def _convert(self, student: nn.Module, info: catalog.DataInfo) -> nn.Module:
        """Attach teacher and losses; the optimizer is built afterwards so adapters train."""
        spec = self.config.distill
        assert spec is not None and self.teacher is not None
        criterion = {
            (p.student_layer, p.teacher_layer): kd.losses.build_loss(p.loss.name, p.loss.params)
            for p in spec.pairs
        }
        self.dm = kd.convert(
            student,
            teacher=self.teacher,
            criterion=criterion,
            balancer=kd.build_balancer(spec.balancer.name, spec.balancer.params),
            teacher_input_adapter=self.teacher_adapter,
            example_input=catalog.example_input(info).to(self.device),
        )
        self.timer = TeacherTimer(self.teacher, self.device)
        return self.dm

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
        cfg = self.config
        meta: dict[str, Any] = {
            "student_params": sum(
                p.numel()
                for name, p in self.model.named_parameters()
                if not name.startswith(kd.DistillationModel.KD_PREFIX)
            ),
        }
        if self.dm is None:
            meta["loss"] = loss_formula(cfg, None)
        else:
            assert self.teacher is not None
            meta["loss"] = loss_formula(cfg, self.dm.describe_kd_loss())
            meta["teacher_fingerprint"] = self.teacher_fingerprint
            meta["teacher_params"] = sum(p.numel() for p in self.teacher.parameters())
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
            self._check_labels(batch.labelled)
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

    def _check_labels(self, labelled: bool) -> None:
        """Refuse a batch without a single label (`BatchSource` checked it on the host)."""
        if not labelled:
            raise ValueError(
                f"batch {self.batch_index} of epoch {self.epoch} (step {self.global_step + 1}) has "
                f"no labelled samples or tokens: every label is {IGNORE_INDEX} (ignored), so the "
                "student loss is undefined. Check the dataset's labels, or use longer sequences / "
                "larger batches"
            )

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
        clip = self.config.train.grad_clip
        next_step = self.global_step + 1
        logging = next_step % self.config.train.log_every == 0 or next_step == self.total_steps
        if clip is None and not logging:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = total_grad_norm([p.grad for p in params if p.grad is not None])
        if logging:
            self._grad_norm = norm.detach()

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
        self._check_finite(metrics)  # grad_norm is exempt: fp16 overflows are skipped
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

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Name the first non-finite term, KD terms first (a NaN there spreads to the totals)."""
        for key in sorted(metrics, key=lambda k: not k.startswith("train/kd/")):
            value = metrics[key]
            if math.isfinite(value):
                continue
            kind = "NaN" if math.isnan(value) else "Inf"
            amp_hint = (
                ", or use amp 'bf16' instead of 'fp16'" if self.config.train.amp == "fp16" else ""
            )
            raise ValueError(
                f"{kind} in {key} at step {self.global_step} (the mean of the "
                f"{self._acc_steps} steps since the last log); "
                "lower the learning rate, clip gradients (train.grad_clip), or check the data and "
                f"the teacher{amp_hint}"
            )

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

    @torch.no_grad()
    def _evaluate(self, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, float]:
        """Accuracy (top-1 over labels != -100: samples, or tokens for LMs) and loss of the
        student; with a teacher also its accuracy, top-1 agreement and KL(teacher‖student) at
        T=1 (summed over classes, mean over labelled positions)."""
        assert self.val_batches is not None
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
        sums: dict[str, torch.Tensor] = {}

        def add(key: str, value: torch.Tensor) -> None:
            sums[key] = sums[key] + value if key in sums else value

        for index, batch in enumerate(self.val_batches.batches()):
            x, y = batch.x, batch.y.flatten()
            labelled = y != IGNORE_INDEX
            add("count", labelled.sum())
            s_logits = t_logits = None
            with self._autocast():
                if student is not None:
                    s_logits = self._student_forward(student, x).float().flatten(0, -2)
                if teacher is not None:
                    t_out = self.teacher_outputs.get(index, partial(self._teacher_forward, x))
                    t_logits = t_out.float().flatten(0, -2)
            if s_logits is not None:
                ce = F.cross_entropy(s_logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
                add("student_loss", ce)
                add("student_acc", ((s_logits.argmax(-1) == y) & labelled).sum())
            if t_logits is not None:
                add("teacher_acc", ((t_logits.argmax(-1) == y) & labelled).sum())
            if s_logits is not None and t_logits is not None:
                agree = s_logits.argmax(-1) == t_logits.argmax(-1)
                add("agreement", (agree & labelled).sum())
                kl = F.kl_div(
                    F.log_softmax(s_logits, -1),
                    F.log_softmax(t_logits, -1),
                    log_target=True,
                    reduction="none",
                ).sum(-1)
                add("kl", (kl * labelled).sum())
        if teacher is not None:
            self.teacher_outputs.end_pass()
        if student is not None and was_training:
            student.train()
        keys = list(sums)
        values = torch.stack([sums[k].double() for k in keys]).tolist() if keys else []
        totals = dict(zip(keys, values, strict=True))  # one host read for the whole split
        count = totals.pop("count", 0.0)
        if count == 0:
            raise ValueError("the val split has no labelled samples or tokens (all labels -100)")
        return {f"eval/{k}": v / count for k, v in totals.items()}

    def _teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher(self.teacher_adapter(x) if self.teacher_adapter is not None else x)

    def _student_forward(self, student: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(student, kd.DistillationModel):
            with student.only_student_forward():
                return student(x)
        return student(x)

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
            kd.save(self.model, self.out_dir / BEST, metadata=meta)

    # ---------------------------------------------------------------------------- checkpoints
    def _save_latest(self) -> Path:
        with self._off_the_clock():
            return save_latest(self.out_dir / LATEST, self._training_state())

    def _training_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": capture_rng_state(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "config_hash": self.config_hash,
            "teacher_fingerprint": self.teacher_fingerprint,
            "best_value": self.best_value,
            "final_student_acc": self.final_student_acc,
            "eval_step": self.eval_step,
            "interval": {k: float(v) for k, v in self._acc.items()},
            "interval_steps": self._acc_steps,
            "lr": self._lr,
        }

    def _load_resume(self) -> dict[str, Any] | None:
        if self.resume_from is None:
            return None
        return load_latest(self.resume_from, self.teacher_fingerprint, self.config_hash)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"]
        self.best_value = state["best_value"]
        self.final_student_acc = state["final_student_acc"]
        self.eval_step = state["eval_step"]
        self._acc = {k: torch.tensor(v, device=self.device) for k, v in state["interval"].items()}
        self._acc_steps = state["interval_steps"]
        self._lr = state["lr"]
        restore_rng_state(state["rng"])

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
        kd_meta = self.metadata.get("loss", {})
        student = kd.export(self.dm) if self.dm is not None else self.model
        student_path = self.out_dir / STUDENT_FILE
        kd.save(
            student,
            student_path,
            metadata={
                "run": self.config.name,
                "step": self.global_step,
                "config_hash": self.config_hash,
                "loss": kd_meta,
                "teacher_fingerprint": self.teacher_fingerprint,
            },
        )
        exported = self._evaluate_saved_student(student_path)
        self._log(self.global_step, {"eval/exported_student_acc": exported})
        if abs(exported - in_training) > EXPORT_TOLERANCE:
            raise RuntimeError(
                f"the exported student evaluates to accuracy {exported:.6f} but the student "
                f"reached {in_training:.6f} in training (same weights); export lost or changed "
                f"weights: {student_path}"
            )
        best = self.out_dir / BEST
        return TrainResult(
            metrics=dict(self.last_metrics),
            out_dir=self.out_dir,
            global_step=self.global_step,
            student_path=student_path,
            best_path=best if best.exists() else None,
            latest_path=self.out_dir / LATEST,
            metadata=self.metadata,
        )

    def _evaluate_saved_student(self, path: Path) -> float:
        """Load the saved file into a fresh catalog student and evaluate it."""
        assert self.data is not None
        fresh = catalog.build_model(self.config.student, self.data.info)
        kd.restore(fresh, path)
        fresh.to(self.device)
        return self._evaluate(student=fresh, teacher=None)["eval/student_acc"]
