"""Tests for kdlab.worker.kd.losses: every value is checked against an independent numpy formula."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.worker.kd.losses import (
    LOSSES,
    AttentionTransfer,
    CosineLoss,
    DKDLoss,
    FeatureMSE,
    GeneralizedJSD,
    KDLoss,
    LogitsKL,
    MFTLoss,
    MGDLoss,
    build_loss,
)

# --------------------------------------------------------------------------- numpy references


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) over the last axis, 0·log 0 = 0."""
    support = p > 0
    ratio = np.where(support, np.log(np.where(support, p, 1.0) / np.where(support, q, 1.0)), 0.0)
    return (p * ratio).sum(axis=-1)


def np_masked_mean(values: np.ndarray, labels: np.ndarray | None) -> float:
    if labels is None:
        return float(values.mean())
    keep = labels != -100
    return float(values[keep].sum() / keep.sum())


def np_mft_probs(t: np.ndarray, y: np.ndarray, tau: float, temp: float, to_all: bool) -> np.ndarray:
    """Row-by-row minifinetuning correction written out with explicit loops."""
    p = np_softmax(t / temp)
    flat_p, flat_y = p.reshape(-1, p.shape[-1]), y.reshape(-1)
    q = flat_p.copy()
    for i, (row, label) in enumerate(zip(flat_p, flat_y, strict=True)):
        if label == -100:
            continue
        a = int(row.argmax())
        if a != label:
            lam = (tau - row[label] + row[a]) / (1 - row[label] + row[a])
        elif to_all:
            lam = min(tau / (1 - row[label]), 1.0)
        else:
            lam = 0.0
        q[i] = (1 - lam) * row
        q[i, label] += lam
    return q.reshape(p.shape)


def np_dkd(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, temp: float
) -> float:
    """mdistiller's dkd_loss in numpy (probabilities, cat_mask, -1000 masking)."""
    gt = np.zeros_like(s)
    gt[np.arange(len(y)), y] = 1.0
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], axis=1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], axis=1)
    tckd = np_kl(bt, bs).sum() * temp**2 / len(y)
    ps2 = np_softmax(s / temp - 1000.0 * gt)
    pt2 = np_softmax(t / temp - 1000.0 * gt)
    nckd = np_kl(pt2, ps2).sum() * temp**2 / len(y)
    return alpha * tckd + beta * nckd


