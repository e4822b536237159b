"""The trainer's GPU-readiness fixes that a CPU can prove (issue 13): the teacher input adapter
before the step-0 teacher check, no torch-2.6-only API, one host read per logging interval,
the teacher hashed once and run once on the val split, the teacher cast once for autocast, and
a run that asked for GPUs never training on the CPU.

Reference values come from outside the trainer: a teacher folded by hand to expect normalised
inputs, torch's own `clip_grad_norm_`, counts derived from the run's shape (steps, val batches).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kdlab.worker import catalog, kd
from kdlab.worker.catalog import DataBundle
from kdlab.worker.config import RunConfig
from kdlab.worker.metrics import JsonlSink
from kdlab.worker.trainer import Trainer, TrainResult, total_grad_norm
from tests.worker.test_trainer import example, series, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HOST_READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


def image_digits(name: str, **overrides: Any) -> RunConfig:
    """An example config on digits shaped [1, 8, 8] (one channel, for the input adapter)."""
    config = example(name, **overrides)
    data = config.model_dump(mode="json")
    data["dataset"]["params"] = {"as_image": True}
    return RunConfig.model_validate(data)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return catalog.build_dataset(image_digits("digits-teacher").dataset, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, digits: DataBundle) -> TrainResult:
    """A digits teacher (2×256 MLP), 6 epochs: well above chance, seconds to train."""
    config = image_digits("digits-teacher", train={"epochs": 6})
    return train(config, tmp_path_factory.mktemp("teacher"), data=digits)


@pytest.fixture(scope="module")
def teacher_state(teacher: TrainResult, digits: DataBundle) -> dict[str, torch.Tensor]:
    assert teacher.best_path is not None
    config = image_digits("digits-kd")
    assert config.teacher is not None
    model = catalog.build_model(config.teacher, digits.info)
    kd.restore(model, teacher.best_path)
    return model.state_dict()


def kd_config(**train: Any) -> RunConfig:
    return image_digits("digits-kd", train={"epochs": 3, "log_every": 5, **train})


def val_tensors(data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(data.val[i] for i in range(len(data.val))), strict=True)  # type: ignore[arg-type]
    return torch.stack(xs), torch.stack(ys)


# ------------------------------------------------------------------ finding 2: adapter first


def test_step0_teacher_check_sees_the_adapted_inputs(
    tmp_path: Path, digits: DataBundle, teacher: TrainResult, teacher_state: dict
) -> None:
    # fold x = 0.25·x' + 0.5 into the first layer: the folded teacher expects x' = (x − 0.5)/0.25
    folded = dict(teacher_state)
    weight, bias = teacher_state["features.0.0.weight"], teacher_state["features.0.0.bias"]
    folded["features.0.0.weight"] = 0.25 * weight
    folded["features.0.0.bias"] = bias + 0.5 * weight.sum(dim=1)
    config = kd_config()
    data = config.model_dump(mode="json")
    data["distill"]["teacher_input_adapter"] = {
        "name": "normalization",
        "params": {"mean_from": 0.0, "std_from": 1.0, "mean_to": 0.5, "std_to": 0.25},
    }
    result = train(RunConfig.model_validate(data), tmp_path, folded, data=digits)

    # through the adapter the folded teacher is the trained one: its accuracy, from step 0 on
    expected = teacher.metrics["eval/student_acc"]
    teacher_acc = series(tmp_path, "eval/teacher_acc")
    assert teacher_acc[0] == pytest.approx(expected, abs=1e-6)
    assert result.metrics["eval/teacher_acc"] == pytest.approx(expected, abs=1e-6)
    # without it (the bug) the check would have measured something else entirely
    assert config.teacher is not None
    model = catalog.build_model(config.teacher, digits.info)
    model.load_state_dict(folded)
    x, y = val_tensors(digits)
    with torch.no_grad():
        raw_acc = (model.eval()(x).argmax(-1) == y).float().mean().item()
    assert abs(raw_acc - expected) > 0.05


# --------------------------------------------------------------- finding 1: torch 2.4 / 2.5


def test_grad_norm_needs_no_torch_2_6_api(
    tmp_path: Path, digits: DataBundle, teacher_state: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with clip 1e9 torch's clip_grad_norm_ measures the norm and scales by exactly 1.0
    reference = train(kd_config(grad_clip=1e9), tmp_path / "clip", teacher_state, data=digits)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # as on torch 2.4/2.5
    ours = train(kd_config(), tmp_path / "none", teacher_state, data=digits)
    assert ours.global_step == reference.global_step
    expected, got = (
        series(tmp_path / "clip", "train/grad_norm"),
        series(tmp_path / "none", "train/grad_norm"),
    )
    assert set(got) == set(expected) and len(got) >= 10
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5)


def test_total_grad_norm_is_the_2_norm_of_all_gradients() -> None:
    grads = [torch.randn(7, 3), torch.randn(5), torch.randn(2, 2, 2)]
    by_hand = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert float(total_grad_norm(grads)) == pytest.approx(by_hand, rel=1e-6)
    assert float(total_grad_norm([])) == 0.0


# ------------------------------------------------------------ finding 18: one read per interval


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value back to Python (a device sync on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        # the non-fused optimizers read their step counter, a host tensor on every device
        if name in HOST_READS and sys._getframe(1).f_code.co_name != "_get_value":
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class CountingTrainer(Trainer):
    """Counts host reads inside each training step and each train-metrics log."""

    step_reads: list[int]
    log_reads: list[int]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with _HostReads() as mode:
            super()._step(x, y)
        self.step_reads.append(len(mode.reads))

    def _log_train(self) -> None:
        pending = self._acc_steps
        with _HostReads() as mode:
            super()._log_train()
        if pending:
            self.log_reads.append(len(mode.reads))


@pytest.mark.parametrize("overrides", [{}, {"grad_clip": 1.0, "ema_decay": 0.9}])
def test_one_host_read_per_logging_interval(
    tmp_path: Path, digits: DataBundle, teacher_state: dict, overrides: dict
) -> None:
    config = kd_config(**overrides)
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    trainer = CountingTrainer(config, tmp_path, sink, teacher_state, "cpu", data=digits)
    trainer.step_reads, trainer.log_reads = [], []
    trainer.fit()
    sink.close()
    steps_per_epoch = math.ceil(len(digits.train) / 64)  # type: ignore[arg-type]
    total = 3 * steps_per_epoch
    assert trainer.step_reads == [0] * total
    # log_every 5, plus the partial interval at the end of training
    assert trainer.log_reads == [1] * math.ceil(total / 5)


# ------------------------------------------------- findings 15, 16: the teacher's cost, once


class TeacherCounting(Trainer):
    teacher_calls: int = 0

    def _build_teacher(self, info: catalog.DataInfo) -> torch.nn.Module:
        teacher = super()._build_teacher(info)

        def count(*_: Any) -> None:
            self.teacher_calls += 1

        teacher.register_forward_hook(count)
        return teacher


def test_teacher_is_hashed_once_and_run_once_on_the_val_split(
    tmp_path: Path, digits: DataBundle, teacher_state: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes: list[int] = []
    original = kd.fingerprint

    def counted(model: torch.nn.Module) -> str:
        hashes.append(1)
        return original(model)

    monkeypatch.setattr(kd, "fingerprint", counted)
    monkeypatch.setattr(kd.serialization, "fingerprint", counted)
    config = kd_config(epochs=4)
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    trainer = TeacherCounting(config, tmp_path, sink, teacher_state, "cpu", data=digits)
    result = trainer.fit()
    sink.close()
    evals = len(series(tmp_path, "eval/student_acc"))
    assert evals == 4  # one per epoch
    val_batches = math.ceil(len(digits.val) / 64)  # type: ignore[arg-type]
    # one forward per training step, one probe of kd.convert, the val split once (step 0)
    assert trainer.teacher_calls == result.global_step + 1 + val_batches
    # the best checkpoint was written more than once, the teacher hashed once (at the start)
    assert len(hashes) == 1
    best_meta = kd.load_metadata(tmp_path / "best.safetensors")
    assert best_meta["teacher_fingerprint"] == original(trainer.teacher)  # type: ignore[arg-type]
    # the kept outputs give the same metrics as running the teacher again, by hand
    x, y = val_tensors(digits)
    with torch.no_grad():
        t = trainer.teacher(x)  # type: ignore[misc]
    assert result.metrics["eval/teacher_acc"] == pytest.approx(
        (t.argmax(-1) == y).float().mean().item(), abs=1e-6
    )


# ------------------------------------------------------ finding 13: the teacher cast once


def test_bf16_run_casts_the_teacher_once_after_fingerprinting(
    tmp_path: Path, digits: DataBundle, teacher_state: dict
) -> None:
    config = kd_config(amp="bf16", epochs=1)
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    trainer = Trainer(config, tmp_path, sink, teacher_state, "cpu", data=digits)
    trainer.fit()
    sink.close()
    assert trainer.teacher is not None
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    # the fingerprint recorded is of the weights as given (fp32), not of the cast copy
    assert config.teacher is not None
    given = catalog.build_model(config.teacher, digits.info)
    given.load_state_dict(teacher_state)
    assert trainer.teacher_fingerprint == kd.fingerprint(given)


# ------------------------------------------------------- finding 9: GPUs asked, none seen

NO_CUDA_RUN = """
import sys
from pathlib import Path
from kdlab.worker.config import RunConfig
from kdlab.worker.metrics import JsonlSink
from kdlab.worker.metrics import JsonlSink
from kdlab.worker.trainer import Trainer
config = RunConfig.model_validate_json(sys.argv[1])
try:
    Trainer(config, Path(sys.argv[2]), JsonlSink(Path(sys.argv[2]) / "m.jsonl"))
except RuntimeError as err:
    print("ERROR:", err)
    sys.exit(3)
print("trained on", "cpu")
"""


def test_a_run_that_asked_for_a_gpu_never_trains_on_the_cpu(tmp_path: Path) -> None:
    config = image_digits("digits-teacher", resources={"gpus": 1})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    proc = subprocess.run(
        [sys.executable, "-c", NO_CUDA_RUN, json.dumps(config.model_dump(mode="json")), tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout
    assert "resources.gpus is 1" in message and "sees no CUDA device" in message
    assert "CUDA_VISIBLE_DEVICES ''" in message and "resources.gpus: 0" in message
