"""Runs the code blocks of ModelOpt's distillation quick start, in order, in one namespace.

Run by test_modelopt_quickstart.py with the wheel venv's python (a script, not a test module):

    python quickstart_harness.py BLOCKS.json WORK_DIR REPORT.json

The quick start leaves three names to the reader; this harness defines them with real data:
`pretrained_weights` (a seeded torchvision resnet50 saved to disk and loaded back),
`get_train_loader` (a DataLoader over a few batches of small random images with labels) and
`get_user_loss_fn` (cross-entropy). It records what a user would look at and writes a JSON
report: the batches the training loop went through, every `loss_total`, the student's
gradients and state, the teacher's parameters, and what `mtd.export` returned.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import Bottleneck, ResNet

BATCHES, BATCH_SIZE, IMAGE_SIZE, CLASSES = 3, 2, 32, 1000


class Recorder(dict):
    """The training block's locals: every value bound to each name, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: dict[str, list[Any]] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        self.bound.setdefault(name, []).append(value)
        super().__setitem__(name, value)


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def changed(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in before if k not in after or not torch.equal(before[k], after[k]))


def main(blocks_path: str, work_dir: str, report_path: str) -> None:
    blocks: list[str] = json.loads(Path(blocks_path).read_text())
    work = Path(work_dir)

    torch.manual_seed(0)
    weights_file = work / "resnet50-teacher.pt"
    torch.save(torchvision.models.resnet50().state_dict(), weights_file)
    pretrained_weights = torch.load(weights_file, weights_only=True)
    teacher_reference = snapshot(pretrained_weights)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCHES * BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCHES * BATCH_SIZE,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE)

    namespace: dict[str, Any] = {
        "__name__": "__quickstart__",
        "pretrained_weights": pretrained_weights,
        "get_train_loader": lambda: loader,
        "get_user_loss_fn": lambda: torch.nn.CrossEntropyLoss(),
    }
    setup, meta_model, training, export = blocks

    exec(compile(setup, "quickstart-block-1", "exec"), namespace)
    student = namespace["student_model"]
    student_before = snapshot(student.state_dict())

    exec(compile(meta_model, "quickstart-block-2", "exec"), namespace)
    distillation_model = namespace["distillation_model"]
    teachers = [
        m
        for m in distillation_model.modules()
        if isinstance(m, ResNet) and isinstance(m.layer1[0], Bottleneck)
    ]

    recorder = Recorder()
    exec(compile(training, "quickstart-block-3", "exec"), namespace, recorder)
    namespace.update(recorder)
    losses = [float(t.detach()) for t in recorder.bound.get("loss_total", [])]
    inputs = recorder.bound.get("input", [])
    # the student's own parameters: ModelOpt converts the student in place, so its modules
    # then include the teacher's
    teacher_ids = {id(p) for t in teachers for p in t.parameters()}
    student_params = {n: p for n, p in student.named_parameters() if id(p) not in teacher_ids}
    missing_grads = sorted(n for n, p in student_params.items() if p.grad is None)
    finite_grads = all(
        bool(torch.isfinite(p.grad).all()) for p in student_params.values() if p.grad is not None
    )
    nonzero_grads = sum(
        1 for p in student_params.values() if p.grad is not None and bool(p.grad.any())
    )
    student_after = snapshot({k: v for k, v in student.state_dict().items() if k in student_before})
    teacher_report: dict[str, Any] = {"count": len(teachers)}
    if len(teachers) == 1:
        teacher = teachers[0]
        params = dict(teacher.named_parameters())
        teacher_report.update(
            changed_parameters=changed({k: teacher_reference[k] for k in params}, params),
            changed_buffers=changed(
                {k: teacher_reference[k] for k, _ in teacher.named_buffers()},
                dict(teacher.named_buffers()),
            ),
            with_grad=sorted(n for n, p in params.items() if p.grad is not None),
        )

    exec(compile(export, "quickstart-block-4", "exec"), namespace)
    model = namespace["model"]
    fresh_resnet18 = torchvision.models.resnet18()
    modules_in_dict = sorted(k for k, v in vars(model).items() if isinstance(v, torch.nn.Module))
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    model.eval()
    with torch.no_grad():
        logits = model(images[:BATCH_SIZE])

    report = {
        "batches": len(loader),
        "inputs_seen": len(inputs),
        "inputs_match_loader": len(inputs) == len(loader)
        and all(
            torch.equal(x, images[i * BATCH_SIZE : (i + 1) * BATCH_SIZE])
            for i, x in enumerate(inputs)
        ),
        "losses": losses,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "student": {
            "parameters": len(student_params),
            "missing_grads": missing_grads,
            "finite_grads": finite_grads,
            "nonzero_grads": nonzero_grads,
            "same_names": sorted(student_params)
            == sorted(n for n, _ in fresh_resnet18.named_parameters()),
            "changed_parameters": changed(
                {k: v for k, v in student_before.items() if k in student_params}, student_after
            ),
            "changed_state": changed(student_before, student_after),
        },
        "teacher": teacher_report,
        "export": {
            "type": f"{type(model).__module__}.{type(model).__qualname__}",
            "is_torchvision_resnet": type(model) is ResNet,
            "same_state_keys_as_resnet18": sorted(model.state_dict())
            == sorted(fresh_resnet18.state_dict()),
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "resnet18_parameter_count": sum(p.numel() for p in fresh_resnet18.parameters()),
            "bottleneck_modules": sum(isinstance(m, Bottleneck) for m in model.modules()),
            "modules_outside_children": modules_in_dict,
            "hooks": hooks,
            "keeps_trained_state": not changed(student_after, model.state_dict()),
            "logits_shape": list(logits.shape),
        },
    }
    Path(report_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
