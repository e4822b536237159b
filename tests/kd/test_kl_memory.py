"""Memory and exactness of the KL helper behind LogitsKL / MFTLoss / DKDLoss / GeneralizedJSD.

`kl_div_last` is an autograd.Function that saves only its two log-probability inputs. The
bytes autograd keeps for backward are counted with `saved_tensors_hooks` (unique storages), which
is deterministic, so the bound can be asserted; values and gradients are checked against
`torch.nn.functional.kl_div` / a hand formula in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.worker.kd import losses
from kdlab.worker.kd.losses import GeneralizedJSD, LogitsKL, MFTLoss, kl_div_last

B, L, V = 4, 16, 5000
N = B * L * V
FP32 = 4
SMALL = 64 * 1024  # scalars, [B, L] per-position tensors, label masks: far below one [B, L, V]


def old_kl_div_last(target_log: Tensor, input_log: Tensor) -> Tensor:
    """The composite formula this helper replaced (reference for memory and values)."""
    target = target_log.exp()
    diff = torch.where(target > 0, target_log - input_log, torch.zeros_like(target_log))
    return (target * diff).sum(dim=-1)


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while running `fn`."""
    storages: dict[tuple[torch.device, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()  # the graph must still be usable
    return sum(storages.values())


def logits(seed: int, requires_grad: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, V, generator=g) * 3).requires_grad_(requires_grad)


def measure(
    loss: torch.nn.Module, *, old: bool, monkeypatch: pytest.MonkeyPatch, **kw: Tensor
) -> int:
    student, teacher = logits(0, requires_grad=True), logits(1)
    with monkeypatch.context() as m:
        if old:
            m.setattr(losses, "kl_div_last", old_kl_div_last)
        return saved_bytes(lambda: loss(student, teacher, **kw))


def test_logits_kl_saves_two_vocab_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # New, by hand: log_softmax(s/T) saves its output log_s (1 tensor, grad needed); the teacher
    # side needs no grad so its log_softmax saves nothing; _KLDivLast saves (log_t, log_s), i.e.
    # log_t (1 new tensor) and log_s again (same storage). Total 2 fp32 [B, L, V] tensors.
    # Old: log_s + p = exp(log_t) (kept by the product) + the bool mask of torch.where
    # = 2 fp32 + 1 bool tensor = 9 bytes per element.
    new = measure(LogitsKL(temperature=2.0), old=False, monkeypatch=monkeypatch)
    old = measure(LogitsKL(temperature=2.0), old=True, monkeypatch=monkeypatch)
    assert new <= 2 * N * FP32 + SMALL
    assert old >= 2 * N * FP32 + N  # 2 fp32 + 1 bool
    assert old > new


def test_reverse_kl_saves_two_vocab_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # GeneralizedJSD(beta=1) is KL(P_s ‖ P_t): the *target* side needs grad.
    # New: log_s (log_softmax output) + log_t (saved by _KLDivLast) = 2 fp32 tensors.
    # Old: log_s + p_s = exp(log_s) + masked diff + bool mask = 3 fp32 + 1 bool = 13 bytes/elem.
    new = measure(GeneralizedJSD(beta=1.0), old=False, monkeypatch=monkeypatch)
    old = measure(GeneralizedJSD(beta=1.0), old=True, monkeypatch=monkeypatch)
    assert new <= 2 * N * FP32 + SMALL
    assert old >= 3 * N * FP32 + N
    assert old > new


def test_mft_saves_two_vocab_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # New: log_s + log q (saved by _KLDivLast); q itself is built under no_grad and not kept.
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))
    new = measure(MFTLoss(temperature=2.0), old=False, monkeypatch=monkeypatch, labels=labels)
    old = measure(MFTLoss(temperature=2.0), old=True, monkeypatch=monkeypatch, labels=labels)
    assert new <= 2 * N * FP32 + SMALL
    assert old > new


# --------------------------------------------------------------------------- values and gradients


def reference_kl(target_log: Tensor, input_log: Tensor) -> Tensor:
    """Independent reference: F.kl_div with probability targets (xlogy: 0·log 0 = 0), float64."""
    return F.kl_div(
        input_log.double(), target_log.double().exp(), reduction="none", log_target=False
    ).sum(-1)


def pair_with_zeros(requires_grad_target: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    q[..., :2] = 0.0  # exact zeros, as MFTLoss's corrected teacher can hold
    q[0, 0] = 0.0
    q[0, 0, 4] = 1.0  # one-hot row
    q = q / q.sum(-1, keepdim=True)
    target_log = q.log().requires_grad_(requires_grad_target)  # -inf where q == 0
    input_log = torch.log_softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    return target_log, input_log.requires_grad_(True)


@pytest.mark.parametrize("requires_grad_target", [False, True])
def test_values_and_gradients_match_reference(requires_grad_target: bool) -> None:
    target_log, input_log = pair_with_zeros(requires_grad_target)
    got = kl_div_last(target_log, input_log)
    want = reference_kl(target_log.detach(), input_log.detach())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, old_kl_div_last(target_log, input_log), rtol=0, atol=0)

    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.autograd.grad(
        (got * w).sum(), [t for t in (target_log, input_log) if t.requires_grad]
    )
    p = target_log.detach().exp()
    # by hand: d/d input_log = −w·p; d/d target_log = w·p·(target_log − input_log + 1), 0 where p = 0
    want_input = -w.unsqueeze(-1) * p
    torch.testing.assert_close(grads[-1], want_input)
    if requires_grad_target:
        support = p > 0
        diff = torch.where(
            support, target_log.detach() - input_log.detach() + 1, torch.zeros_like(p)
        )
        want_target = w.unsqueeze(-1) * p * diff
        assert torch.isfinite(grads[0]).all()
        torch.testing.assert_close(grads[0], want_target)
        # and the same as autograd through the old composite formula
        old_grads = torch.autograd.grad(
            (old_kl_div_last(target_log, input_log) * w).sum(), [target_log, input_log]
        )
        torch.testing.assert_close(grads[0], old_grads[0])
        torch.testing.assert_close(grads[1], old_grads[1])


def test_gradcheck_finite_targets() -> None:
    g = torch.Generator().manual_seed(5)
    target_log = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1)
    input_log = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1)
    torch.autograd.gradcheck(kl_div_last, (target_log.requires_grad_(), input_log.requires_grad_()))


def test_logits_kl_float32_matches_float64_kl_div() -> None:
    student = logits(6)[:, :4, :50].clone().requires_grad_()
    teacher = logits(7)[:, :4, :50]
    loss = LogitsKL(temperature=2.0)(student, teacher)
    want = (
        F.kl_div(
            F.log_softmax(student.double() / 2, -1),
            F.log_softmax(teacher.double() / 2, -1),
            reduction="sum",
            log_target=True,
        )
        * 4
        / (B * 4)
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_masked_vocab_minus_inf_on_both_sides_is_zero() -> None:
    # padded vocab entries masked to -inf in both models: 0·log(0/0) must count as 0, grads finite
    s = torch.randn(2, 8, dtype=torch.float64)
    t = torch.randn(2, 8, dtype=torch.float64)
    s[:, -3:] = float("-inf")
    t[:, -3:] = float("-inf")
    s.requires_grad_()
    kl = kl_div_last(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    live = (torch.log_softmax(t[:, :-3], -1), torch.log_softmax(s[:, :-3].detach(), -1))
    torch.testing.assert_close(kl, reference_kl(*live))
    kl.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
