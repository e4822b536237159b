"""Parity with NVIDIA ModelOpt's distillation losses (runs when nvidia-modelopt is installed).

Skipped without it, except with KDLAB_REQUIRE_MODELOPT=1 (.ci/run): then a missing ModelOpt fails.
"""

import pytest
import torch
import torch.nn.functional as F

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL, MFTLoss
from tests.helpers import require_module
from tests.kd.conftest import TinyNet

mtd = require_module(
    "modelopt.torch.distill", "KDLAB_REQUIRE_MODELOPT", "nvidia-modelopt (the test extra)"
)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=g)
    teacher = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :3] = teacher[0, :3].argmax(-1)  # some positions where the teacher is right
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logits_kl_equals_modelopt_per_position_mean(logits, temperature):
    student, teacher, _ = logits
    theirs = mtd.LogitsDistillationLoss(temperature=temperature, reduction="none")
    expected = theirs(student, teacher).mean()  # ModelOpt sums the vocab dim for "none"
    torch.testing.assert_close(LogitsKL(temperature=temperature)(student, teacher), expected)


def test_modelopt_default_mean_also_divides_by_vocab(logits):
    """Why our default differs: ModelOpt's reduction="mean" divides by the vocab size too."""
    student, teacher, _ = logits
    theirs = mtd.LogitsDistillationLoss(temperature=2.0)(student, teacher)
    ours = LogitsKL(temperature=2.0)(student, teacher)
    torch.testing.assert_close(ours / student.shape[-1], theirs)


@pytest.mark.parametrize(("temperature", "threshold"), [(1.0, 0.2), (2.0, 0.35)])
def test_mft_equals_modelopt(logits, temperature, threshold):
    student, teacher, labels = logits
    theirs = mtd.MFTLoss(temperature=temperature, threshold=threshold)
    expected = theirs(student, teacher, labels.reshape(-1))
    ours = MFTLoss(temperature=temperature, threshold=threshold)(student, teacher, labels=labels)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_static_balancer_equals_modelopt():
    loss_dict = {"student_loss": torch.tensor(2.0), "a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    theirs = mtd.StaticLossBalancer(kd_loss_weight=[0.2, 0.5])(dict(loss_dict))
    ours = kd.StaticBalancer([0.2, 0.5])(dict(loss_dict))  # the same dict, ModelOpt's keys
    torch.testing.assert_close(ours, theirs)


class HalfEach(mtd.DistillationLossBalancer):
    """A balancer written for ModelOpt: its interface, its student-loss key."""

    def forward(self, loss: dict[str, torch.Tensor]) -> torch.Tensor:
        student = loss.pop(mtd.loss_balancers.STUDENT_LOSS_KEY)
        return 0.5 * student + 0.5 * sum(loss.values())


@pytest.mark.parametrize("balancer", [HalfEach(), mtd.StaticLossBalancer([0.3, 0.2])])
def test_modelopt_balancers_work_unchanged(balancer):
    torch.manual_seed(0)
    x, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    dm = kd.convert(
        TinyNet(hidden=8),
        teacher=TinyNet(hidden=16),
        criterion={("", ""): LogitsKL(temperature=2.0), ("body", "body"): FeatureMSE()},
        balancer=balancer,
        example_input=x[:2],
    )
    student_loss = F.cross_entropy(dm(x), y)
    total = dm.compute_kd_loss(student_loss=student_loss)
    terms = dm.kd_loss_components
    kd_logits, kd_body = terms["output~output"], terms["body~body"]
    if isinstance(balancer, HalfEach):
        expected = 0.5 * student_loss + 0.5 * (kd_logits + kd_body)
    else:  # ModelOpt's static rule: 1 − Σw for the student loss, w per KD term in order
        expected = 0.5 * student_loss + 0.3 * kd_logits + 0.2 * kd_body
    torch.testing.assert_close(total, expected)
