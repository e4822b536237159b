"""The exported student as an MLflow model directory: `student/` with the weights file `kd.save`
wrote and an `MLmodel` file (signature from the run dataset's DataInfo, a `kdlab` flavor saying
how to load it). No `python_function` flavor: load it with
`kd.restore(catalog.build_model(spec, info), path)`, not `mlflow.pyfunc.load_model`."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.backend.settings import Settings
from kdlab.worker.names import STUDENT_FILE

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

STUDENT_DIR = "student"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def signature(settings: Settings, config: dict[str, Any]) -> ModelSignature | None:
    """Input: the run dataset's DataInfo shape and dtype, batch first; output: float32 logits
    `[-1, num_classes]` (`[-1, seq_len, vocab]` for a language model). None when the config
    names no dataset (external runs) or its DataInfo cannot be had."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    dataset = config.get("dataset")
    if not isinstance(dataset, dict):
        return None
    try:
        from kdlab.backend.services.validation import data_root
        from kdlab.worker import catalog
        from kdlab.worker.config import DatasetSpec

        spec = DatasetSpec.model_validate(dataset)
        info = catalog.dataset_info(spec, int(config.get("seed", 0)), data_root(settings))
    except Exception as err:
        log.info("MLflow mirror: no signature for dataset %r: %s", dataset.get("name"), err)
        return None
    input_dtype = np.dtype(str(info.input_dtype).removeprefix("torch."))
    if info.task == "classification":
        output_shape: tuple[int, ...] = (-1, info.num_classes)
    else:
        output_shape = (-1, *info.input_shape, info.num_classes)
    return ModelSignature(
        inputs=Schema([TensorSpec(input_dtype, (-1, *info.input_shape))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), output_shape)]),
    )


def write_mlmodel(
    settings: Settings,
    directory: Path,
    mlflow_run_id: str,
    *,
    run_id: str,
    experiment: str,
    config: dict[str, Any],
    payload: dict[str, Any],
) -> None:
    """The `MLmodel` file of the student directory `directory` (the weights are already in it)."""
    from mlflow.models import Model

    flavor = {
        "weights": STUDENT_FILE,
        "format": "safetensors (kd.save: weights + JSON metadata in the header)",
        "sha256": payload["sha256"],
        "size": payload.get("size"),
        "model": config.get("student"),
        "dataset": config.get("dataset"),
        "kdlab_run_id": run_id,
        "load": (
            "from kdlab.worker import catalog, kd; from kdlab.worker.config import ModelSpec; "
            "student = kd.restore(catalog.build_model(ModelSpec(**model), info), weights)"
        ),
    }
    model = Model(
        artifact_path=STUDENT_DIR,
        run_id=mlflow_run_id,
        flavors={"kdlab": flavor},
        signature=signature(settings, config),
        metadata={"kdlab_run_id": run_id, "kdlab_experiment": experiment},
        model_size_bytes=payload.get("size"),
    )
    model.save(str(directory / "MLmodel"))


__all__ = ["STUDENT_DIR", "STUDENT_FILE", "sha256_of", "signature", "write_mlmodel"]
