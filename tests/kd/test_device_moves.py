"""`.to()` of a converted model moves and casts everything it runs: student, loss adapters,
teacher and the teacher input adapter (issue 13, finding 3). CPU-testable through dtype casts
and the meta device; tests/gpu/test_engine_cuda.py does the same with `.cuda()`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL


class ConvNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def converted() -> kd.DistillationModel:
    torch.manual_seed(0)
    return kd.convert(
        ConvNet(4),
        teacher=ConvNet(8),
        criterion={("", ""): LogitsKL(temperature=2.0), ("body", "body"): FeatureMSE()},
        balancer=kd.StaticBalancer([0.5, 0.2]),
        teacher_input_adapter=kd.NormalizationAdapter(
            mean_from=[0.0] * 3, std_from=[1.0] * 3, mean_to=[0.5] * 3, std_to=[0.25] * 3
        ),
        example_input=torch.zeros(2, 3, 6, 6),
    )


def test_to_double_casts_the_teacher_input_adapter_and_the_step_runs() -> None:
    dm = converted().to(torch.float64)
    adapter = dm._kd_teacher_input_adapter
    assert isinstance(adapter, nn.Module)
    assert {b.dtype for b in adapter.buffers()} == {torch.float64}
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    # the teacher sees (x − 0.5) / 0.25, computed here by hand
    teacher_by_hand = dm.teacher_model((x - 0.5) / 0.25)
    logits = dm(x)
    torch.testing.assert_close(dm._kd_teacher_out[""], teacher_by_hand)
    loss = dm.compute_kd_loss(student_loss=F.cross_entropy(logits, torch.tensor([0, 1, 2])))
    loss.backward()
    assert bool(torch.isfinite(loss)) and dm.head.weight.grad is not None


def test_to_meta_moves_the_teacher_input_adapter() -> None:
    dm = converted().to("meta")
    adapter = dm._kd_teacher_input_adapter
    assert isinstance(adapter, nn.Module)
    assert {b.device.type for b in adapter.buffers()} == {"meta"}
    assert {p.device.type for p in dm.teacher_model.parameters()} == {"meta"}
    assert {p.device.type for p in dm.parameters()} == {"meta"}
    out = dm(torch.empty(2, 3, 6, 6, device="meta"))  # no device mismatch anywhere
    assert out.shape == (2, 5) and out.device.type == "meta"
