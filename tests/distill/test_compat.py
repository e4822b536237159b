"""ModelOpt's distillation behaviours (its tests/unit/torch/distill/test_distill.py), exercised
through `kdlab.distill` alone, on tiny models (alexnet → TinyAlexNet, tiny mobilenet →
TinyStudent). The ModelOpt tests that do not apply are listed in test_not_applicable.py.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kdlab.distill as mtd
from kdlab.worker import kd
from tests.distill.models import NUM_CLASSES, TinyAlexNet, TinyMLP, TinyStudent, image_batch


def count_params(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture
def distillation_model() -> mtd.DistillationModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StaticLossBalancer(0.5): weights do not sum to 1
        config = {
            "teacher_model": TinyAlexNet,
            "criterion": mtd.LogitsDistillationLoss(),
            "loss_balancer": mtd.StaticLossBalancer(),
        }
    return mtd.convert(TinyStudent().train(), mode=[("kd_loss", config)])


def _mgd_config(expose_minimal_state_dict: bool) -> dict:
    return {
        "teacher_model": TinyAlexNet,
        "criterion": {("features", "features"): mtd.MGDLoss(16, 32)},
        "loss_balancer": None,
        "expose_minimal_state_dict": expose_minimal_state_dict,
    }


class ForwardCounter:
    """Counts the calls of a module (a forward hook), to observe which model ran."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------- test_distill.py


def test_distillation_model_loss_params():
    teacher, student = TinyAlexNet(), TinyStudent()
    kd_loss = mtd.MGDLoss(16, 32)
    individual = sum(count_params(m.parameters()) for m in (student, teacher, kd_loss))
    dm = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": kd_loss})])
    assert count_params(dm.parameters()) == individual  # teacher and loss params counted
    dm.to(torch.float16)
    assert next(kd_loss.parameters()).dtype == torch.float16
    assert next(teacher.parameters()).dtype == torch.float16
    assert next(student.parameters()).dtype == torch.float16


def test_distillation_model_no_balancer():
    config = {"teacher_model": TinyAlexNet, "criterion": mtd.LogitsDistillationLoss()}
    dm = mtd.convert(TinyStudent().train(), mode=[("kd_loss", config)])
    dm(image_batch())
    loss = dm.compute_kd_loss()
    assert isinstance(loss, torch.Tensor) and loss.numel() == 1


def test_no_balancer_refuses_student_loss():
    config = {"teacher_model": TinyAlexNet, "criterion": mtd.LogitsDistillationLoss()}
    dm = mtd.convert(TinyStudent(), mode=[("kd_loss", config)])
    out = dm(image_batch())
    with pytest.raises(AssertionError, match="Loss Balancer"):
        dm.compute_kd_loss(student_loss=out.mean())


@pytest.mark.filterwarnings("ignore:`StaticLossBalancer` weights do not sum")
def test_distillation_model_multiloss_balancer():
    config = {
        "teacher_model": TinyAlexNet,
        "criterion": {
            ("avgpool", "avgpool"): nn.MSELoss(),
            ("classifier", "classifier"): mtd.LogitsDistillationLoss(),
        },
        "loss_balancer": mtd.StaticLossBalancer([0.33, 0.33]),
    }
    dm = mtd.convert(TinyAlexNet().train(), mode=[("kd_loss", config)])
    output = dm(image_batch())
    total = dm.compute_kd_loss(student_loss=output.mean())
    assert isinstance(total, torch.Tensor) and total.numel() == 1
    dm(image_batch())
    loss_dict = dm.compute_kd_loss(student_loss=output.mean(), skip_balancer=True)
    assert isinstance(loss_dict, dict)
    assert list(loss_dict) == ["student_loss", "MSELoss_0", "LogitsDistillationLoss_1"]


def test_multiple_pairs_need_a_balancer():
    config = {
        "teacher_model": TinyAlexNet,
        "criterion": {("avgpool", "avgpool"): nn.MSELoss(), ("", ""): nn.MSELoss()},
    }
    with pytest.raises(ValueError, match="DistillationLossBalancer"):
        mtd.convert(TinyAlexNet(), mode=[("kd_loss", config)])


