import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL
from tests.kd.conftest import TinyNet


class Recorder(nn.Module):
    """A loss that records what it was given and returns their squared distance."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, student_out, teacher_out, labels=None):
        self.seen.append((student_out, teacher_out, labels))
        return (student_out - teacher_out).pow(2).mean()


def manual_kl(student_logits, teacher_logits, temperature):
    p_t = F.softmax(teacher_logits / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    return temperature**2 * kl


def test_convert_keeps_student_class_and_runs_frozen_teacher(pair, batch):
    student, teacher = pair
    expected_student = student(batch)
    expected_teacher = teacher(batch)
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL(temperature=2.0))
    assert isinstance(dm, TinyNet)
    assert isinstance(dm, kd.DistillationModel)
    assert dm.teacher_model is teacher
    out = dm(batch)
    torch.testing.assert_close(out, expected_student)
    loss = dm.compute_kd_loss()
    torch.testing.assert_close(loss, manual_kl(expected_student, expected_teacher, 2.0))


def test_mode_form_matches_keyword_form(pair, batch):
    student, teacher = pair
    twin = copy.deepcopy(student)
    dm_kw = kd.convert(student, teacher=teacher, criterion=LogitsKL(4.0))
    dm_mode = kd.convert(
        twin, mode=[("kd_loss", {"teacher_model": teacher, "criterion": LogitsKL(4.0)})]
    )
    dm_kw(batch)
    dm_mode(batch)
    torch.testing.assert_close(dm_kw.compute_kd_loss(), dm_mode.compute_kd_loss())


def test_mode_errors_name_the_problem(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match="unknown key 'criterior'.*did you mean 'criterion'"):
        kd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterior": LogitsKL()})])
    with pytest.raises(ValueError, match="unknown mode 'quantize'"):
        kd.convert(student, mode=[("quantize", {})])
    with pytest.raises(ValueError, match="either mode"):
        kd.convert(student, teacher=teacher, mode=[("kd_loss", {})])


def test_teacher_frozen_in_eval_and_outside_state_dict(pair, batch):
    student, teacher = pair
    n_student_params = len(list(student.parameters()))
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    dm.train()
    assert dm.training
    assert not dm.teacher_model.training
    assert all(not p.requires_grad for p in dm.teacher_model.parameters())
    assert len(list(dm.parameters())) == n_student_params
    assert set(dm.state_dict()) == set(TinyNet().state_dict())
    dm(batch)
    dm.compute_kd_loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_to_moves_the_teacher_too(pair):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    dm.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(dm.parameters()).dtype == torch.float64


@pytest.mark.parametrize(
    "spec",
    [
        lambda: TinyNet(hidden=16),
        (TinyNet,),
        (TinyNet, (6, 16)),
        (TinyNet, (), {"hidden": 16}),
    ],
    ids=["callable", "class", "class+args", "class+kwargs"],
)
def test_teacher_from_factory_forms(spec, batch):
    dm = kd.convert(TinyNet(), teacher=spec, criterion=LogitsKL())
    assert isinstance(dm.teacher_model, TinyNet)
    assert not dm.teacher_model.training
    dm(batch)
    assert dm.compute_kd_loss().ndim == 0


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("resnet", TypeError, "teacher: expected an nn.Module.*got str"),
        (lambda: 3, TypeError, "factory returned a int"),
        ((TinyNet, (), {}, 4), ValueError, "got 4 items"),
        (None, ValueError, "teacher: missing"),
    ],
)
def test_bad_teacher_names_itself(spec, error, message):
    with pytest.raises(error, match=message):
        kd.convert(TinyNet(), teacher=spec, criterion=LogitsKL())


def test_student_as_its_own_teacher_refused(pair):
    student, _ = pair
    with pytest.raises(ValueError, match="teacher is the student itself"):
        kd.convert(student, teacher=student, criterion=LogitsKL())


def test_intermediate_pairs_capture_the_named_layers(pair, batch):
    student, teacher = pair
    s_body = student.body(batch)
    t_body = teacher.body(batch)
    recorder = Recorder()
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={("body.0", "body.0"): FeatureMSE(), ("", ""): recorder},
        balancer=kd.StaticBalancer(kd_weight=[0.25, 0.25]),
        example_input=batch,
    )
    dm(batch)
    student_loss = torch.tensor(2.0)
    total = dm.compute_kd_loss(student_loss=student_loss, labels=torch.arange(5))
    (s_out, t_out, labels) = recorder.seen[-1]
    torch.testing.assert_close(s_out, student(batch))
    torch.testing.assert_close(t_out, teacher(batch))
    assert labels.tolist() == [0, 1, 2, 3, 4]
    adapter = dm.kd_losses["body.0~body.0"].adapter
    feat = F.mse_loss(adapter(student.body[0](batch)), teacher.body[0](batch))
    expected = 0.5 * student_loss + 0.25 * feat + 0.25 * F.mse_loss(s_out, t_out)
    torch.testing.assert_close(total, expected)
    assert s_body.shape == (5, 8) and t_body.shape == (5, 16)
    assert set(dm.kd_loss_components) == {"body.0~body.0", "output~output"}
    torch.testing.assert_close(dm.kd_loss_weighted["body.0~body.0"], 0.25 * feat.detach())


def test_unknown_layer_names_close_matches(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match=r"student_layer 'bodyy.0'.*did you mean 'body.0'"):
        kd.convert(student, teacher=teacher, criterion={("bodyy.0", ""): LogitsKL()})
    with pytest.raises(ValueError, match=r"teacher_layer 'hed'.*did you mean 'head'"):
        kd.convert(student, teacher=teacher, criterion={("", "hed"): LogitsKL()})
    assert type(student) is TinyNet


def test_shape_mismatch_without_adapter_names_both_shapes(pair, batch):
    student, teacher = pair
    with pytest.raises(ValueError, match=r"5, 8\W.*5, 16\W"):
        kd.convert(
            student,
            teacher=teacher,
            criterion={("body", "body"): FeatureMSE(adapter=None)},
            example_input=batch,
        )
    assert type(student) is TinyNet  # a failed convert leaves the student untouched
    assert not hasattr(student, "_kd_teacher")


def test_auto_adapter_exists_after_convert_and_trains(pair, batch):
    student, teacher = pair
    n_student = sum(p.numel() for p in student.parameters())
    dm = kd.convert(
        student, teacher=teacher, criterion={("body", "body"): FeatureMSE()}, example_input=batch
    )
    adapter_params = sum(p.numel() for p in dm.parameters()) - n_student
    assert adapter_params == 8 * 16  # a bias-free Linear(8 → 16)
    optimizer = torch.optim.SGD(dm.parameters(), lr=0.1)
    dm(batch)
    dm.compute_kd_loss().backward()
    adapter = dm.kd_losses["body~body"].adapter
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    before = adapter.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, adapter.weight)
    exported = kd.export(dm)
    assert set(exported.state_dict()) == set(TinyNet().state_dict())


def test_adapter_needed_without_example_input_is_an_error(pair, batch):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion={("body", "body"): FeatureMSE()})
    dm(batch)
    with pytest.raises(ValueError, match="pass example_input="):
        dm.compute_kd_loss()


def test_teacher_output_not_a_tensor_says_what_it_was(batch):
    class TupleNet(TinyNet):
        def forward(self, x):
            return super().forward(x), x

    dm = kd.convert(TinyNet(), teacher=TupleNet(), criterion=LogitsKL())
    dm(batch)
    with pytest.raises(TypeError, match="teacher output of layer 'output' is a tuple of 2"):
        dm.compute_kd_loss()


def test_compute_before_forward_is_explained(pair):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    with pytest.raises(RuntimeError, match="call the model on a batch"):
        dm.compute_kd_loss()


def test_only_student_forward_skips_the_teacher(pair, batch):
    student, teacher = pair
    expected = student(batch)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    with dm.only_student_forward():
        out = dm(batch)
    assert calls == []
    torch.testing.assert_close(out, expected)
    dm(batch)
    assert calls == [1]


def test_export_restores_original_class_attributes_and_hooks(pair, batch):
    student, teacher = pair
    attrs_before = set(vars(student))
    expected = student(batch)
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={("body", "body"): FeatureMSE(), ("", ""): LogitsKL()},
        balancer=kd.StaticBalancer(0.4),
        example_input=batch,
    )
    exported = kd.export(dm)
    assert type(exported) is TinyNet
    assert set(vars(exported)) == attrs_before
    assert exported.label == "tiny"
    for module in list(exported.modules()) + list(teacher.modules()):
        assert not module._forward_hooks
    torch.testing.assert_close(exported(batch), expected)
    with pytest.raises(TypeError, match="kd.export: expected a model returned by kd.convert"):
        kd.export(exported)


def test_convert_twice_refused(pair):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    with pytest.raises(ValueError, match="already converted"):
        kd.convert(dm, teacher=teacher, criterion=LogitsKL())


def test_loss_kwargs_only_reach_losses_that_take_them(pair, batch):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=nn.MSELoss())
    dm(batch)
    loss = dm.compute_kd_loss(labels=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss, F.mse_loss(student(batch), teacher(batch)))


def test_plain_function_loss_is_accepted(pair, batch):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=lambda s, t: (s - t).abs().mean())
    dm(batch)
    torch.testing.assert_close(dm.compute_kd_loss(), (student(batch) - teacher(batch)).abs().mean())


def test_skip_balancer_returns_raw_terms(pair, batch):
    student, teacher = pair
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={("", ""): nn.MSELoss(), ("head", "head"): Recorder()},
        balancer=kd.StaticBalancer(0.5),
        example_input=batch,
    )
    dm(batch)
    terms = dm.compute_kd_loss(skip_balancer=True)
    assert set(terms) == {"output~output", "head~head"}


def test_nan_in_a_term_is_named(pair, batch):
    student, teacher = pair
    dm = kd.convert(
        student, teacher=teacher, criterion={("", ""): lambda s, t: s.sum() * float("nan")}
    )
    dm(batch)
    dm.compute_kd_loss()
    with pytest.raises(ValueError, match=r"NaN in train/kd/output~output"):
        dm.check_kd_loss_finite()


def test_finite_terms_pass_the_check(pair, batch):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=LogitsKL())
    dm.check_kd_loss_finite()  # nothing computed yet: nothing to check
    dm(batch)
    dm.compute_kd_loss()
    dm.check_kd_loss_finite()


def test_describe_kd_loss_states_weights_and_formula(pair, batch):
    student, teacher = pair
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion=LogitsKL(temperature=4.0),
        balancer=kd.StaticBalancer(kd_weight=0.7),
    )
    info = dm.describe_kd_loss()
    assert info["student_loss_weight"] == pytest.approx(0.3)
    (term,) = info["terms"]
    assert term["key"] == "output~output" and term["weight"] == pytest.approx(0.7)
    assert "16" in term["formula"]  # T² = 16 at T = 4


def test_teacher_input_adapter_feeds_the_teacher(batch):
    images = torch.rand(3, 3, 4, 4)
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 2)

        def forward(self, x):
            seen.append(x)
            return self.fc(x.flatten(1))

    adapter = kd.NormalizationAdapter(
        mean_from=[0.5, 0.5, 0.5],
        std_from=[0.5, 0.5, 0.5],
        mean_to=[0.485, 0.456, 0.406],
        std_to=[0.229, 0.224, 0.225],
    )
    dm = kd.convert(Probe(), teacher=Probe(), criterion=LogitsKL(), teacher_input_adapter=adapter)
    dm(images)
    teacher_input, student_input = seen
    mean_to = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std_to = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher_input, (images * 0.5 + 0.5 - mean_to) / std_to)
    torch.testing.assert_close(student_input, images)


def test_normalization_adapter_rejects_bad_values():
    with pytest.raises(ValueError, match="std_to: standard deviations must be > 0"):
        kd.NormalizationAdapter([0.0], [1.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="channel counts differ"):
        kd.NormalizationAdapter([0.0, 0.0], [1.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="expects \\[N, 1, ...\\]"):
        kd.NormalizationAdapter([0.0], [1.0], [0.0], [1.0])(torch.zeros(2, 3, 4, 4))


def test_probe_falls_back_to_a_real_forward_when_meta_fails(batch):
    class DataDependent(TinyNet):
        def forward(self, x):
            if x.sum().item() > -1e9:  # .item() has no meaning on the meta device
                return super().forward(x)
            return x

    dm = kd.convert(
        DataDependent(),
        teacher=DataDependent(hidden=16),
        criterion={("body", "body"): FeatureMSE()},
        example_input=batch,
    )
    assert dm.kd_losses["body~body"].adapter.weight.shape == (16, 8)


def test_sequential_student_runs_only_its_own_layers(batch):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    expected = student(batch)
    dm = kd.convert(
        student, teacher=teacher, criterion={("1", "1"): FeatureMSE()}, example_input=batch
    )
    torch.testing.assert_close(dm(batch), expected)
    assert len(dm) == 3
    assert isinstance(dm[-1], nn.Linear) and dm[-1].out_features == 4
    assert [type(m) for m in dm[:2]] == [nn.Linear, nn.ReLU]
    assert dm.compute_kd_loss().item() > 0
    exported = kd.export(dm)
    assert type(exported) is nn.Sequential and len(exported) == 3
