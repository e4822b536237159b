"""A (metric key, step) reaches MLflow once.

MLflow keeps every `log_batch` point, so the mirror dedups against MLflow itself: it keeps, per
MLflow run, the highest step of each key (read once from `get_run`, which returns each key's
latest point — the one with the highest step — then updated as it logs, and dropped after any
error). A point whose step is above that is new; for a key with any point at or below it (a
resumed run re-logging steps after its `latest` checkpoint, a worker re-sending a spooled batch,
a row retried after a chunk was sent or after a crash between MLflow's answer and `done_at`) the
key's history is fetched and the steps MLflow already has are skipped. The value in MLflow is the
first one mirrored (KD Lab's table keeps the last one written).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

Points = dict[tuple[str, int], tuple[float, int]]  # (MLflow key, step) -> (value, time in ms)


class MetricDedup:
    """Per MLflow run, each key's highest step known to be in MLflow (a cache; `clear()` it
    whenever what MLflow holds may differ from it)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}  # MLflow run id -> key -> highest step

    def clear(self) -> None:
        self._latest.clear()

    def _latest_steps(self, client: MlflowClient, mlflow_run_id: str) -> dict[str, int]:
        if mlflow_run_id not in self._latest:
            data = client.get_run(mlflow_run_id).data.to_proto()
            self._latest[mlflow_run_id] = {m.key: int(m.step) for m in data.metrics}
        return self._latest[mlflow_run_id]

    def unsent(self, client: MlflowClient, mlflow_run_id: str, points: Points) -> list[Any]:
        """The `mlflow.entities.Metric`s of `points` that MLflow does not have yet."""
        from mlflow.entities import Metric as MlflowMetric

        latest = self._latest_steps(client, mlflow_run_id)
        overlapping = {key for key, step in points if step <= latest.get(key, -1)}
        have: dict[str, set[int]] = {
            key: {int(m.step) for m in client.get_metric_history(mlflow_run_id, key)}
            for key in sorted(overlapping)
        }
        return [
            MlflowMetric(key, value, ms, step)
            for (key, step), (value, ms) in points.items()
            if step not in have.get(key, ())
        ]

    def sent(self, mlflow_run_id: str, metrics: list[Any]) -> None:
        """Record a logged chunk (call after `log_batch` succeeded)."""
        latest = self._latest.setdefault(mlflow_run_id, {})
        for metric in metrics:
            if metric.step > latest.get(metric.key, -1):
                latest[metric.key] = metric.step


__all__ = ["MetricDedup", "Points"]