def test_distillation_model_mft():
    config = {"teacher_model": TinyAlexNet, "criterion": mtd.MFTLoss(threshold=0.2)}
    dm = mtd.convert(TinyStudent().train(), mode=[("kd_loss", config)])
    x = image_batch()
    labels = torch.randint(0, NUM_CLASSES, (x.size(0),))
    dm(x)
    loss = dm.compute_kd_loss(labels=labels)
    assert isinstance(loss, torch.Tensor) and loss.numel() == 1 and torch.isfinite(loss)


class TinyLM(nn.Module):
    """Sequence logits [B, L, V] (a language-model head)."""

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("label_shape", ["flat", "leading"])
def test_distillation_model_mft_sequence_logits(label_shape):
    torch.manual_seed(0)
    config = {"teacher_model": TinyLM(), "criterion": mtd.MFTLoss(threshold=0.2)}
    dm = mtd.convert(TinyLM().train(), mode=[("kd_loss", config)])
    tokens = torch.randint(0, 12, (2, 5))
    labels = torch.randint(0, 12, (2, 5))
    out = dm(tokens)
    assert out.shape == (2, 5, 12)
    loss = dm.compute_kd_loss(labels=labels.reshape(-1) if label_shape == "flat" else labels)
    assert loss.numel() == 1 and torch.isfinite(loss)
    loss.backward()
    assert dm.head.weight.grad is not None


@pytest.mark.parametrize("mode", ["kd_loss", ["kd_loss"], [("kd_loss", {})], [("kd_loss", None)]])
def test_distillation_mode_default_config(mode):
    with pytest.raises(AssertionError) as caught:
        mtd.convert(TinyStudent(), mode=mode)
    assert isinstance(caught.value, ValueError)  # either except clause catches it
    message = str(caught.value)
    assert "teacher_model" in message and "criterion" in message
    assert 'mode=[("kd_loss"' in message  # says how to fix it


def test_unknown_config_key_refused():
    config = {"teacher": TinyAlexNet, "criterion": mtd.LogitsDistillationLoss()}
    with pytest.raises(ValueError, match="did you mean 'teacher_model'"):
        mtd.convert(TinyStudent(), mode=[("kd_loss", config)])


@pytest.mark.parametrize(
    "teacher_like",
    [
        TinyAlexNet(),
        TinyAlexNet,
        lambda: TinyAlexNet(),
        (TinyAlexNet,),
        (TinyAlexNet, (NUM_CLASSES,)),
        (TinyAlexNet, (), {"num_classes": NUM_CLASSES}),
    ],
    ids=["module", "class", "callable", "tuple1", "tuple2", "tuple3"],
)
def test_teacher_model_like(teacher_like):
    config = {"teacher_model": teacher_like, "criterion": mtd.LogitsDistillationLoss()}
    dm = mtd.convert(TinyStudent(), mode=[("kd_loss", config)])
    assert isinstance(dm.teacher_model, TinyAlexNet)
    assert not any(p.requires_grad for p in dm.teacher_model.parameters())


def test_distillation_save_restore(distillation_model, tmp_path: Path):
    path = tmp_path / "ckpt.safetensors"
    mtd.save(distillation_model, path)
    new_student = TinyStudent()
    restored = mtd.restore(new_student, path)
    # the wrapper is not re-created: the plain student, with the trained student's weights
    assert restored is new_student
    assert type(restored) is TinyStudent and not isinstance(restored, mtd.DistillationModel)
    student_keys = TinyStudent().state_dict().keys()
    assert restored.state_dict().keys() == student_keys
    source = distillation_model.state_dict()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, source[key])
    # a subsequent convert behaves normally
    config = {
        "teacher_model": distillation_model.teacher_model,
        "criterion": mtd.LogitsDistillationLoss(),
    }
    newer = mtd.convert(new_student, mode=[("kd_loss", config)])
    assert isinstance(newer, mtd.DistillationModel) and isinstance(newer, TinyStudent)
    newer(image_batch())
    assert newer.compute_kd_loss().numel() == 1


