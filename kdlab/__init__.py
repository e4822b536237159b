"""KD Lab: an experiment dashboard and a hook-based engine for knowledge distillation.

One import root for everything the `kdlab` distribution installs:

- `kdlab.distill`: the ModelOpt-compatible API (`import kdlab.distill as mtd`);
- `kdlab.worker.kd`: the native engine (`from kdlab.worker import kd`);
- `kdlab.worker`: the trainer and the worker that runs dispatched runs;
- `kdlab.backend`: the service (`kdlab serve`), its REST API and pages.

In the repository `kdlab/backend`, `kdlab/worker`, `kdlab/frontend` and `kdlab/migrations` are
links to the top-level folders of those names.
"""

__version__ = "0.1.0"
