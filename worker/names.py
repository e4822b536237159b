"""Names the worker, the trainer and the service share: run statuses and the files of a run.

A leaf module (it imports nothing of the project), so the engine's users, the worker and the
backend can all read these from one place.
"""

from __future__ import annotations

from typing import Literal, get_args

RunStatus = Literal["queued", "starting", "running", "succeeded", "failed", "cancelled"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "starting", "running"})
FINISHED_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# the data dir's layout, shared by the server (`Settings.data_dir`) and its workers
# (`KDLAB_DATA_DIR`), so a local worker finds the files the server validated
DEFAULT_DATA_DIR = "~/.kdlab"
DATASETS_DIR = "datasets"  # file-backed datasets, the data root: <data dir>/datasets
WORK_DIR = "work"  # local workers' scratch directories: <data dir>/work/<run id>

# the server's 401 detail for a run token revoked when its run finished (kdlab.backend.services.auth
# sends it, kdlab.worker.client recognises it)
RUN_FINISHED_DETAIL = "this run's token was revoked when the run finished"

# the files a run writes into its directory (and uploads as artifacts of the same names)
STUDENT_FILE = "student.safetensors"  # the exported student, at the end
BEST_FILE = "best.safetensors"  # the best evaluation's student so far
LATEST_FILE = "latest.pt"  # the exact-resume training state
METRICS_FILE = "metrics.jsonl"  # every metric point, one JSON line each
METADATA_FILE = "metadata.json"  # run metadata: config hash, loss formula, fingerprints

# the run artifact a `teacher.weights.checkpoint` names (a run's weights on the server)
CHECKPOINT_ARTIFACTS: dict[str, str] = {"best": BEST_FILE, "latest": LATEST_FILE}

# a worker's metadata reaches the server as log lines `metadata {json}` (kdlab.worker.http_sink)
METADATA_LOG_PREFIX = "metadata "
