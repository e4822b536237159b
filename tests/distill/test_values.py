"""Hand-computed values, so the value checks do not only trust ModelOpt."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kdlab.distill as mtd

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl_rows(temperature: float) -> list[float]:
    """KL(softmax(t/T) ‖ softmax(s/T)) of each row, by the formula."""
    rows = []
    for s_row, t_row in zip(STUDENT, TEACHER, strict=True):
        p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
        rows.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)))
    return rows


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_logits_distillation_loss_by_hand(temperature, reduction):
    rows = [r * temperature**2 for r in _kl_rows(temperature)]
    expected = {
        "mean": sum(rows) / 6,  # every element: 2 rows × 3 classes
        "batchmean": sum(rows) / 2,
        "sum": sum(rows),
        "none": rows,
    }[reduction]
    loss = mtd.LogitsDistillationLoss(temperature=temperature, reduction=reduction)
    got = loss(torch.tensor(STUDENT), torch.tensor(TEACHER))
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_logits_distillation_loss_sequence_mean_is_per_element():
    """[B, L, V] logits are not flattened: "mean" divides by B·L·V, "batchmean" by B."""
    s = torch.tensor([STUDENT, STUDENT])  # [2, 2, 3]
    t = torch.tensor([TEACHER, TEACHER])
    total = 2 * sum(_kl_rows(1.0))
    assert torch.allclose(mtd.LogitsDistillationLoss()(s, t), torch.tensor(total / 12))
    batchmean = mtd.LogitsDistillationLoss(reduction="batchmean")(s, t)
    assert torch.allclose(batchmean, torch.tensor(total / 2))
    assert mtd.LogitsDistillationLoss(reduction="none")(s, t).shape == (2, 2)


def test_bad_reduction_refused():
    with pytest.raises(ValueError, match="reduction"):
        mtd.LogitsDistillationLoss(reduction="avg")


def test_mft_by_hand():
    """Wrong argmax: the teacher is mixed towards the label until q_y − q_a = threshold."""
    teacher = torch.tensor([[2.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0]])
    labels = torch.tensor([1])
    p = _softmax([2.0, 0.0, 0.0], 1.0)
    lam = (0.2 - p[1] + p[0]) / (1 - p[1] + p[0])
    q = [(1 - lam) * v for v in p]
    q[1] += lam
    assert math.isclose(q[1] - q[0], 0.2, rel_tol=1e-9)
    expected = sum(qi * (math.log(qi) - math.log(1 / 3)) for qi in q)
    got = mtd.MFTLoss(threshold=0.2)(student, teacher, labels)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-5)


def test_static_balancer_by_hand():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balancer = mtd.StaticLossBalancer([0.2, 0.3])
    loss = {"student_loss": torch.tensor(10.0), "A_0": torch.tensor(1.0), "B_1": torch.tensor(2.0)}
    assert torch.allclose(balancer(loss), torch.tensor(0.2 * 1 + 0.3 * 2 + 0.5 * 10))
    del loss["student_loss"]
    assert torch.allclose(balancer(loss), torch.tensor(0.2 * 1 + 0.3 * 2))
