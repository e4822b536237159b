"""Does the `kdlab serve --demo` story hold? The demo's three runs, for several seeds.

    python benchmarks/demo_kd_story.py [--seeds 0 1 2 3 4] [--out DIR] [--threads 1]

For each seed, the three configs of `kdlab.backend.services.dispatch.demo_configs` (teacher,
student-alone baseline, KD student distilled from that teacher's `best` checkpoint) are
trained one after another through `kdlab.worker.local_run.run_local`, exactly as `kdlab train`
runs them, with only `seed` changed (seed 0 is the demo's own). The seed chooses the
train/val split, the labelled subset, the initialisation and the data order. Prints one row
per seed (final `eval/student_acc` of each run, as the compare page shows it, and the gap
KD − alone), then mean ± std over seeds, then one JSON line with everything.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kdlab.backend.services.dispatch import DEMO_BASELINE, DEMO_KD, DEMO_TEACHER, demo_configs
from kdlab.worker.local_run import run_local

ACC = "eval/student_acc"
Configs = Callable[[str], dict[str, dict[str, Any]]]


def _quiet(line: str) -> None:
    pass


def run_seed(seed: int, out_root: Path, configs: Configs = demo_configs) -> dict[str, float]:
    """Train the demo's three runs for `seed` under `out_root`; their final accuracies."""
    out_root.mkdir(parents=True, exist_ok=True)
    by_name = copy.deepcopy(configs(DEMO_TEACHER))  # run_local finds the teacher by its name
    row: dict[str, float] = {"seed": seed}
    for name, column in ((DEMO_TEACHER, "teacher"), (DEMO_BASELINE, "alone"), (DEMO_KD, "kd")):
        config = {**by_name[name], "seed": seed}
        path = out_root / f"{name}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        started = time.perf_counter()
        result = run_local(path, out_root, echo=_quiet)
        row[column] = result.metrics[ACC]
        row[f"{column}_s"] = time.perf_counter() - started
    row["gap"] = row["kd"] - row["alone"]
    return row


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def table(rows: list[dict[str, float]]) -> str:
    lines = ["seed  teacher  alone   kd      gap (kd − alone)  seconds (t/a/kd)"]
    for r in rows:
        lines.append(
            f"{int(r['seed']):>4}  {r['teacher']:.4f}   {r['alone']:.4f}  {r['kd']:.4f}  "
            f"{r['gap']:+.4f}           {r['teacher_s']:.1f}/{r['alone_s']:.1f}/{r['kd_s']:.1f}"
        )
    cols = ("teacher", "alone", "kd", "gap")
    lines.append("mean ± std: " + ", ".join(f"{c} {_mean_std([r[c] for r in rows])}" for c in cols))
    lines.append(
        f"KD beats alone on {sum(r['gap'] > 0 for r in rows)}/{len(rows)} seeds; "
        f"smallest gap {min(r['gap'] for r in rows):+.4f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kd-story-") as tmp:
        root = args.out or Path(tmp)
        rows = []
        for seed in args.seeds:
            rows.append(run_seed(seed, root / f"seed{seed}"))
            r = rows[-1]
            print(f"seed {seed}: teacher {r['teacher']:.4f} alone {r['alone']:.4f} "
                  f"kd {r['kd']:.4f} gap {r['gap']:+.4f}", flush=True)  # fmt: skip
    print(table(rows))
    print(
        json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})
    )


if __name__ == "__main__":
    main()
