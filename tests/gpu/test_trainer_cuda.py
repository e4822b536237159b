"""The Trainer on CUDA (issue 13): every precision with and without clipping, no host sync inside
a training step, exact resume with `train.deterministic`, and the `sys/*` metrics against
measurements taken outside the trainer."""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.worker.catalog import DataBundle
from kdlab.worker.config import RunConfig
from kdlab.worker.metrics import MetricSink
from kdlab.worker.numerics import amp_dtype
from kdlab.worker.trainer import Trainer
from tests.gpu.conftest import example, needs_cuda, series, train

pytestmark = needs_cuda


def kd_config(**train_overrides: Any) -> RunConfig:
    return example("digits-kd", train={"epochs": 4, "log_every": 5, **train_overrides})


# ------------------------------------------------------------- precisions × clipping


@pytest.fixture(scope="module")
def cpu_reference_acc(
    tmp_path_factory: pytest.TempPathFactory, digits: DataBundle, teacher_state: dict
) -> float:
    out = tmp_path_factory.mktemp("cpu")
    _, result = train(kd_config(), out, teacher_state, data=digits, device="cpu")
    return result.metrics["eval/student_acc"]


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_trainer_distils_on_cuda(
    tmp_path: Path,
    digits: DataBundle,
    teacher_state: dict,
    cpu_reference_acc: float,
    amp: str,
    grad_clip: float | None,
) -> None:
    config = kd_config(amp=amp, grad_clip=grad_clip)
    trainer, result = train(config, tmp_path, teacher_state, data=digits)
    acc = result.metrics["eval/student_acc"]
    # the same recipe in fp32 on the CPU is the reference; mixed precision stays close to it
    assert acc > 0.8 and abs(acc - cpu_reference_acc) < 0.05
    assert result.metrics["eval/exported_student_acc"] == pytest.approx(acc, abs=1e-6)
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.teacher is not None
    dtypes = {p.dtype for p in trainer.teacher.parameters()}
    assert dtypes == {amp_dtype(amp) or torch.float32}  # an MLP: every weight is a Linear's
    for key in ("sys/step_time_ms", "sys/teacher_time_share", "sys/gpu_mem_gib"):
        assert key in result.metrics


# ----------------------------------------------------------------- no sync in a step


class SyncCounting(Trainer):
    """Counts CUDA host synchronisations inside each training step after the first two."""

    syncs: list[int]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.global_step < 2:  # first steps create cuBLAS handles, optimizer state
            return super()._step(x, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                super()._step(x, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.syncs.append(sum("synchroniz" in str(w.message) for w in caught))


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_no_host_sync_inside_a_training_step(
    tmp_path: Path, digits: DataBundle, teacher_state: dict, amp: str, grad_clip: float | None
) -> None:
    config = kd_config(amp=amp, grad_clip=grad_clip, epochs=1, ema_decay=0.99)
    sink = _NullSink()
    trainer = SyncCounting(config, tmp_path, sink, teacher_state, "cuda", data=digits)
    trainer.syncs = []
    trainer.fit()
    assert trainer.syncs and trainer.syncs == [0] * len(trainer.syncs)


class _NullSink(MetricSink):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metadata(self, metadata: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------ exact resume


def test_resume_on_cuda_is_exact_with_deterministic(
    tmp_path: Path, digits: DataBundle, teacher_state: dict
) -> None:
    config = kd_config(deterministic=True, ema_decay=0.9, amp="bf16")
    _, whole = train(config, tmp_path / "whole", teacher_state, data=digits)
    stop_at = 31  # mid-epoch
    _, first = train(
        config,
        tmp_path / "split",
        teacher_state,
        data=digits,
        should_stop=lambda step: step == stop_at,
    )
    assert first.stopped and first.global_step == stop_at
    _, resumed = train(
        config,
        tmp_path / "split",
        teacher_state,
        data=digits,
        resume_from=tmp_path / "split" / "latest.pt",
    )
    assert resumed.global_step == whole.global_step
    a = torch.load(tmp_path / "whole" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    for key in ("train/loss_total", "eval/student_acc"):
        assert series(tmp_path / "split", key) == series(tmp_path / "whole", key)


# --------------------------------------------------- sys/* against outside measurements


class TimedSink(MetricSink):
    """Wall-clock time of every train-metrics log, taken outside the trainer."""

    def __init__(self) -> None:
        self.logs: list[tuple[float, int, dict[str, float]]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss_total" in metrics:
            self.logs.append((time.perf_counter(), step, dict(metrics)))

    def log_metadata(self, metadata: dict[str, Any]) -> None:
        pass


def test_sys_metrics_match_outside_measurements(
    tmp_path: Path, digits: DataBundle, teacher_state: dict
) -> None:
    # a process-lifetime peak far above anything the run allocates (finding 7)
    torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    config = kd_config(epochs=6, log_every=5, ema_decay=0.99)
    sink = TimedSink()
    trainer = Trainer(config, tmp_path, sink, teacher_state, "cuda", data=digits)
    trainer.fit()
    steps_per_epoch = trainer.steps_per_epoch
    logs = sink.logs

    # step time: between two consecutive logs inside one epoch, wall time / steps
    inside, across = [], []
    for (t0, s0, _), (t1, s1, m1) in itertools.pairwise(logs):
        wall_ms = 1000 * (t1 - t0) / (s1 - s0)
        same_epoch = (s0 - 1) // steps_per_epoch == (s1 - 1) // steps_per_epoch
        (inside if same_epoch else across).append((wall_ms, m1["sys/step_time_ms"]))
    assert len(inside) >= 10
    for wall_ms, reported in inside:
        assert reported == pytest.approx(wall_ms, rel=0.25, abs=0.3)
    # across an epoch end the eval and checkpoint are off the clock, the steps are not (finding 6)
    typical = sorted(r for _, r in inside)[len(inside) // 2]
    for _, reported in across:
        assert 0.5 * typical < reported < 2.0 * typical

    # peak memory: the interval's steps only, between an outside lower bound and 1 GiB
    assert trainer.teacher is not None
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    state_bytes = sum(p.numel() * p.element_size() for p in params) * 4  # param, grad, m, v
    teacher_bytes = sum(p.numel() * p.element_size() for p in trainer.teacher.parameters())
    lower_gib = (state_bytes + teacher_bytes) / 2**30
    for _, _, m in logs:
        assert lower_gib <= m["sys/gpu_mem_gib"] < 1.0

    # teacher share: the teacher's forward timed alone, over a step's time
    x = digits.train[0][0].unsqueeze(0).expand(config.train.batch_size, -1).contiguous().cuda()
    teacher = trainer.teacher
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        for _ in range(5):
            teacher(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            teacher(x)
        end.record()
        torch.cuda.synchronize()
    teacher_ms = start.elapsed_time(end) / 50
    expected_share = teacher_ms / typical
    shares = [m["sys/teacher_time_share"] for _, _, m in logs]
    median_share = sorted(shares)[len(shares) // 2]
    assert 0.0 < median_share < 1.0
    assert expected_share / 3 < median_share < expected_share * 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_training_on_the_second_gpu_touches_only_it(
    tmp_path: Path, digits: DataBundle, teacher_state: dict
) -> None:
    before = torch.cuda.memory_allocated(0)
    _, result = train(kd_config(epochs=1), tmp_path, teacher_state, data=digits, device="cuda:1")
    assert result.metrics["sys/teacher_time_share"] > 0.01  # events on cuda:1's stream
    assert torch.cuda.memory_allocated(0) == before
