"""The one path from a config to a ready trainer, shared by `kdlab train` (`local_run`) and the
dispatched worker (`run`): data → teacher weights → sinks → `Trainer`.

The callers differ only in where the teacher's weights file comes from (`weights_file`), which
sinks they add to the metrics file and the console (`extra_sinks`, built once the teacher is
loaded), and how the run stops; both then call `trainer.fit()` themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kdlab.worker import catalog
from kdlab.worker.config import RunConfig
from kdlab.worker.console_sink import ConsoleSink
from kdlab.worker.echo import Echo
from kdlab.worker.metrics import JsonlSink, MetricSink, MultiSink
from kdlab.worker.names import METRICS_FILE
from kdlab.worker.teacher_weights import load_teacher_state
from kdlab.worker.trainer import Trainer


class TrainingPipeline:
    """Builds the trainer of `config` into `out_dir`; `sink` (once built) is the run's
    `MultiSink`: `metrics.jsonl`, the console, then the extra sinks. Close it with `close()`,
    also when `build` failed half-way."""

    def __init__(self, config: RunConfig, out_dir: Path, echo: Echo):
        self.config = config
        self.out_dir = out_dir
        self.echo = echo
        self.sink: MultiSink | None = None
        self.trainer: Trainer | None = None

    def build(
        self,
        weights_file: Callable[[], Path | None],
        *,
        weights_label: Callable[[Path], str] = str,
        extra_sinks: Callable[[], Sequence[MetricSink]] = tuple,
        device: str | None = None,
        data_root: Path | None = None,
        should_stop: Callable[[int], bool] | None = None,
        resume_from: Path | None = None,
        checkpoint_every_steps: int | None = None,
    ) -> Trainer:
        config = self.config
        data = catalog.build_dataset(config.dataset, config.seed, data_root)
        teacher_state = None
        if config.kind == "distill":
            weights = weights_file()
            if weights is not None:
                self.echo(f"teacher weights: {weights_label(weights)}")
                teacher_state = load_teacher_state(config, weights, data.info)
        extras = tuple(extra_sinks())  # first: one that fails leaves no file open
        self.sink = MultiSink(
            JsonlSink(self.out_dir / METRICS_FILE), ConsoleSink(self.echo), *extras
        )
        self.trainer = Trainer(
            config,
            self.out_dir,
            self.sink,
            teacher_state,
            device,
            data=data,
            data_root=data_root,
            should_stop=should_stop,
            resume_from=resume_from,
            checkpoint_every_steps=checkpoint_every_steps,
        )
        return self.trainer

    def close_metrics_file(self) -> None:
        """Flush and close `metrics.jsonl` (before uploading it); the other sinks stay open."""
        if self.sink is not None:
            self.sink.sinks[0].close()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
