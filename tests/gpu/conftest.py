"""The GPU suite: `pytest -m gpu tests/gpu --confcutdir=tests/gpu` (what benchmarks/gpu_check.sh
runs). It needs the worker's dependencies only: `--confcutdir` keeps tests/conftest.py (the
service's database and app fixtures) out, and nothing here imports the backend. Every test
skips cleanly without CUDA, so the CPU suite collects it too."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.worker import catalog, kd
from kdlab.worker.catalog import DataBundle
from kdlab.worker.config import RunConfig
from kdlab.worker.metrics import JsonlSink, read_jsonl
from kdlab.worker.trainer import Trainer, TrainResult

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAS_CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


def example(name: str, **sections: dict[str, Any]) -> RunConfig:
    """An example config with some sections' keys overridden, e.g. train={"epochs": 2}."""
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    for section, values in sections.items():
        data[section] = {**copy.deepcopy(data.get(section) or {}), **values}
    return RunConfig.model_validate(data)


def train(
    config: RunConfig,
    out: Path,
    teacher_state: dict | None = None,
    data: DataBundle | None = None,
    device: str = "cuda",
    trainer_class: type[Trainer] = Trainer,
    **kwargs: Any,
) -> tuple[Trainer, TrainResult]:
    sink = JsonlSink(out / "metrics.jsonl")
    try:
        trainer = trainer_class(config, out, sink, teacher_state, device, data=data, **kwargs)
        return trainer, trainer.fit()
    finally:
        sink.close()


def series(out: Path, key: str) -> dict[int, float]:
    return {p["step"]: p["value"] for p in read_jsonl(out / "metrics.jsonl") if p["key"] == key}


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return catalog.build_dataset(example("digits-teacher").dataset, seed=0)


@pytest.fixture(scope="session")
def teacher_state(tmp_path_factory: pytest.TempPathFactory, digits: DataBundle) -> dict:
    """The digits teacher (2×256 MLP), 8 epochs on CUDA."""
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    out = tmp_path_factory.mktemp("teacher")
    _, result = train(example("digits-teacher", train={"epochs": 8}), out, data=digits)
    assert result.best_path is not None and result.metrics["eval/student_acc"] > 0.9
    config = example("digits-kd")
    assert config.teacher is not None
    model = catalog.build_model(config.teacher, digits.info)
    kd.restore(model, result.best_path)
    return model.state_dict()
