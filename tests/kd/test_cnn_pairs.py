"""Intermediate-layer KD on a real CNN pair: torchvision ResNet-50 → ResNet-18 when torchvision is
installed (`kdlab[vision]`), otherwise the catalog's `cnn_small` pair."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kdlab.worker import kd
from kdlab.worker.catalog import DataInfo
from kdlab.worker.kd.losses import AttentionTransfer, FeatureMSE, LogitsKL
from kdlab.worker.models import cnn_small

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def cnn_pair():
    """(student, teacher, input, feature pair, attention pair, adapter weight shape)."""
    if HAS_TORCHVISION:
        from torchvision.models import resnet18, resnet50

        x = torch.randn(2, 3, 64, 64)
        return (
            resnet18(num_classes=10),
            resnet50(num_classes=10),
            x,
            "layer3",
            "layer2",
            (1024, 256, 1, 1),
        )
    info = DataInfo("classification", 10, (1, 8, 8), torch.float32)
    student = cnn_small({"channels": [8, 16]}, info)
    teacher = cnn_small({"channels": [16, 32]}, info)
    return student, teacher, torch.randn(4, 1, 8, 8), "features.1", "features.0", (32, 16, 1, 1)


def captured(model, names, x):
    outputs = {}
    handles = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: outputs.__setitem__(n, o)
        )
        for n in names
    ]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, outputs


def attention_map(feature):
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def test_feature_attention_and_logit_pairs_on_a_cnn_pair():
    torch.manual_seed(0)
    student, teacher, x, feat_layer, at_layer, adapter_shape = cnn_pair()
    student.eval()  # BatchNorm in eval: the reference forward below sees identical statistics
    reference_student = copy.deepcopy(student)
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={
            (feat_layer, feat_layer): FeatureMSE(),
            (at_layer, at_layer): AttentionTransfer(),
            ("", ""): LogitsKL(temperature=4.0),
        },
        balancer=kd.StaticBalancer([0.3, 0.3, 0.4]),
        example_input=x[:2],
    )
    adapter = dm.kd_losses[f"{feat_layer}~{feat_layer}"].adapter
    assert (
        tuple(adapter.weight.shape) == adapter_shape
    )  # a 1×1 conv from student to teacher channels
    dm.eval()
    dm(x)
    total = dm.compute_kd_loss()

    s_logits, s_feats = captured(reference_student, [feat_layer, at_layer], x)
    with torch.no_grad():
        t_logits, t_feats = captured(teacher, [feat_layer, at_layer], x)
    mse = F.mse_loss(adapter(s_feats[feat_layer]), t_feats[feat_layer])
    at = (attention_map(s_feats[at_layer]) - attention_map(t_feats[at_layer])).pow(2).mean()
    p_t = F.softmax(t_logits / 4, -1)
    kl = 16 * (p_t * (p_t.log() - F.log_softmax(s_logits / 4, -1))).sum(-1).mean()
    torch.testing.assert_close(total, 0.3 * mse + 0.3 * at + 0.4 * kl, rtol=1e-4, atol=1e-6)

    total.backward()
    first_conv = next(m for m in dm.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("_kd_") for k in kd.student_state_dict(dm))


@pytest.mark.skipif(HAS_TORCHVISION, reason="only meaningful without torchvision")
def test_resnet_from_the_catalog_explains_the_missing_extra():
    from kdlab.worker.models import resnet18

    info = DataInfo("classification", 10, (3, 32, 32), torch.float32)
    with pytest.raises(ImportError, match=r"pip install kdlab\[vision\]"):
        resnet18({}, info)
