"""The MLflow side of a KD Lab run: the client, experiments (get-or-create by name, a deleted
one restored; a local store's artifacts next to it), the run (created, or found again by its
`kdlab.run_id` tag; its ids stored on the run row), its params, tags and status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from kdlab.backend.db.models import Run
from kdlab.backend.mlflow import format as fmt
from kdlab.backend.mlflow.hooks import SKIP_OPTION
from kdlab.backend.services.run_metadata import metadata
from kdlab.backend.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUNS = cast(Table, Run.__table__)
PARAM_TAG_CHUNK = 100  # MLflow's limit of params (and of tags) per log_batch
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SKIP = {SKIP_OPTION: True}


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    experiment: str
    mlflow_experiment_id: str | None
    mlflow_run_id: str | None
    created: dict[str, Any]  # a run_created payload built from the row as it is now
    state: dict[str, Any]  # a run_updated payload: the row's status/fingerprint/error now
    config: dict[str, Any]


@dataclass(frozen=True)
class Target:
    experiment_id: str
    run_id: str


def mlflow_run_url(settings: Settings, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (`KDLAB_MLFLOW_UI_URL`, else an http(s) tracking URI)."""
    base = settings.mlflow_ui_url
    if base is None and settings.resolved_mlflow_uri.startswith(("http://", "https://")):
        base = settings.resolved_mlflow_uri
    if base is None:
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _nothing() -> None:
    return None


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunStore:
    """KD Lab runs in one MLflow tracking store, with what this process has seen of it
    (`clear()` after an error: whatever MLflow did before it, the caches may be wrong)."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        tracking_uri: str,
        read_factory: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory  # writes (the MLflow ids on the run row)
        self.read_factory = read_factory or factory  # everything else
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None
        self._experiments: dict[str, str] = {}  # experiment name -> MLflow id, seen this process
        self._verified: set[str] = set()  # MLflow run ids known to exist
        self.pause: Callable[[], None] = _nothing  # between two log_batch calls of metrics

    def clear(self) -> None:
        self._verified.clear()
        self._experiments.clear()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            url = self._db_url()
            if url is not None and url.get_backend_name() == "sqlite" and url.database:
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _db_url(self) -> Any:
        """The tracking URI as a SQLAlchemy URL when MLflow talks to a database directly."""
        scheme = self.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme not in _DB_SCHEMES:
            return None
        try:
            return make_url(self.tracking_uri)
        except Exception:
            return None

    def _artifact_location(self, experiment: str) -> str | None:
        """Where a new experiment's artifacts go: next to a local store, else MLflow's choice."""
        url = self._db_url()
        if url is None:
            return None  # a tracking server (or a file store) picks its own artifact root
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            root = Path(url.database).expanduser().resolve().parent / "mlartifacts"
        else:
            root = self.settings.data_path / "mlartifacts"
        from kdlab.backend.services.artifacts import safe_filename

        return (root / safe_filename(experiment)).as_uri()

    def run_info(self, run_id: str) -> RunInfo | None:
        with self.read_factory() as session:
            run = session.get(Run, run_id)
            if run is None:
                session.rollback()
                return None
            experiment = run.experiment.name
            info = RunInfo(
                run_id=run.id,
                name=run.name,
                experiment=experiment,
                mlflow_experiment_id=run.mlflow_experiment_id,
                mlflow_run_id=run.mlflow_run_id,
                created=fmt.run_created_payload(run, experiment),
                state=fmt.run_updated_payload(
                    run.id,
                    run.status,
                    run.teacher_fingerprint,
                    run.error,
                    run.finished_at,
                    ("error",) if run.error is None else (),
                ),
                config=dict(run.config or {}),
            )
            session.rollback()
        return info

    def _experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    name,
                    artifact_location=self._artifact_location(name),
                    tags={"kdlab.experiment": name},
                )
            except MlflowException as err:  # created meanwhile by someone else
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_experiment(experiment_id)
        self._experiments[name] = experiment_id
        return experiment_id

    def ensure_run(self, run_id: str) -> tuple[Target, bool] | None:
        """The MLflow run of `run_id` (created, or found again by its `kdlab.run_id` tag, when
        the row has none or its id is unknown to this store); True if it was just resolved,
        in which case it has been described from the run row as it is now. None if the KD Lab
        run is gone."""
        from mlflow.entities import LifecycleStage, ViewType
        from mlflow.exceptions import MlflowException

        info = self.run_info(run_id)
        if info is None:
            return None
        client = self.client
        if info.mlflow_run_id and info.mlflow_experiment_id:
            if info.mlflow_run_id in self._verified:
                return Target(info.mlflow_experiment_id, info.mlflow_run_id), False
            try:
                existing = client.get_run(info.mlflow_run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                if existing.info.lifecycle_stage == LifecycleStage.DELETED:
                    client.restore_run(info.mlflow_run_id)
                self._verified.add(info.mlflow_run_id)
                return Target(info.mlflow_experiment_id, info.mlflow_run_id), False
        experiment_id = self._experiment_id(info.experiment)
        quoted = run_id.replace("\\", "\\\\").replace("'", "\\'")
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`kdlab.run_id` = '{quoted}'",
            run_view_type=ViewType.ALL,
            max_results=1,
        )
        if found:
            mlflow_run_id = found[0].info.run_id
            if found[0].info.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_run(mlflow_run_id)
        else:
            created = client.create_run(
                experiment_id,
                start_time=info.created.get("start_time_ms"),
                tags={"kdlab.run_id": run_id},
                run_name=info.name,
            )
            mlflow_run_id = created.info.run_id
        self.describe(mlflow_run_id, run_id, info.created, info.state)
        with self.factory() as session:
            session.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(
                    mlflow_experiment_id=experiment_id,
                    mlflow_run_id=mlflow_run_id,
                    updated_at=RUNS.c.updated_at,  # not a change anyone made to the run
                ),
                execution_options=SKIP,
            )
            session.commit()
        self._verified.add(mlflow_run_id)
        return Target(experiment_id, mlflow_run_id), True

    def describe(
        self, mlflow_run_id: str, run_id: str, created: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Params, tags and status of a run (idempotent: params are logged with the same
        values, tags overwrite)."""
        from mlflow.entities import Param, RunTag

        params = [Param(k, str(v)) for k, v in (created.get("params") or {}).items()]
        tag_list = [RunTag(k, str(v)) for k, v in (created.get("tags") or {}).items()]
        for chunk in chunks(params, PARAM_TAG_CHUNK):
            self.client.log_batch(mlflow_run_id, params=chunk, synchronous=True)
        for chunk in chunks(tag_list, PARAM_TAG_CHUNK):
            self.client.log_batch(mlflow_run_id, tags=chunk, synchronous=True)
        self.apply_state(mlflow_run_id, run_id, state)

    def formula_tags(self, run_id: str) -> dict[str, str]:
        """`kd.pair.<i>.formula` from the metadata the worker logged for the run so far (the
        last attempt's winning); empty until the trainer logged its loss."""
        with self.read_factory() as session:
            logged = metadata(session, run_id)
            session.rollback()
        return fmt.formula_tags(logged)

    def apply_state(self, mlflow_run_id: str, run_id: str, state: dict[str, Any]) -> None:
        """Status tags and MLflow status of a run, and each pair's formula once the worker
        logged it (so a run gets its formulas with the first status change mirrored after its
        trainer started, at the latest with its terminal status)."""
        from mlflow.entities import RunTag

        status = str(state.get("status") or "queued")
        tags = [RunTag("kdlab.status", status)]
        if state.get("teacher_fingerprint"):
            tags.append(RunTag("kdlab.teacher_fingerprint", str(state["teacher_fingerprint"])))
        error = state.get("error")
        if error:
            tags.append(RunTag("kdlab.error", fmt.truncate(str(error), fmt.TAG_VALUE_MAX, "tail")))
        elif "error" in (state.get("changed") or []):
            tags.append(RunTag("kdlab.error", ""))
        tags.extend(RunTag(k, v) for k, v in self.formula_tags(run_id).items())
        for chunk in chunks(tags, PARAM_TAG_CHUNK):
            self.client.log_batch(mlflow_run_id, tags=chunk, synchronous=True)
        mlflow_status = fmt.STATUS_MAP.get(status, "RUNNING")
        if mlflow_status in fmt.TERMINAL:
            end = state.get("finished_at_ms") or int(time.time() * 1000)
            self.client.set_terminated(mlflow_run_id, mlflow_status, end_time=int(end))
        else:
            self.client.update_run(mlflow_run_id, status=mlflow_status)


__all__ = ["RunInfo", "RunStore", "Target", "mlflow_run_url"]