def test_restore_into_converted_model(distillation_model, tmp_path: Path):
    path = tmp_path / "ckpt.safetensors"
    mtd.save(distillation_model, path)
    config = {"teacher_model": TinyAlexNet, "criterion": mtd.LogitsDistillationLoss()}
    other = mtd.convert(TinyStudent(), mode=[("kd_loss", config)])
    restored = mtd.restore(other, path)
    assert restored is other and isinstance(restored, mtd.DistillationModel)
    assert torch.equal(other.classifier[1].weight, distillation_model.classifier[1].weight)


def test_distillation_export(distillation_model, tmp_path: Path):
    teacher = distillation_model.teacher_model
    exported = mtd.export(distillation_model)
    assert type(exported) is TinyStudent
    assert not hasattr(exported, "_teacher_model") and not hasattr(exported, "_loss_modules")
    assert not isinstance(exported, kd.DistillationModel)
    assert count_params(exported.parameters()) == count_params(TinyStudent().parameters())
    assert all(not k.startswith("_") for k in exported.state_dict())
    calls = ForwardCounter(teacher)
    exported(image_batch())
    assert calls.calls == 0  # no teacher attached any more (hooks and forward gone)
    path = tmp_path / "ckpt.safetensors"
    mtd.save(exported, path)
    restored = mtd.restore(TinyStudent(), path)
    assert isinstance(restored, TinyStudent)
    assert torch.equal(restored.classifier[1].weight, exported.classifier[1].weight)


def test_export_of_plain_model_warns():
    model = TinyStudent()
    with pytest.warns(UserWarning, match="not a `DistillationModel`"):
        assert mtd.export(model) is model


def test_export_method(distillation_model):
    assert type(distillation_model.export()) is TinyStudent


