"""`kdlab train`: the console script end to end, and the local driver's teacher/resume handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.backend.cli import build_parser, main
from kdlab.worker import catalog, kd, local_run
from kdlab.worker.config import load_run_config
from kdlab.worker.metrics import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
_SCRIPT = Path(sys.executable).with_name("kdlab")  # the console script of this environment
KDLAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kdlab.backend.cli"]

DESIGN_KD_METRICS = {
    "train/loss_total",
    "train/loss_student",
    "train/kd/output~output",
    "train/kd_weighted/output~output",
    "train/lr",
    "train/grad_norm",
    "sys/step_time_ms",
    "eval/student_acc",
    "eval/teacher_acc",
    "eval/agreement",
    "eval/kl",
    "eval/exported_student_acc",
}


def kdlab(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*KDLAB, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def write_config(path: Path, example: str, **overrides: Any) -> Path:
    """examples/<example>.yaml with top-level/nested overrides, written to `path`."""
    data = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kdlab train` the digits teacher, then the KD example, through the console script."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("digits-teacher", "digits-kd"):
        proc = kdlab("train", EXAMPLES / f"{name}.yaml", "--out", out)
        assert proc.returncode == 0, proc.stderr
        (out / f"{name}.stdout").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_console_script_trains_teacher_then_distils(cli_runs: Path) -> None:
    teacher_dir, kd_dir = cli_runs / "digits-teacher", cli_runs / "digits-kd"
    for run in (teacher_dir, kd_dir):
        for name in ("config.json", "metrics.jsonl", "metadata.json", "latest.pt"):
            assert (run / name).is_file(), f"{run.name}/{name}"
        assert (run / "student.safetensors").is_file() and (run / "best.safetensors").is_file()

    points = read_jsonl(kd_dir / "metrics.jsonl")
    keys = {p["key"] for p in points}
    assert keys >= DESIGN_KD_METRICS
    assert {p["key"] for p in points if p["step"] == 0} == {"eval/teacher_acc"}
    final = {p["key"]: p["value"] for p in points}
    assert final["eval/student_acc"] >= 0.93
    assert final["eval/exported_student_acc"] == final["eval/student_acc"]

    # the KD run used the teacher run's best checkpoint
    config = load_run_config(EXAMPLES / "digits-kd.yaml")
    assert config.teacher is not None
    info = catalog.build_dataset(config.dataset, config.seed).info
    teacher = kd.restore(
        catalog.build_model(config.teacher, info), teacher_dir / "best.safetensors"
    )
    meta = yaml.safe_load((kd_dir / "metadata.json").read_text())
    assert meta["teacher_fingerprint"] == kd.fingerprint(teacher)
    assert kd.load_metadata(kd_dir / "student.safetensors")[
        "teacher_fingerprint"
    ] == kd.fingerprint(teacher)

    stdout = (cli_runs / "digits-kd.stdout").read_text()
    assert "loss: total = 0.3·[cross_entropy" in stdout
    assert "epoch 20 step 460/460 | eval | " in stdout and "teacher_acc" in stdout
    assert f"done: {kd_dir / 'student.safetensors'}" in stdout


@pytest.mark.slow
def test_existing_run_needs_resume(cli_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(EXAMPLES / "digits-kd.yaml"), "--out", str(cli_runs)]) == 1
    assert "already holds run 'digits-kd'; pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_teacher_by_path_and_by_latest(cli_runs: Path, tmp_path: Path) -> None:
    teacher_file = cli_runs / "digits-teacher" / "best.safetensors"
    by_path = write_config(
        tmp_path / "by-path.yaml",
        "digits-kd",
        teacher={"weights": {"path": str(teacher_file)}},
        train={"epochs": 1},
    )
    assert main(["train", str(by_path), "--out", str(tmp_path)]) == 0
    by_latest = write_config(
        tmp_path / "by-latest.yaml",
        "digits-kd",
        name="kd-latest",
        teacher={"weights": {"run_id": "digits-teacher", "checkpoint": "latest"}},
        train={"epochs": 1},
    )
    assert main(["train", str(by_latest), "--out", str(cli_runs)]) == 0
    # `latest` of a finished run is its final export
    meta = yaml.safe_load((cli_runs / "kd-latest" / "metadata.json").read_text())
    config = load_run_config(by_latest)
    assert config.teacher is not None
    info = catalog.build_dataset(config.dataset, config.seed).info
    final = kd.restore(
        catalog.build_model(config.teacher, info),
        cli_runs / "digits-teacher" / "student.safetensors",
    )
    assert meta["teacher_fingerprint"] == kd.fingerprint(final)


def test_missing_teacher_run_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(EXAMPLES / "digits-kd.yaml"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kdlab train: error: teacher.weights.run_id 'digits-teacher'")
    assert "train it first" in err and "Traceback" not in err


def test_invalid_config_lists_json_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_config(tmp_path / "bad.yaml", "digits-student", train={"epochs": 0, "lr": 1})
    assert main(["train", str(bad), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "train.epochs" in err and "train.lr" in err


@pytest.mark.slow
def test_stop_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "s.yaml", "digits-student", train={"epochs": 2, "log_every": 5}
    )
    args = ["train", str(config), "--out", str(tmp_path / "runs")]
    with monkeypatch.context() as m:  # as if Ctrl-C arrived during step 30
        m.setattr(local_run.StopFlag, "__call__", lambda self, step: step == 30)
        assert main(args) == 130
    run = tmp_path / "runs" / "digits-student"
    assert "stopped at step 30; continue with --resume" in capsys.readouterr().out
    assert not (run / "student.safetensors").exists()
    assert torch.load(run / "latest.pt", weights_only=True)["global_step"] == 30

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'latest.pt'}" in out
    steps = [p["step"] for p in read_jsonl(run / "metrics.jsonl") if p["key"] == "train/loss_total"]
    assert steps == [*range(5, 46, 5), 46]  # 23 steps/epoch × 2, no step logged twice
    assert (run / "student.safetensors").is_file()


def test_parser_has_train_and_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["train", "c.yaml"])
    assert (args.command, args.config, args.out, args.resume) == (
        "train",
        Path("c.yaml"),
        Path("runs"),
        False,
    )
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
