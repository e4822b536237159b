"""The worker's heartbeat thread: keeps the run's lease alive and notices a cancel request."""

from __future__ import annotations

import threading

from kdlab.worker.client import ApiClient, ApiClientError
from kdlab.worker.echo import Echo
from kdlab.worker.stop_signals import WorkerStop


class Heartbeat:
    """Posts a heartbeat every `interval` s; a cancel request (or a run that finished on the
    server) sets the stop flag."""

    def __init__(self, client: ApiClient, flag: WorkerStop, interval: float, echo: Echo):
        self.client = client
        self.flag = flag
        self.interval = interval
        self.echo = echo
        self.cancel_requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdlab-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.client.timeout + 5)

    def beat(self) -> None:
        try:
            answer = self.client.heartbeat(attempts=1)
        except ApiClientError as err:  # 409: finished on the server; 404: deleted; 403: token
            if not self.flag.requested:
                self.echo(f"heartbeat refused ({err}); stopping")
            self.flag.stop(f"heartbeat refused: {err}", cancel=err.run_ended)
            return
        except Exception as err:  # the server is away: keep training, try again next beat
            if not self._failing:
                self.echo(f"heartbeat failed ({err}); training goes on, retrying")
            self._failing = True
            return
        self._failing = False
        if answer.get("cancel_requested") and not self.cancel_requested:
            self.cancel_requested = True
            self.echo("cancel requested: writing latest.pt and stopping")
            self.flag.stop("cancel requested", cancel=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
