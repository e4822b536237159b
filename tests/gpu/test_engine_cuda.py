"""The engine on CUDA with autocast (skips cleanly without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from tests.kd.conftest import TinyNet
from worker import kd
from worker.kd.losses import FeatureMSE, LogitsKL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kd_step_under_autocast_on_cuda(dtype):
    torch.manual_seed(0)
    x = torch.randn(32, 6, device="cuda")
    y = torch.randint(0, 4, (32,), device="cuda")
    dm = kd.convert(
        TinyNet(hidden=8),
        teacher=TinyNet(hidden=32),
        criterion={("", ""): LogitsKL(temperature=2.0), ("body", "body"): FeatureMSE()},
        balancer=kd.StaticBalancer([0.4, 0.1]),
        example_input=x[:2].cpu(),
    ).cuda()
    assert next(dm.teacher_model.parameters()).is_cuda
    assert dm.kd_losses["body~body"].adapter.weight.is_cuda
    with torch.autocast("cuda", dtype=dtype):
        logits = dm(x)
        loss = dm.compute_kd_loss(student_loss=F.cross_entropy(logits, y))
    assert loss.dtype == torch.float32  # logits KD is computed in float32
    loss.backward()
    dm.check_kd_loss_finite()
    assert all(p.grad is not None for p in dm.parameters())
