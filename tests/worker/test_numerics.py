"""The run's numerics and device helpers (issue 13): TF32 and determinism switches restored
after a run, fused Adam on CUDA, the teacher cast once for autocast (bitwise the same outputs),
CUDA RNG states restored onto fewer GPUs, and device resolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker.checkpoint import capture_rng_state, restore_cuda_rng, restore_rng_state
from kdlab.worker.config import OptimizerSpec, TrainSpec
from kdlab.worker.devices import PeakMemory, resolve_device
from kdlab.worker.numerics import cast_for_autocast, numerics, run_settings
from kdlab.worker.trainer import build_optimizer

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ------------------------------------------------------------------ findings 8, 12: numerics


def test_tf32_is_on_by_default_on_cuda_with_an_opt_out() -> None:
    assert run_settings(TrainSpec(), CUDA)["matmul_precision"] == "high"
    assert run_settings(TrainSpec(), CUDA)["cudnn_allow_tf32"] is True
    off = run_settings(TrainSpec(tf32=False), CUDA)
    assert off["matmul_precision"] == "highest" and off["cudnn_allow_tf32"] is False
    # on the CPU nothing changes (the CPU has no TF32)
    assert (
        run_settings(TrainSpec(), CPU)["matmul_precision"] == torch.get_float32_matmul_precision()
    )


def test_numerics_apply_for_the_run_and_restore_afterwards() -> None:
    before = (
        torch.get_float32_matmul_precision(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    assert before[1] is False
    with numerics(TrainSpec(deterministic=True), CUDA):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    after = (
        torch.get_float32_matmul_precision(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    assert after == before
    with pytest.raises(RuntimeError), numerics(TrainSpec(deterministic=True), CPU):
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("a failing run restores the settings too")
    assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------- finding 11: fused


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_is_fused_on_cuda_only(name: str) -> None:
    params = [nn.Parameter(torch.randn(3))]
    spec = OptimizerSpec(name=name)
    assert build_optimizer(params, spec, CUDA).defaults["fused"] is True
    assert not build_optimizer(params, spec, CPU).defaults["fused"]
    assert not build_optimizer(params, spec).defaults["fused"]


# -------------------------------------------------------- finding 13: teacher cast for autocast


class Teacher(nn.Module):
    """Conv → BatchNorm → Linear head tied to an embedding-like table, plus a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.table = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.table.weight  # tied: the embedding must keep its dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.norm(self.proj(h)))


def test_teacher_cast_gives_bitwise_the_autocast_outputs() -> None:
    torch.manual_seed(0)
    teacher = Teacher().eval().requires_grad_(False)
    with torch.no_grad():
        teacher.bn.running_mean.uniform_(-0.5, 0.5)
        teacher.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = teacher(x)
    conv_proj_bytes = sum(
        p.numel() * 4 for m in (teacher.conv, teacher.proj) for p in m.parameters()
    )
    saved = cast_for_autocast(teacher, torch.bfloat16)
    assert saved == conv_proj_bytes // 2  # fp32 → bf16 halves each cast weight
    assert teacher.conv.weight.dtype == teacher.proj.bias.dtype == torch.bfloat16
    assert teacher.bn.weight.dtype == teacher.norm.weight.dtype == torch.float32
    assert teacher.table.weight.dtype == torch.float32  # tied to a non-autocast module
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


# ------------------------------------------------------------- finding 4: CUDA RNG on resume


def test_cuda_rng_states_restore_onto_fewer_gpus() -> None:
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # a 4-GPU save
    restored: list[tuple[int, int]] = []
    count = restore_cuda_rng(saved, 1, lambda state, index: restored.append((int(state[0]), index)))
    assert count == 1 and restored == [(0, 0)]  # GPU 0 gets GPU 0's state, no IndexError
    restored.clear()
    assert restore_cuda_rng(saved[:1], 2, lambda s, i: restored.append((int(s[0]), i))) == 1
    assert restored == [(0, 0)]  # the second GPU has no saved state: it keeps its seed


def test_rng_round_trip_without_cuda_is_exact() -> None:
    state = capture_rng_state()
    expected = torch.rand(5)
    restore_rng_state(state)
    assert torch.equal(torch.rand(5), expected)


# ----------------------------------------------------------------- finding 9, 7: devices


def test_device_resolution() -> None:
    assert resolve_device("cpu", gpus=0) == CPU
    assert resolve_device(None, gpus=0).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device(None, gpus=1) == CUDA
        return
    with pytest.raises(RuntimeError, match=r"resources.gpus is 1, but this worker sees no CUDA"):
        resolve_device(None, gpus=1)
    with pytest.raises(RuntimeError, match=r"device 'cuda:1', but this worker sees no CUDA"):
        resolve_device("cuda:1", gpus=0)


def test_peak_memory_is_off_on_the_cpu() -> None:
    peak = PeakMemory(CPU)
    peak.start()
    peak.pause()
    peak.resume()
    assert not peak.enabled and peak.pop_gib() == 0.0
