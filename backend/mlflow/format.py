"""What a KD Lab run becomes in MLflow, as pure functions of its values: params (the flattened
config), tags (kind, status, the KD conventions of the config, each pair loss's formula), names
MLflow accepts, and the outbox payloads (`run_created_payload` etc.) that the hooks
(`kdlab.backend.mlflow.hooks`) queue and the mirror rebuilds when it re-creates an MLflow run.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from kdlab.backend.db.models import Artifact, Run

log = logging.getLogger(__name__)

PARAM_VALUE_MAX = 500  # MLflow < 2.x limit; current servers take 6000, 500 fits every server
KEY_MAX = 250  # MLflow's limit on param, tag and metric keys
TAG_VALUE_MAX = 5000  # MLflow takes 8000 (5000 on older servers)
TRUNCATED = "...[truncated]"

# --------------------------------------------------------------------------- small helpers


def _epoch_ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int(value.timestamp() * 1000)


def truncate(text: str, limit: int, keep: str = "head") -> str:
    """`text` cut to `limit` characters with a visible marker; `keep="tail"` keeps the end
    (a traceback's last lines are the useful ones)."""
    if len(text) <= limit:
        return text
    if keep == "tail":
        return TRUNCATED + text[len(text) - (limit - len(TRUNCATED)) :]
    return text[: limit - len(TRUNCATED)] + TRUNCATED


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def mlflow_key(key: str) -> str:
    """A name MLflow accepts for a KD Lab param, tag or metric key.

    MLflow allows letters, digits, `_ - . / space` (and `:` off Windows) and refuses names that a
    path normalisation would change. KD Lab's pair metrics use `~` (`train/kd/fc~fc`); it becomes
    `-to-` (`train/kd/fc-to-fc`). Any other refused character becomes `_`, empty or `.`/`..` path
    parts are dropped, and keys over 250 characters are cut (with a short hash, so they stay
    distinct).
    """
    mapped = _BAD_KEY_CHARS.sub("_", key.replace("~", "-to-"))
    parts = [p if p != ".." else "_.." for p in mapped.split("/") if p not in ("", ".")]
    result = "/".join(parts) or "_"
    if len(result) > KEY_MAX:
        import hashlib

        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        result = result[: KEY_MAX - 9] + "_" + digest
    return result


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: nested keys dot-joined (`train.optimizer.lr`), list items of
    dicts indexed (`distill.pairs.0.loss.name`), lists of scalars and empty containers as JSON
    (`student.params.hidden = [64]`), strings as is, other scalars as JSON (`true`, `null`,
    `0.001`); values over 500 characters cut with a `...[truncated]` marker."""
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif (
            isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value)
        ):
            for index, item in enumerate(value):
                walk(item, f"{path}.{index}" if path else str(index))
        elif path:
            text = _scalar_text(value)
            out[mlflow_key(path)] = truncate(text, PARAM_VALUE_MAX)

    walk(config, prefix)
    return out


def _loss_class(name: str) -> type[Any] | None:
    """The engine's loss class registered as `name` (None for a name it does not know, such as
    an external run's)."""
    try:
        from kdlab.worker.kd.losses import LOSSES

        return LOSSES[name]
    except Exception:
        return None


def _loss_defaults(name: str) -> dict[str, Any]:
    """The loss class's keyword defaults (the effective values when a param is left out)."""
    cls = _loss_class(name)
    if cls is None:  # an unknown loss name (external runs) has no defaults
        return {}
    from kdlab.worker.kd.losses import loss_parameters

    return {
        p.name: p.default for p in loss_parameters(cls) if p.default is not inspect.Parameter.empty
    }


def _number(value: Any) -> str:
    return _scalar_text(value)


def _t2_convention(name: str, params: Mapping[str, Any]) -> str | None:
    """How a temperature-based loss's scale depends on T², as the loss class declares it
    (`KDLoss.t2_scaling`: "always", "never", or "switchable" by its `scale_by_t2` param).
    None for a loss without a temperature, or one the engine does not know."""
    cls = _loss_class(name)
    scaling = getattr(cls, "t2_scaling", None)
    if cls is None or scaling is None or "temperature" not in params:
        return None
    temperature = params.get("temperature")
    t_text = f"T={_number(temperature)}" if temperature is not None else ""
    if scaling == "switchable":
        if params.get("scale_by_t2", True) is False:
            return f"{cls.__name__} does not multiply by T² (scale_by_t2=false, {t_text})"
        factor = f", factor {_number(float(temperature) ** 2)}" if temperature is not None else ""
        return f"{cls.__name__} multiplies by T² ({t_text}{factor})"
    if scaling == "always":
        return f"{cls.__name__} multiplies by T² ({t_text})"
    if scaling == "never":
        return f"{cls.__name__} has no T² factor ({t_text})"
    return None


def kd_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the KD conventions a config uses (empty for train and external runs).

    `kd.student`, `kd.teacher`, `kd.teacher.weights`; `kd.losses` (loss names in pair order),
    `kd.pairs` (`student~teacher` layers, `output` for the model output), `kd.temperatures`
    (effective temperature per temperature-based pair), `kd.t2_convention` (e.g. "LogitsKL
    multiplies by T² (T=4.0, factor 16.0)"), `kd.pair.<i>.loss` / `kd.pair.<i>.params`;
    `kd.balancer` and `kd.balancer.<param>` (e.g. `kd.balancer.kd_weight = 0.7`);
    `kd.teacher_input_adapter`.
    """
    tags: dict[str, str] = {}
    student = config.get("student")
    if isinstance(student, Mapping) and student.get("name"):
        tags["kd.student"] = str(student["name"])
    teacher = config.get("teacher")
    if isinstance(teacher, Mapping):
        if teacher.get("name"):
            tags["kd.teacher"] = str(teacher["name"])
        weights = teacher.get("weights")
        if isinstance(weights, Mapping):
            if weights.get("run_id"):
                tags["kd.teacher.weights"] = (
                    f"run {weights['run_id']} ({weights.get('checkpoint', 'best')})"
                )
            elif weights.get("upload_id"):
                tags["kd.teacher.weights"] = f"upload {weights['upload_id']}"
    distill = config.get("distill")
    if not isinstance(distill, Mapping):
        return tags
    pairs = [p for p in distill.get("pairs") or [] if isinstance(p, Mapping)]
    names: list[str] = []
    layers: list[str] = []
    temperatures: list[str] = []
    conventions: list[str] = []
    for index, pair in enumerate(pairs):
        loss = pair.get("loss") if isinstance(pair.get("loss"), Mapping) else {}
        assert isinstance(loss, Mapping)
        name = str(loss.get("name", "logits_kl"))
        given = loss.get("params") if isinstance(loss.get("params"), Mapping) else {}
        assert isinstance(given, Mapping)
        params = {**_loss_defaults(name), **given}
        names.append(name)
        layers.append(
            f"{pair.get('student_layer') or 'output'}~{pair.get('teacher_layer') or 'output'}"
        )
        if "temperature" in params:
            temperatures.append(_number(params["temperature"]))
        convention = _t2_convention(name, params)
        if convention:
            conventions.append(convention if len(pairs) == 1 else f"pair {index}: {convention}")
        tags[f"kd.pair.{index}.loss"] = name
        tags[f"kd.pair.{index}.layers"] = layers[-1]
        tags[f"kd.pair.{index}.params"] = _scalar_text(params)
    tags["kd.losses"] = ",".join(names)
    tags["kd.pairs"] = ",".join(layers)
    if temperatures:
        tags["kd.temperatures"] = ",".join(temperatures)
    if conventions:
        tags["kd.t2_convention"] = "; ".join(conventions)
    balancer = distill.get("balancer")
    if isinstance(balancer, Mapping):
        tags["kd.balancer"] = str(balancer.get("name", "static"))
        for key, value in (balancer.get("params") or {}).items():
            tags[mlflow_key(f"kd.balancer.{key}")] = _scalar_text(value)
    adapter = distill.get("teacher_input_adapter")
    tags["kd.teacher_input_adapter"] = (
        str(adapter.get("name")) if isinstance(adapter, Mapping) else "none"
    )
    return {key: truncate(value, TAG_VALUE_MAX) for key, value in tags.items()}


# --------------------------------------------------------------------------- payloads


def run_created_payload(run: Run, experiment_name: str) -> dict[str, Any]:
    """What the mirror needs to create the MLflow run: names, params, tags, start time."""
    config = run.config or {}
    tags = {
        "kdlab.run_id": run.id,
        "kdlab.kind": run.kind,
        "kdlab.experiment": experiment_name,
        "kdlab.status": run.status,
    }
    if run.teacher_run_id:
        tags["kdlab.teacher_run_id"] = run.teacher_run_id
    if run.cloned_from:
        tags["kdlab.cloned_from"] = run.cloned_from
    try:
        tags.update(kd_tags(config))
        params = flatten_params(config)
    except Exception as err:  # never let a payload break the transaction that made the run
        log.exception("outbox: could not describe run %s for MLflow", run.id)
        params = {}
        tags["kdlab.mirror_note"] = truncate(f"params/tags not derived: {err!r}", TAG_VALUE_MAX)
    return {
        "experiment": experiment_name,
        "name": run.name,
        "kind": run.kind,
        "status": run.status,
        "start_time_ms": _epoch_ms(run.created_at) or int(time.time() * 1000),
        "params": params,
        "tags": tags,
    }


def run_updated_payload(
    run_id: str,
    status: str,
    teacher_fingerprint: str | None,
    error: str | None,
    finished_at: datetime | None,
    changed: Iterable[str],
) -> dict[str, Any]:
    """A snapshot of the watched columns (and which of them changed)."""
    return {
        "status": status,
        "teacher_fingerprint": teacher_fingerprint,
        "error": error,
        "finished_at_ms": _epoch_ms(finished_at),
        "changed": sorted(changed),
    }


def student_payload(artifact: Artifact) -> dict[str, Any]:
    return {
        "artifact_id": artifact.id,
        "name": artifact.name,
        "path": artifact.path,
        "sha256": artifact.sha256,
        "size": artifact.size,
    }


def formula_tags(metadata: Mapping[str, Any]) -> dict[str, str]:
    """`kd.pair.<i>.formula`: each pair loss's formula as the trainer wrote it into the run's
    metadata (`metadata["loss"]["kd"]["terms"][i]["formula"]`: the loss's own `describe()`, set
    up for the shapes it trained on). Empty while the worker has not logged it yet, and for
    train and external runs."""
    loss = metadata.get("loss")
    kd = loss.get("kd") if isinstance(loss, Mapping) else None
    terms = kd.get("terms") if isinstance(kd, Mapping) else None
    tags: dict[str, str] = {}
    for index, term in enumerate(terms if isinstance(terms, list) else []):
        formula = term.get("formula") if isinstance(term, Mapping) else None
        if isinstance(formula, str) and formula:
            tags[f"kd.pair.{index}.formula"] = truncate(formula, TAG_VALUE_MAX)
    return tags


STATUS_MAP = {
    "queued": "SCHEDULED",
    "starting": "RUNNING",
    "running": "RUNNING",
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})

__all__ = [
    "KEY_MAX",
    "PARAM_VALUE_MAX",
    "STATUS_MAP",
    "TAG_VALUE_MAX",
    "TERMINAL",
    "TRUNCATED",
    "flatten_params",
    "formula_tags",
    "kd_tags",
    "mlflow_key",
    "run_created_payload",
    "run_updated_payload",
    "student_payload",
    "truncate",
]
