"""The engine on CUDA: autocast bf16/fp16 against an fp32 reference (fp16 through a real
GradScaler step), and `.cuda()` of a model with a teacher input adapter (finding 3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL
from tests.gpu.conftest import needs_cuda
from tests.kd.conftest import TinyNet

pytestmark = needs_cuda


def converted(**extra) -> kd.DistillationModel:
    torch.manual_seed(0)
    return kd.convert(
        TinyNet(hidden=8),
        teacher=TinyNet(hidden=32),
        criterion={("", ""): LogitsKL(temperature=2.0), ("body", "body"): FeatureMSE()},
        balancer=kd.StaticBalancer([0.4, 0.1]),
        example_input=torch.zeros(2, 6),
        **extra,
    )


def kd_loss(dm: kd.DistillationModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = dm(x)
    loss = dm.compute_kd_loss(student_loss=F.cross_entropy(logits.float(), y))
    assert isinstance(loss, torch.Tensor)
    return loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kd_step_under_autocast_matches_fp32(dtype: torch.dtype) -> None:
    x = torch.randn(32, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    y = torch.randint(0, 4, (32,), device="cuda")
    reference = converted().cuda()
    mixed = copy.deepcopy(reference)
    assert next(mixed.teacher_model.parameters()).is_cuda
    assert mixed.kd_losses["body~body"].adapter.weight.is_cuda

    expected = kd_loss(reference, x, y)
    expected.backward()
    with torch.autocast("cuda", dtype=dtype):
        loss = kd_loss(mixed, x, y)
    assert loss.dtype == torch.float32  # the KD terms are computed in float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-3)

    optimizer = torch.optim.AdamW(mixed.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    for (name, p), (_, ref) in zip(
        mixed.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref.grad, rtol=5e-2, atol=5e-3, msg=name)
    before = [p.detach().clone() for p in mixed.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, mixed.parameters(), strict=True))
    mixed.check_kd_loss_finite()


def test_cuda_moves_the_teacher_input_adapter() -> None:
    adapter = kd.NormalizationAdapter(mean_from=[0.0], std_from=[1.0], mean_to=[0.5], std_to=[0.25])
    dm = converted(teacher_input_adapter=adapter).cuda()
    assert {b.device.type for b in adapter.buffers()} == {"cuda"}
    x = torch.rand(5, 1, 6, device="cuda")  # [N, C=1, features]: one channel to re-normalise
    with torch.no_grad():
        by_hand = dm.teacher_model((x - 0.5) / 0.25)
    dm(x)
    torch.testing.assert_close(dm._kd_teacher_out[""], by_hand)
