import pytest
import torch

from kdlab.worker import kd


def terms(*values: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor(v) for i, v in enumerate(values)}


def test_static_single_weight_applies_to_each_term():
    balancer = kd.StaticBalancer(kd_weight=0.7)
    total = balancer({"student_loss": torch.tensor(2.0), **terms(1.0, 3.0)})
    assert total.item() == pytest.approx(0.3 * 2.0 + 0.7 * 1.0 + 0.7 * 3.0)


def test_static_list_weights_are_per_pair():
    balancer = kd.StaticBalancer(kd_weight=[0.2, 0.5])
    total = balancer({"student_loss": torch.tensor(2.0), **terms(1.0, 3.0)})
    assert total.item() == pytest.approx(0.3 * 2.0 + 0.2 * 1.0 + 0.5 * 3.0)
    assert balancer.student_weight == pytest.approx(0.3)


def test_static_full_kd_weight_needs_no_student_loss():
    assert kd.StaticBalancer(1.0)(terms(4.0)).item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ([0.6, 0.5], "sum to 1.1 > 1"),
        (-0.1, "outside \\[0, 1\\]"),
        ([], "non-empty"),
        (["a"], "is not a number"),
    ],
)
def test_static_bad_weights(weight, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kd.StaticBalancer(kd_weight=weight)


def test_missing_student_loss_is_named():
    with pytest.raises(ValueError, match="leaves weight 0.5 for the student loss"):
        kd.StaticBalancer(0.5)(terms(1.0))


def test_weight_count_must_match_pairs():
    with pytest.raises(ValueError, match="2 weights for 3 KD pairs"):
        kd.StaticBalancer([0.2, 0.2])({"student_loss": torch.tensor(1.0), **terms(1, 2, 3)})


def test_dynamic_scales_terms_to_student_magnitude():
    balancer = kd.DynamicBalancer(kd_weight=0.5)
    kd_term = torch.tensor(8.0, requires_grad=True)
    student = torch.tensor(2.0, requires_grad=True)
    weighted = balancer.weighted_terms({"t": kd_term}, student)
    assert weighted["t"].item() == pytest.approx(0.5 * 2.0)
    total = balancer.combine(weighted, student)
    total.backward()
    assert kd_term.grad.item() == pytest.approx(0.5 * 2.0 / 8.0)  # the ratio is detached
    assert student.grad.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="DynamicBalancer scales KD terms"):
        balancer(terms(1.0))


def test_build_balancer_by_name():
    assert isinstance(kd.build_balancer("static", {"kd_weight": 0.3}), kd.StaticBalancer)
    assert isinstance(kd.build_balancer("dynamic"), kd.DynamicBalancer)
    with pytest.raises(ValueError, match="unknown balancer 'statik'"):
        kd.build_balancer("statik")
    with pytest.raises(ValueError, match="balancer.params"):
        kd.build_balancer("static", {"weight": 0.3})


def test_no_balancer_rules(batch, pair):
    student, teacher = pair
    dm = kd.convert(student, teacher=teacher, criterion=torch.nn.MSELoss())
    dm(batch)
    with pytest.raises(ValueError, match="no balancer to combine"):
        dm.compute_kd_loss(student_loss=torch.tensor(1.0))
    with pytest.raises(ValueError, match="2 KD pairs need a balancer"):
        kd.convert(
            kd.export(dm),
            teacher=teacher,
            criterion={("", ""): torch.nn.MSELoss(), ("body", "body"): torch.nn.MSELoss()},
        )


def test_callable_balancer_gets_modelopt_loss_dict(batch, pair):
    student, teacher = pair
    seen = {}

    def balancer(loss_dict):
        seen.update(loss_dict)
        return sum(loss_dict.values())

    dm = kd.convert(student, teacher=teacher, criterion=torch.nn.MSELoss(), balancer=balancer)
    dm(batch)
    total = dm.compute_kd_loss(student_loss=torch.tensor(1.0))
    assert set(seen) == {"student_loss", "output~output"}  # ModelOpt's STUDENT_LOSS_KEY
    assert total.item() == pytest.approx(1.0 + seen["output~output"].item())
