"""ModelOpt's distillation quick start, run as written against the installed `kdlab.distill`.

The page (modelopt-distill-quickstart.rst, NVIDIA's Apache-2.0 doc, copied unchanged) is read
here; its `.. code-block:: python` blocks run in order in the wheel's venv with exactly two
edits: its import line becomes `import kdlab.distill as mtd`, and the page's own slip (it
defines `train_loader` and loops over `train_dataloader`) is fixed. The names the page leaves
to the reader come from quickstart_harness.py (real torchvision models and real tensors).
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.packaging.conftest import WheelVenv

HERE = Path(__file__).resolve().parent
SEED = HERE / "modelopt-distill-quickstart.rst"
HARNESS = HERE / "quickstart_harness.py"
MODELOPT_IMPORT = "import modelopt.torch.distill as mtd"
KDLAB_IMPORT = "import kdlab.distill as mtd"
SLIP = "for input, labels in train_dataloader:"
SLIP_FIXED = "for input, labels in train_loader:"


def code_blocks(rst: str) -> list[str]:
    """The bodies of the `.. code-block:: python` directives, dedented, in order."""
    lines = rst.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)\.\. code-block::\s*python\s*$", lines[i])
        i += 1
        if not match:
            continue
        indent = len(match.group(1))
        # the directive's options (":emphasize-lines: 14"), then the body
        while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):
            i += 1
        body = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


def quickstart_for_kdlab() -> list[str]:
    blocks = code_blocks(SEED.read_text())
    assert len(blocks) == 4, f"the quick start has 4 python blocks, found {len(blocks)}"
    lines = [line for block in blocks for line in block.splitlines()]
    assert [line.strip() for line in lines].count(MODELOPT_IMPORT) == 1
    assert [line.strip() for line in lines].count(SLIP) == 1
    assert sum("train_dataloader" in line for line in lines) == 1

    def edit(line: str) -> str:
        if line.strip() == MODELOPT_IMPORT:
            return line.replace(MODELOPT_IMPORT, KDLAB_IMPORT)
        if line.strip() == SLIP:
            return line.replace(SLIP, SLIP_FIXED)
        return line

    edited = ["\n".join(edit(line) for line in block.splitlines()) + "\n" for block in blocks]
    assert not any("modelopt" in block for block in edited)
    return edited


def test_the_code_blocks_are_read_and_edited_as_intended():
    """Cheap: the extraction and the two edits, without the venv."""
    blocks = quickstart_for_kdlab()
    assert blocks[0].startswith("from torchvision.models import resnet50, resnet18\n")
    assert KDLAB_IMPORT in blocks[1].splitlines()
    assert "mtd.convert(student_model" in blocks[1]
    assert SLIP_FIXED in blocks[2] and "compute_kd_loss(student_loss=loss)" in blocks[2]
    assert blocks[3] == "model = mtd.export(distillation_model)\n"


@pytest.mark.slow
def test_modelopt_quickstart_runs_on_the_installed_kdlab_distill(
    wheel_venv: WheelVenv, tmp_path: Path
):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(HARNESS, work / HARNESS.name)
    (work / "blocks.json").write_text(json.dumps(quickstart_for_kdlab()))
    result = wheel_venv.run(
        wheel_venv.python,
        "-I",  # neither the cwd nor the script's folder on sys.path: only the venv
        work / HARNESS.name,
        work / "blocks.json",
        work,
        work / "report.json",
        cwd=work,
        timeout=180,
    )
    assert result.returncode == 0, f"the quick start failed:\n{result.stdout}\n{result.stderr}"
    check_report(json.loads((work / "report.json").read_text()))


def check_report(report: dict) -> None:
    """What a user would check after running the quick start (quickstart_harness.py's report)."""
    # the loop went through every batch and every combined loss is a number
    assert report["batches"] == 3
    assert report["inputs_seen"] == 3 and report["inputs_match_loader"]
    assert len(report["losses"]) == 3 and report["losses_finite"], report["losses"]

    # the student learns: every parameter got a finite gradient (the page's loop has no
    # optimizer step, so its parameters stay put: the gradients and the train-mode batch-norm
    # statistics are what changes)
    student = report["student"]
    assert student["same_names"], "the student's parameters are not resnet18's"
    assert student["missing_grads"] == [] and student["finite_grads"], student
    assert student["nonzero_grads"] > student["parameters"] // 2, student
    assert {"bn1.running_mean", "layer4.1.bn2.running_var"} <= set(student["changed_state"]), (
        "the student did not run in train mode"
    )

    # the teacher is the loaded resnet50, untouched, and no gradient reaches it
    teacher = report["teacher"]
    assert teacher["count"] == 1, "no (or more than one) resnet50 teacher in the meta model"
    assert teacher["changed_parameters"] == [], teacher
    assert teacher["changed_buffers"] == [], "the teacher ran in train mode"
    assert teacher["with_grad"] == [], teacher

    # export gives back a plain torchvision ResNet-18 carrying the trained student, no teacher
    exported = report["export"]
    assert exported["is_torchvision_resnet"], exported["type"]
    assert exported["same_state_keys_as_resnet18"], exported
    assert exported["parameter_count"] == exported["resnet18_parameter_count"]
    assert exported["bottleneck_modules"] == 0
    assert exported["modules_outside_children"] == []
    assert exported["hooks"] == 0
    assert exported["keeps_trained_state"]
    assert exported["logits_shape"] == [2, 1000]