def test_logits_distillation(distillation_model):
    optimizer = torch.optim.AdamW(distillation_model.parameters())
    before = {k: v.clone() for k, v in distillation_model.named_parameters()}
    optimizer.zero_grad()
    output = distillation_model(image_batch())
    total_loss = distillation_model.compute_kd_loss(student_loss=output.mean())
    total_loss.backward()
    optimizer.step()
    after = dict(distillation_model.named_parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "classifier.1.weight" in changed and "features.0.weight" in changed
    assert not any(k.startswith("_teacher_model") for k in changed)  # the teacher is frozen


def test_minimal_state_dict_mode():
    dm = mtd.convert(TinyStudent().train(), mode=[("kd_loss", _mgd_config(True))])
    state_dict = dm.state_dict()
    assert not any(key.startswith("_teacher_model") for key in state_dict)
    assert any(key.startswith("_loss_modules") for key in state_dict)
    assert "_loss_modules.0.generation.0.weight" in state_dict  # ModelOpt's key names
    dm.load_state_dict(state_dict)


def test_full_state_dict_mode():
    dm = mtd.convert(TinyStudent().train(), mode=[("kd_loss", _mgd_config(False))])
    state_dict = dm.state_dict()
    assert any(key.startswith("_teacher_model") for key in state_dict)
    assert any(key.startswith("_loss_modules") for key in state_dict)
    # a round trip into another converted model carries teacher and loss weights too
    other = mtd.convert(TinyStudent(), mode=[("kd_loss", _mgd_config(False))])
    other.load_state_dict(state_dict)
    assert torch.equal(other.teacher_model.features[0].weight, dm.teacher_model.features[0].weight)
    assert torch.equal(
        other.loss_modules[0].generation[0].weight, dm.loss_modules[0].generation[0].weight
    )


def test_load_student_only_state():
    dm = mtd.convert(TinyStudent().train(), mode=[("kd_loss", _mgd_config(False))])
    source = TinyStudent()
    dm.load_state_dict(source.state_dict())
    assert torch.equal(dm.features[0].weight, source.features[0].weight)


def test_isinstance_original_cls(distillation_model):
    assert isinstance(distillation_model, mtd.DistillationModel)
    assert isinstance(distillation_model, kd.DistillationModel)
    assert distillation_model.original_cls is TinyStudent
    assert type(distillation_model).__name__ == "DistillTinyStudent"  # ModelOpt's class name
    assert isinstance(distillation_model, distillation_model.original_cls)


@pytest.mark.filterwarnings("ignore:.*already has an intermediate output")
def test_forward_signature_replacement(distillation_model):
    student_cls = distillation_model.original_cls
    assert inspect.signature(type(distillation_model).forward) == inspect.signature(
        student_cls.forward
    )
    config = {"teacher_model": TinyMLP, "criterion": mtd.LogitsDistillationLoss()}
    mlp = mtd.convert(TinyMLP(), mode=[("kd_loss", config)])
    assert inspect.signature(type(mlp).forward) == inspect.signature(TinyMLP.forward)
    assert list(inspect.signature(type(mlp).forward).parameters) == ["self", "x", "scale"]
    # and one class's signature does not leak into another's
    assert inspect.signature(type(distillation_model).forward) != inspect.signature(
        type(mlp).forward
    )
    x = torch.rand(3, 8)
    assert torch.allclose(mlp(x, scale=2.0), 2.0 * mlp(x))  # kwargs reach the student


def test_duplicate_fwd_hook_call(distillation_model):
    distillation_model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each distinct warning once, as in ModelOpt's test
        distillation_model(image_batch())
        distillation_model(image_batch())
        distillation_model(image_batch())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # one for student and one for teacher
    assert any(m.startswith("Student's Module") for m in messages)
    assert any(m.startswith("Teacher's Module") for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a forward after compute_kd_loss warns nothing
        distillation_model.compute_kd_loss(student_loss=torch.tensor(0.0))
        distillation_model(image_batch())


def test_teacher_fwd_only(distillation_model):
    x = image_batch()
    student_calls = ForwardCounter(distillation_model.features)
    teacher_calls = ForwardCounter(distillation_model.teacher_model)
    with distillation_model.only_teacher_forward():
        out = distillation_model(x)
    assert teacher_calls.calls == 1 and student_calls.calls == 0
    assert torch.equal(out, distillation_model.teacher_model(x))  # the teacher's output
    # the teacher's output is captured, the student's is not
    with pytest.raises(RuntimeError, match="no outputs captured"):
        distillation_model.compute_kd_loss()


def test_student_fwd_only(distillation_model):
    student_calls = ForwardCounter(distillation_model.features)
    teacher_calls = ForwardCounter(distillation_model.teacher_model)
    with distillation_model.only_student_forward():
        distillation_model(image_batch())
    assert teacher_calls.calls == 0 and student_calls.calls == 1
    with pytest.raises(RuntimeError, match="no outputs captured"):
        distillation_model.compute_kd_loss()


def test_teacher_then_student_forward(distillation_model):
    """Pipeline style: teacher-only, then student-only forward, then the KD loss."""
    x = image_batch()
    with distillation_model.only_teacher_forward():
        distillation_model(x)
    with distillation_model.only_student_forward():
        out = distillation_model(x)
    split = distillation_model.compute_kd_loss(student_loss=out.mean())
    out = distillation_model(x)
    joint = distillation_model.compute_kd_loss(student_loss=out.mean())
    assert torch.allclose(split, joint)


def test_train_eval_mode_switch(distillation_model):
    distillation_model.train()
    distillation_model(image_batch())
    distillation_model.eval()  # switching drops the captured outputs
    with pytest.raises(RuntimeError, match="no outputs captured"):
        distillation_model.compute_kd_loss()
    distillation_model(image_batch())
    distillation_model.eval()  # no switch: the outputs stay
    assert distillation_model.compute_kd_loss(student_loss=torch.tensor(0.0)).numel() == 1
    distillation_model(image_batch())
    distillation_model.train()
    with pytest.raises(RuntimeError, match="no outputs captured"):
        distillation_model.compute_kd_loss()
    assert not distillation_model.teacher_model.training  # the teacher stays in eval mode


def test_loss_reduction_fn(distillation_model):
    x = image_batch()
    out = distillation_model(x)
    plain = distillation_model.compute_kd_loss(skip_balancer=True)
    distillation_model(x)
    doubled = distillation_model.compute_kd_loss(
        loss_reduction_fn=lambda t: 2 * t, skip_balancer=True
    )
    assert torch.allclose(
        doubled["LogitsDistillationLoss_0"], 2 * plain["LogitsDistillationLoss_0"]
    )
    del out


def test_sequential_student():
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    config = {"teacher_model": teacher, "criterion": mtd.LogitsDistillationLoss()}
    dm = mtd.convert(student, mode=[("kd_loss", config)])
    assert len(dm) == 3  # the teacher is no layer of the student
    out = dm(torch.rand(4, 8))
    assert out.shape == (4, NUM_CLASSES)
    assert dm.compute_kd_loss().numel() == 1


def test_public_names():
    for name in mtd.__all__:
        assert hasattr(mtd, name), name
    assert "import kdlab.distill as mtd" in (mtd.__doc__ or "")
    assert mtd.STUDENT_LOSS_KEY == "student_loss"


@pytest.mark.parametrize(
    ("factory", "defaults"),
    [
        (mtd.LogitsDistillationLoss, {"temperature": 1.0, "reduction": "mean"}),
        (mtd.MFTLoss, {"temperature": 1.0, "threshold": 0.2, "reduction": "batchmean"}),
        (mtd.MGDLoss, {"alpha_mgd": 1.0, "lambda_mgd": 0.65}),
        (mtd.StaticLossBalancer, {"kd_loss_weight": 0.5}),
    ],
)
def test_defaults(factory, defaults):
    params = inspect.signature(factory).parameters
    for name, value in defaults.items():
        assert params[name].default == value


def test_compute_kd_loss_signature():
    params = list(inspect.signature(mtd.DistillationModel.compute_kd_loss).parameters.values())
    assert [p.name for p in params] == [
        "self",
        "student_loss",
        "loss_reduction_fn",
        "skip_balancer",
        "loss_fn_kwargs",
    ]
    assert params[1].default is None and params[2].default is None and params[3].default is False


def test_static_balancer_rules():
    with pytest.raises(ValueError, match="should be"):
        mtd.StaticLossBalancer([0.7, 0.7])
    with pytest.warns(UserWarning, match="do not sum to 1.0"):
        mtd.StaticLossBalancer(0.4)
    balancer = mtd.StaticLossBalancer(1.0)
    with pytest.raises(AssertionError, match="does not correspond"):
        balancer({"A_0": torch.tensor(1.0), "B_1": torch.tensor(2.0)})
    balancer.set_student_loss_reduction_fn(lambda t: t.sum())
    with pytest.warns(UserWarning):
        half = mtd.StaticLossBalancer(0.5)
    half.set_student_loss_reduction_fn(lambda t: t.sum())
    total = half({"student_loss": torch.tensor([1.0, 3.0]), "A_0": torch.tensor(2.0)})
    assert torch.allclose(total, torch.tensor(0.5 * 2.0 + 0.5 * 4.0))


def test_custom_balancer():
    class Sum(mtd.DistillationLossBalancer):
        def forward(self, loss):
            self.keys = list(loss)
            return sum(loss.values())

    balancer = Sum()
    config = {
        "teacher_model": TinyAlexNet,
        "criterion": mtd.LogitsDistillationLoss(),
        "loss_balancer": balancer,
    }
    dm = mtd.convert(TinyStudent(), mode=[("kd_loss", config)])
    out = dm(image_batch())
    dm.compute_kd_loss(student_loss=out.mean())
    assert balancer.keys == ["student_loss", "LogitsDistillationLoss_0"]
    with pytest.raises(TypeError):
        mtd.DistillationLossBalancer()  # abstract


def test_restore_of_a_foreign_file_says_what_it_is(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": TinyStudent().state_dict()}, path)
    with pytest.raises(ValueError, match="not a file written by kdlab.distill.save"):
        mtd.restore(TinyStudent(), path)


def test_shared_loss_module_listed_once():
    shared = mtd.MGDLoss(16, 16)
    config = {
        "teacher_model": TinyStudent,
        "criterion": {("features", "features"): shared, ("features.2", "features.2"): shared},
        "loss_balancer": mtd.StaticLossBalancer([0.5, 0.5]),
    }
    dm = mtd.convert(TinyStudent(), mode=[("kd_loss", config)])
    assert len(dm.loss_modules) == 1
    assert sum(k.startswith("_loss_modules.0.") for k in dm.state_dict()) == 4  # generation
    assert not any(k.startswith("_loss_modules.1.") for k in dm.state_dict())
