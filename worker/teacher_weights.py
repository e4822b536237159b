"""A distill run's teacher weights: which file holds them, and loading it into a state dict.

`kdlab train` finds the file on this machine (`teacher_weights_file`: a path, or an earlier
run under the same `--out`); a worker downloads it from the server (`resolve_teacher_weights`:
a run's checkpoint, an upload, or a local path for external runs). Either way the file goes
through `load_teacher_state`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdlab.worker import catalog, kd
from kdlab.worker.client import ApiClient, ApiClientError
from kdlab.worker.config import RunConfig
from kdlab.worker.names import CHECKPOINT_ARTIFACTS, LATEST_FILE, STUDENT_FILE


def _given_file(path_text: str) -> Path:
    """`teacher.weights.path`: a file on this machine."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher.weights.path: no file {path.resolve()}")
    return path


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
        return _given_file(weights.path)
    assert weights.run_id is not None
    run_dir = out_root / weights.run_id
    # locally `latest` prefers a finished run's exported student (its final weights); a run
    # still training has only latest.pt. On the server `latest` is the latest.pt artifact.
    candidates = (
        [run_dir / CHECKPOINT_ARTIFACTS["best"]]
        if weights.checkpoint == "best"
        else [
            run_dir / STUDENT_FILE,
            run_dir / LATEST_FILE,
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


def resolve_teacher_weights(config: RunConfig, client: ApiClient, dest_dir: Path) -> Path | None:
    """The file with the teacher's weights, downloaded into `dest_dir` where it lives on the
    server (None when the config names none)."""
    assert config.teacher is not None
    weights = config.teacher.weights
    if weights is None:
        return None
    if weights.path is not None:
        return _given_file(weights.path)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if weights.upload_id is not None:
        dest = dest_dir / f"upload-{weights.upload_id}.safetensors"
        try:
            return client.download_upload(weights.upload_id, dest)
        except ApiClientError as err:
            raise FileNotFoundError(
                f"teacher.weights.upload_id {weights.upload_id}: cannot download it: {err}"
            ) from None
    assert weights.run_id is not None
    name = CHECKPOINT_ARTIFACTS[weights.checkpoint]
    try:
        return client.download_artifact(weights.run_id, name, dest_dir / f"{weights.run_id}-{name}")
    except ApiClientError as err:
        raise FileNotFoundError(
            f"teacher.weights.run_id {weights.run_id}: cannot download its {name}: {err}"
        ) from None


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

    from kdlab.worker.kd.serialization import METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        return METADATA_KEY in (handle.metadata() or {})


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"teacher.weights: {path} does not fit the teacher model: {err}") from None
