"""kdlab.distill's numbers against ModelOpt's own (nvidia-modelopt 0.47) on the same inputs.

Skipped without nvidia-modelopt; with KDLAB_REQUIRE_MODELOPT=1 a missing ModelOpt fails.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import kdlab.distill as mtd
from tests.distill.models import NUM_CLASSES, TinyAlexNet, TinyStudent, image_batch
from tests.helpers import require_module

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # modelopt warns about untested transformers versions
    ref = require_module("modelopt.torch.distill", "KDLAB_REQUIRE_MODELOPT", "nvidia-modelopt")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEMPERATURES = [1.0, 0.5, 3.0]
REDUCTIONS = ["mean", "batchmean", "sum", "none"]
SHAPES = {"2d": (4, 7), "3d": (2, 5, 7)}


def _logits(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 2, torch.randn(*shape, generator=gen) * 2


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), (a, b)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_logits_distillation_loss(shape, reduction, temperature):
    s, t = _logits(SHAPES[shape], seed=1)
    s_ours, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = mtd.LogitsDistillationLoss(temperature, reduction)(s_ours, t)
    theirs = ref.LogitsDistillationLoss(temperature, reduction)(s_ref, t)
    _close(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    _close(s_ours.grad, s_ref.grad)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_mft_loss(shape, reduction, temperature, threshold):
    s, t = _logits(SHAPES[shape], seed=2)
    leading = SHAPES[shape][:-1]
    labels = torch.randint(
        0, SHAPES[shape][-1], leading, generator=torch.Generator().manual_seed(3)
    )
    labels.view(-1)[0] = t.reshape(-1, t.size(-1))[0].argmax()  # one right-argmax position
    flat = labels.reshape(-1)  # ModelOpt needs 1-D labels
    ours = mtd.MFTLoss(temperature, threshold, reduction)(s, t, flat)
    theirs = ref.MFTLoss(temperature, threshold, reduction)(s, t, flat)
    _close(ours, theirs)
    _close(mtd.MFTLoss(temperature, threshold, reduction)(s, t, labels), theirs)


@pytest.mark.parametrize("channels", [(8, 8), (6, 10)])
@pytest.mark.parametrize(("alpha", "lam"), [(1.0, 0.65), (2e-5, 0.5)])
def test_mgd_loss(channels, alpha, lam):
    cs, ct = channels
    theirs_loss = ref.MGDLoss(cs, ct, alpha_mgd=alpha, lambda_mgd=lam)
    ours_loss = mtd.MGDLoss(cs, ct, alpha_mgd=alpha, lambda_mgd=lam)
    ours_loss.load_state_dict(theirs_loss.state_dict())  # same keys, same weights
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, cs, 5, 5, generator=gen), torch.randn(3, ct, 5, 5, generator=gen)
    torch.manual_seed(123)
    theirs = theirs_loss(s, t)
    torch.manual_seed(123)
    ours = ours_loss(s, t)
    _close(ours, theirs)


@pytest.mark.parametrize(
    ("weights", "keys"), [(1.0, ["A_0"]), (0.4, ["A_0"]), ([0.2, 0.5], ["A_0", "B_1"])]
)
@pytest.mark.parametrize("with_student_loss", [True, False])
def test_static_loss_balancer(weights, keys, with_student_loss):
    loss = {k: torch.tensor(1.5 + i) for i, k in enumerate(keys)}
    if with_student_loss:
        loss = {"student_loss": torch.tensor(4.0), **loss}
    _close(mtd.StaticLossBalancer(weights)(loss), ref.StaticLossBalancer(weights)(loss))


def _pair(config_for, student_cls: type[nn.Module] = TinyStudent):
    """The same student and teacher converted by both libraries."""
    torch.manual_seed(0)
    student, teacher = student_cls(), TinyAlexNet()
    ours = mtd.convert(
        copy.deepcopy(student).train(), mode=[("kd_loss", config_for(mtd, copy.deepcopy(teacher)))]
    )
    theirs = ref.convert(
        copy.deepcopy(student).train(), mode=[("kd_loss", config_for(ref, copy.deepcopy(teacher)))]
    )
    return ours, theirs


def _multi(lib, teacher):
    return {
        "teacher_model": teacher,
        "criterion": {
            ("avgpool", "avgpool"): nn.MSELoss(),
            ("classifier", "classifier"): lib.LogitsDistillationLoss(temperature=2.0),
        },
        "loss_balancer": lib.StaticLossBalancer([0.3, 0.5]),
    }


def test_compute_kd_loss_multi_pair():
    ours, theirs = _pair(
        lambda lib, teacher: {
            **_multi(lib, teacher),
            "criterion": {
                ("features", "features"): lib.MGDLoss(16, 32),
                ("classifier", "classifier"): lib.LogitsDistillationLoss(temperature=2.0),
            },
        }
    )
    ours.load_state_dict(theirs.state_dict())  # same student and MGD weights
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = image_batch(4)
    torch.manual_seed(5)
    out_theirs = theirs(x)
    dict_theirs = theirs.compute_kd_loss(student_loss=out_theirs.mean(), skip_balancer=True)
    torch.manual_seed(5)
    out_ours = ours(x)
    dict_ours = ours.compute_kd_loss(student_loss=out_ours.mean(), skip_balancer=True)
    assert list(dict_ours) == list(dict_theirs)
    for key in dict_theirs:
        _close(dict_ours[key], dict_theirs[key])
    for model in (ours, theirs):
        torch.manual_seed(6)
        model(x)
    torch.manual_seed(7)
    total_theirs = theirs.compute_kd_loss(student_loss=out_theirs.mean())
    torch.manual_seed(7)
    total_ours = ours.compute_kd_loss(student_loss=out_ours.mean())
    _close(total_ours, total_theirs)


def test_compute_kd_loss_mse_and_logits_with_reduction_fn():
    ours, theirs = _pair(_multi, TinyAlexNet)
    x = image_batch(3)
    totals = []
    for model in (ours, theirs):
        out = model(x)
        totals.append(model.compute_kd_loss(student_loss=out.mean(), loss_reduction_fn=torch.sqrt))
    _close(*totals)
    totals[0].backward()
    totals[1].backward()
    _close(ours.classifier[1].weight.grad, theirs.classifier[1].weight.grad)


def test_compute_kd_loss_mft_labels():
    def config(lib, teacher):
        return {"teacher_model": teacher, "criterion": lib.MFTLoss(temperature=2.0)}

    ours, theirs = _pair(config)
    x = image_batch(4)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    values = []
    for model in (ours, theirs):
        model(x)
        values.append(model.compute_kd_loss(labels=labels))
    _close(*values)


def test_parameter_counts_match():
    ours, theirs = _pair(
        lambda lib, teacher: {"teacher_model": teacher, "criterion": lib.MGDLoss(10, 10)}
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