def f32(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- LogitsKL


def test_logits_kl_temperature_4_matches_numpy(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(4, 7)) * 2, rng.normal(size=(4, 7)) * 2
    expected = 16 * np_kl(np_softmax(t / 4), np_softmax(s / 4)).mean()
    got = LogitsKL(temperature=4.0)(f32(s), f32(t))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logits_kl_without_t2_scale(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    expected = np_kl(np_softmax(t / 2), np_softmax(s / 2)).mean()
    got = LogitsKL(temperature=2.0, scale_by_t2=False)(f32(s), f32(t))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logits_kl_is_token_level_for_3d(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    per_token = np_kl(np_softmax(t), np_softmax(s))  # [2, 3]
    got = LogitsKL()(f32(s), f32(t)).item()
    assert got == pytest.approx(per_token.sum() / 6, rel=1e-5)  # B·L, not B
    assert got != pytest.approx(per_token.sum() / 2, rel=1e-3)


def test_logits_kl_label_mask(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 4, 5))
    labels = np.array([[1, -100, 3, 0], [-100, -100, 2, 4]])
    per_token = 9 * np_kl(np_softmax(t / 3), np_softmax(s / 3))
    expected = per_token[labels != -100].sum() / 5
    got = LogitsKL(temperature=3.0)(f32(s), f32(t), labels=torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logits_kl_all_positions_ignored_is_zero(rng: np.random.Generator) -> None:
    s = f32(rng.normal(size=(2, 3)), grad=True)
    loss = LogitsKL()(s, f32(rng.normal(size=(2, 3))), labels=torch.full((2,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_logits_kl_half_inputs_give_float32(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    got = LogitsKL(temperature=2.0)(f32(s).bfloat16(), f32(t).bfloat16())
    assert got.dtype == torch.float32
    s_b = f32(s).bfloat16().float().numpy()
    t_b = f32(t).bfloat16().float().numpy()
    expected = 4 * np_kl(np_softmax(t_b / 2), np_softmax(s_b / 2)).mean()
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logits_kl_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[2, 10\].*\[2, 12\]"):
        LogitsKL().setup(torch.Size([2, 10]), torch.Size([2, 12]))
    with pytest.raises(ValueError, match=r"\[2, 10\].*\[2, 12\]"):
        LogitsKL()(torch.zeros(2, 10), torch.zeros(2, 12))


def test_logits_kl_bad_labels_shape() -> None:
    with pytest.raises(ValueError, match=r"labels shape \[3\].*\[2\]"):
        LogitsKL()(torch.zeros(2, 4), torch.zeros(2, 4), labels=torch.zeros(3, dtype=torch.long))


def test_non_tensor_output_names_its_type() -> None:
    with pytest.raises(TypeError, match="teacher output is tuple"):
        LogitsKL()(torch.zeros(2, 3), (torch.zeros(2, 3),))


def test_gradients_reach_student_not_teacher(rng: np.random.Generator) -> None:
    labels = torch.tensor([1, 2, 0])
    for loss in (LogitsKL(4.0), MFTLoss(2.0), DKDLoss(), GeneralizedJSD(0.3)):
        s = f32(rng.normal(size=(3, 5)), grad=True)
        t = f32(rng.normal(size=(3, 5)), grad=True)
        loss(s, t, labels=labels).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
        assert s.grad.abs().sum() > 0, type(loss).__name__
        assert t.grad is None, type(loss).__name__


@pytest.mark.parametrize(
    "loss, shape_s, shape_t",
    [
        (FeatureMSE(), (2, 3, 4, 4), (2, 5, 4, 4)),
        (CosineLoss(), (2, 3, 4, 4), (2, 3, 4, 4)),
        (AttentionTransfer(), (2, 3, 4, 4), (2, 5, 4, 4)),
        (MGDLoss(alpha=1.0), (2, 3, 4, 4), (2, 5, 4, 4)),
    ],
)
def test_feature_losses_grad_student_not_teacher(
    loss: KDLoss, shape_s: tuple[int, ...], shape_t: tuple[int, ...]
) -> None:
    loss.setup(torch.Size(shape_s), torch.Size(shape_t))
    s = torch.randn(shape_s, requires_grad=True)
    t = torch.randn(shape_t, requires_grad=True)
    loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_describe_logits_kl() -> None:
    text = LogitsKL(temperature=4.0).describe()
    assert text.startswith("16 · KL(softmax(t/4) ‖ softmax(s/4)), batchmean over positions")
    assert LogitsKL(2.0, scale_by_t2=False).describe().startswith("1 · KL(softmax(t/2)")


# --------------------------------------------------------------------------- MFT


def _mft_case() -> tuple[np.ndarray, np.ndarray]:
    """Rows: wrong argmax, right argmax (p_y + τ < 1), right and confident (capped), ignored."""
    t = np.array(
        [
            [3.0, 1.0, 0.5, -1.0],  # argmax 0, label 2 -> wrong
            [0.2, 0.9, 0.1, 0.0],  # argmax 1, label 1 -> right, low confidence
            [9.0, 0.0, 0.0, 0.0],  # argmax 0, label 0 -> right, p_y + 0.2 > 1
            [0.0, 1.0, 2.0, 3.0],  # ignored
        ]
    )
    return t, np.array([2, 1, 0, -100])


def test_mft_corrected_distribution_properties() -> None:
    t, y = _mft_case()
    q = MFTLoss(threshold=0.2).corrected_teacher_probs(f32(t), torch.tensor(y)).numpy()
    p = np_softmax(t)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    assert q[0, 2] - q[0, 0] == pytest.approx(0.2, abs=1e-6)  # wrong: label leads argmax by τ
    assert q[1, 1] == pytest.approx(min(p[1, 1] + 0.2, 1.0), abs=1e-6)
    assert p[2, 0] + 0.2 > 1 and q[2, 0] == pytest.approx(1.0, abs=1e-6)  # capped at 1
    np.testing.assert_allclose(q[3], p[3], atol=1e-7)  # ignored row untouched
    np.testing.assert_allclose(q, np_mft_probs(t, y, 0.2, 1.0, True), atol=1e-6)


def test_mft_apply_to_all_false_leaves_right_tokens() -> None:
    t, y = _mft_case()
    q = MFTLoss(threshold=0.3, apply_to_all=False).corrected_teacher_probs(f32(t), torch.tensor(y))
    p = np_softmax(t)
    np.testing.assert_allclose(q[1:].numpy(), p[1:], atol=1e-6)
    assert (q[0, 2] - q[0, 0]).item() == pytest.approx(0.3, abs=1e-6)


def test_mft_temperature_applies_before_correction(rng: np.random.Generator) -> None:
    t = rng.normal(size=(6, 5)) * 3
    y = rng.integers(0, 5, size=6)
    q = MFTLoss(temperature=2.0, threshold=0.25).corrected_teacher_probs(f32(t), torch.tensor(y))
    np.testing.assert_allclose(q.numpy(), np_mft_probs(t, y, 0.25, 2.0, True), atol=1e-6)


def test_mft_loss_matches_numpy_token_level(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 6)) * 2, rng.normal(size=(2, 3, 6)) * 2
    y = rng.integers(0, 6, size=(2, 3))
    y[0, 1] = -100
    q = np_mft_probs(t, y, 0.2, 2.0, True)
    per_token = 4 * np_kl(q, np_softmax(s / 2))
    expected = per_token[y != -100].sum() / 5
    got = MFTLoss(temperature=2.0)(f32(s), f32(t), labels=torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mft_needs_labels() -> None:
    with pytest.raises(ValueError, match="labels="):
        MFTLoss()(torch.zeros(2, 3), torch.zeros(2, 3))


# --------------------------------------------------------------------------- FeatureMSE / Cosine


def test_feature_mse_equal_shapes_matches_numpy(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    loss = FeatureMSE()
    loss.setup(torch.Size(s.shape), torch.Size(t.shape))
    assert loss.adapter is None
    assert loss(f32(s), f32(t), labels=torch.zeros(2)).item() == pytest.approx(
        ((s - t) ** 2).mean(), rel=1e-5
    )


def test_feature_mse_auto_conv_adapter(rng: np.random.Generator) -> None:
    loss = FeatureMSE(adapter="auto")
    loss.setup(torch.Size([2, 3, 5, 5]), torch.Size([2, 8, 5, 5]))
    assert isinstance(loss.adapter, nn.Conv2d)
    assert loss.adapter.weight.shape == (8, 3, 1, 1) and loss.adapter.bias is None
    assert set(loss.state_dict()) == {"adapter.weight"}
    assert [p.shape for p in loss.parameters()] == [torch.Size([8, 3, 1, 1])]
    s = f32(rng.normal(size=(2, 3, 5, 5)), grad=True)
    t = rng.normal(size=(2, 8, 5, 5))
    got = loss(s, f32(t))
    w = loss.adapter.weight.detach().numpy()[:, :, 0, 0]
    projected = np.einsum("oc,nchw->nohw", w, s.detach().numpy())
    assert got.item() == pytest.approx(((projected - t) ** 2).mean(), rel=1e-5)
    got.backward()
    assert loss.adapter.weight.grad is not None and loss.adapter.weight.grad.abs().sum() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("shape_s, shape_t", [((4, 16), (4, 32)), ((2, 5, 16), (2, 5, 24))])
def test_feature_mse_auto_linear_adapter(
    shape_s: tuple[int, ...], shape_t: tuple[int, ...]
) -> None:
    loss = FeatureMSE()
    loss.setup(torch.Size(shape_s), torch.Size(shape_t))
    assert isinstance(loss.adapter, nn.Linear) and loss.adapter.bias is None
    assert loss.adapter.weight.shape == (shape_t[-1], shape_s[-1])
    first = loss.adapter
    loss.setup(torch.Size(shape_s), torch.Size(shape_t))
    assert loss.adapter is first  # a second setup keeps the trained adapter
    assert loss(torch.randn(shape_s), torch.randn(shape_t)).dim() == 0


def test_feature_mse_auto_cannot_fix_spatial_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[2, 3, 8, 8\].*\[2, 8, 4, 4\].*adapter="):
        FeatureMSE().setup(torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 4, 4]))
    with pytest.raises(ValueError, match=r"\[2, 12\].*\[2, 3, 4\]"):
        FeatureMSE().setup(torch.Size([2, 12]), torch.Size([2, 3, 4]))


def test_feature_mse_none_adapter_mismatch_names_shapes() -> None:
    loss = FeatureMSE(adapter=None)
    with pytest.raises(ValueError, match=r"\[2, 16\].*\[2, 32\].*adapter=\"auto\""):
        loss.setup(torch.Size([2, 16]), torch.Size([2, 32]))
    with pytest.raises(ValueError, match=r"\[2, 16\].*\[2, 32\]"):
        loss(torch.zeros(2, 16), torch.zeros(2, 32))


def test_feature_mse_auto_without_setup_asks_for_example_input() -> None:
    with pytest.raises(ValueError, match=r"\[2, 16\].*\[2, 32\].*example_input="):
        FeatureMSE()(torch.zeros(2, 16), torch.zeros(2, 32))


def test_feature_mse_user_adapter_is_registered(rng: np.random.Generator) -> None:
    user = nn.Linear(4, 6)
    loss = FeatureMSE(adapter=user)
    loss.setup(torch.Size([3, 4]), torch.Size([3, 6]))
    assert loss.adapter is user and "adapter.bias" in loss.state_dict()
    s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 6))
    w, b = user.weight.detach().numpy(), user.bias.detach().numpy()
    expected = ((s @ w.T + b - t) ** 2).mean()
    assert loss(f32(s), f32(t)).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"after the adapter.*\[3, 6\].*\[3, 5\]"):
        loss(f32(s), torch.zeros(3, 5))


def test_cosine_loss_last_dim_matches_numpy(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    assert CosineLoss()(f32(s), f32(t)).item() == pytest.approx((1 - cos).mean(), rel=1e-5)


def test_cosine_loss_4d_uses_channels(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    assert CosineLoss()(f32(s), f32(t)).item() == pytest.approx((1 - cos).mean(), rel=1e-5)


def test_cosine_loss_auto_adapter() -> None:
    loss = CosineLoss(adapter="auto")
    loss.setup(torch.Size([2, 6]), torch.Size([2, 9]))
    assert isinstance(loss.adapter, nn.Linear)
    with pytest.raises(ValueError, match=r"\[2, 6\].*\[2, 9\]"):
        CosineLoss().setup(torch.Size([2, 6]), torch.Size([2, 9]))


# --------------------------------------------------------------------------- attention transfer


def test_attention_transfer_matches_numpy(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))

    def att(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** 2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = ((att(s) - att(t)) ** 2).mean()
    assert AttentionTransfer()(f32(s), f32(t)).item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_spatial_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 4\].*\[2, 5, 8, 8\]"):
        AttentionTransfer().setup(torch.Size([2, 3, 4, 4]), torch.Size([2, 5, 8, 8]))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        AttentionTransfer().setup(torch.Size([2, 3]), torch.Size([2, 3]))


# --------------------------------------------------------------------------- MGD


def test_mgd_setup_builds_align_only_when_channels_differ() -> None:
    same = MGDLoss()
    same.setup(torch.Size([2, 4, 3, 3]), torch.Size([2, 4, 3, 3]))
    assert same.align is None and same.generator is not None
    diff = MGDLoss()
    diff.setup(torch.Size([2, 2, 3, 3]), torch.Size([2, 4, 3, 3]))
    assert isinstance(diff.align, nn.Conv2d) and diff.align.weight.shape == (4, 2, 1, 1)
    assert diff.generator is not None and diff.generator[0].weight.shape == (4, 4, 3, 3)
    assert any(k.startswith("generator.") for k in diff.state_dict())


def test_mgd_needs_setup_and_matching_spatial() -> None:
    with pytest.raises(ValueError, match="example_input="):
        MGDLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 3\].*\[1, 2, 4, 4\]"):
        MGDLoss().setup(torch.Size([1, 2, 3, 3]), torch.Size([1, 2, 4, 4]))


def test_mgd_matches_manual_computation_with_fixed_seed(rng: np.random.Generator) -> None:
    loss = MGDLoss(alpha=0.5, lambda_mask=0.65)
    loss.setup(torch.Size([2, 2, 4, 4]), torch.Size([2, 3, 4, 4]))
    s, t = f32(rng.normal(size=(2, 2, 4, 4))), f32(rng.normal(size=(2, 3, 4, 4)))
    torch.manual_seed(123)
    got = loss(s, t).item()
    torch.manual_seed(123)
    keep = (torch.rand(2, 1, 4, 4) >= 0.65).float()
    assert loss.align is not None and loss.generator is not None
    conv1, conv2 = loss.generator[0], loss.generator[2]
    with torch.no_grad():
        aligned = torch.nn.functional.conv2d(s, loss.align.weight, loss.align.bias)
        hidden = torch.relu(
            torch.nn.functional.conv2d(aligned * keep, conv1.weight, conv1.bias, padding=1)
        )
        generated = torch.nn.functional.conv2d(hidden, conv2.weight, conv2.bias, padding=1)
    expected = 0.5 * ((generated.numpy() - t.numpy()) ** 2).sum() / 2
    assert got == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- DKD


def test_dkd_matches_numpy_mdistiller(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 2
    y = rng.integers(0, 6, size=5)
    expected = np_dkd(s, t, y, alpha=1.0, beta=8.0, temp=4.0)
    got = DKDLoss()(f32(s), f32(t), labels=torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_dkd_label_mask_and_3d(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    y = rng.integers(0, 4, size=(2, 3))
    y[1, 2] = -100
    keep = y != -100
    expected = np_dkd(s[keep], t[keep], y[keep], alpha=0.5, beta=2.0, temp=2.0)
    got = DKDLoss(alpha=0.5, beta=2.0, temperature=2.0)(f32(s), f32(t), labels=torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_dkd_warmup_counts_training_steps(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    y = np.array([0, 1, 2])
    full = np_dkd(s, t, y, alpha=1.0, beta=8.0, temp=4.0)
    loss = DKDLoss(warmup_steps=4)
    values = [loss(f32(s), f32(t), labels=torch.tensor(y)).item() for _ in range(5)]
    np.testing.assert_allclose(values, [full / 4, full / 2, 3 * full / 4, full, full], rtol=1e-4)
    assert loss.state_dict()["step"].item() == 5
    loss.eval()
    loss(f32(s), f32(t), labels=torch.tensor(y))
    assert loss.step.item() == 5  # eval forwards do not advance the counter


# --------------------------------------------------------------------------- generalized JSD


def test_gjsd_limits_are_the_two_kls(rng: np.random.Generator) -> None:
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    ps, pt = np_softmax(s / 2), np_softmax(t / 2)
    got0 = GeneralizedJSD(beta=0.0, temperature=2.0)(f32(s), f32(t)).item()
    got1 = GeneralizedJSD(beta=1.0, temperature=2.0)(f32(s), f32(t)).item()
    assert got0 == pytest.approx(np_kl(pt, ps).mean(), rel=1e-5)
    assert got1 == pytest.approx(np_kl(ps, pt).mean(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gjsd_mid_beta_matches_numpy(rng: np.random.Generator, beta: float) -> None:
    s, t = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    y = np.array([[1, -100, 2], [0, 3, -100]])
    ps, pt = np_softmax(s), np_softmax(t)
    m = beta * pt + (1 - beta) * ps
    per_token = beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
    got = GeneralizedJSD(beta=beta)(f32(s), f32(t), labels=torch.tensor(y))
    assert got.item() == pytest.approx(np_masked_mean(per_token, y), rel=1e-5)


# --------------------------------------------------------------------------- parameters, registry


@pytest.mark.parametrize(
    "factory, param",
    [
        (lambda: LogitsKL(temperature=0), "temperature"),
        (lambda: LogitsKL(temperature=-1.0), "temperature"),
        (lambda: LogitsKL(temperature=float("nan")), "temperature"),
        (lambda: LogitsKL(temperature="4"), "temperature"),
        (lambda: LogitsKL(scale_by_t2=1), "scale_by_t2"),
        (lambda: MFTLoss(threshold=0.0), "threshold"),
        (lambda: MFTLoss(threshold=1.0), "threshold"),
        (lambda: MFTLoss(temperature=0.0), "temperature"),
        (lambda: MFTLoss(apply_to_all="yes"), "apply_to_all"),
        (lambda: FeatureMSE(adapter="linear"), "adapter"),
        (lambda: CosineLoss(dim=1.5), "dim"),
        (lambda: AttentionTransfer(p=0), "p"),
        (lambda: MGDLoss(alpha=-1.0), "alpha"),
        (lambda: MGDLoss(lambda_mask=1.0), "lambda_mask"),
        (lambda: DKDLoss(alpha=-0.1), "alpha"),
        (lambda: DKDLoss(beta=-2.0), "beta"),
        (lambda: DKDLoss(temperature=0.0), "temperature"),
        (lambda: DKDLoss(warmup_steps=-1), "warmup_steps"),
        (lambda: DKDLoss(warmup_steps=2.5), "warmup_steps"),
        (lambda: GeneralizedJSD(beta=1.5), "beta"),
        (lambda: GeneralizedJSD(beta=-0.1), "beta"),
        (lambda: GeneralizedJSD(temperature=0.0), "temperature"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(factory: Any, param: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        factory()


def test_registry_names_and_build() -> None:
    assert set(LOSSES) == {
        "logits_kl",
        "mft",
        "feature_mse",
        "cosine",
        "attention_transfer",
        "mgd",
        "dkd",
        "generalized_jsd",
    }
    for name, cls in LOSSES.items():
        built = build_loss(name, {})
        assert isinstance(built, cls) and isinstance(built, KDLoss)
        assert isinstance(built.describe(), str) and built.describe()
    loss = build_loss("logits_kl", {"temperature": 4.0})
    assert isinstance(loss, LogitsKL) and loss.temperature == 4.0


def test_build_loss_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"'logit_kl'.*'logits_kl'.*Available:.*generalized_jsd"):
        build_loss("logit_kl", {})


def test_build_loss_bad_params() -> None:
    with pytest.raises(ValueError, match=r"'logits_kl'.*'temprature'.*'temperature'"):
        build_loss("logits_kl", {"temprature": 4.0})
    with pytest.raises(ValueError, match=re.escape("DKDLoss: beta")):
        build_loss("dkd", {"beta": -1})
    with pytest.raises(ValueError, match="params must be a dict"):
        build_loss("dkd", [1, 2])  # type: ignore[arg-type]


def test_describe_has_the_numbers() -> None:
    assert "0.3·TCKD + 2·NCKD) · 4" in DKDLoss(alpha=0.3, beta=2, temperature=2).describe()
    assert "min(step/10, 1)" in DKDLoss(warmup_steps=10).describe()
    assert "q_y − q_a = 0.2" in MFTLoss().describe()
    assert MFTLoss(temperature=2).describe().startswith("4 · KL(q ‖ softmax(s/2))")
    assert "0.25·KL(P_t ‖ M) + 0.75·KL(P_s ‖ M)" in GeneralizedJSD(0.25).describe()
    assert "2e-05 · Σ" in MGDLoss().describe()
