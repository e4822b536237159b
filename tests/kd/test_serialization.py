import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kdlab.worker import kd
from kdlab.worker.kd.losses import FeatureMSE, LogitsKL
from tests.kd.conftest import TinyNet


def independent_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_fingerprint_is_sha256_of_weights(pair):
    student, _ = pair
    assert kd.fingerprint(student) == independent_sha256(student)
    with torch.no_grad():
        student.head.bias[0] += 1e-3
    assert kd.fingerprint(student) == independent_sha256(student)


def test_fingerprint_of_bfloat16_weights_changes_with_them():
    model = TinyNet().to(torch.bfloat16)
    before = kd.fingerprint(model)
    with torch.no_grad():
        model.head.weight[0, 0] += 1
    assert kd.fingerprint(model) != before


def test_save_holds_student_only_and_restores_exactly(pair, batch, tmp_path):
    student, teacher = pair
    dm = kd.convert(
        student,
        teacher=teacher,
        criterion={("body", "body"): FeatureMSE(), ("", ""): LogitsKL(4.0)},
        balancer=kd.StaticBalancer([0.3, 0.3]),
        example_input=batch,
    )
    path = kd.save(dm, tmp_path / "student.safetensors", metadata={"run": "r1"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["kdlab"])
    assert keys == set(TinyNet().state_dict())
    assert header["student_class"] == "tests.kd.conftest.TinyNet"
    assert header["teacher_fingerprint"] == independent_sha256(teacher)
    assert header["run"] == "r1"
    assert [t["key"] for t in header["kd_loss"]["terms"]] == ["body~body", "output~output"]
    fresh = kd.restore(TinyNet(), path)
    torch.testing.assert_close(fresh(batch), kd.export(dm)(batch))
    assert kd.load_metadata(path) == header


def test_restore_into_wrong_class_is_refused(pair, tmp_path):
    student, _ = pair
    path = kd.save(student, tmp_path / "s.safetensors")

    class Other(TinyNet):
        pass

    with pytest.raises(TypeError, match="holds a tests.kd.conftest.TinyNet student"):
        kd.restore(Other(), path)


def test_restore_with_wrong_shape_is_refused(pair, tmp_path):
    student, _ = pair
    path = kd.save(student, tmp_path / "s.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):
        kd.restore(TinyNet(hidden=3), path)


def test_non_kdlab_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a KD Lab student file"):
        kd.load_metadata(tmp_path / "plain.safetensors")


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):
            return self.out(self.embed(x))

    model = Tied()
    path = kd.save(model, tmp_path / "tied.safetensors")
    assert kd.load_metadata(path)["aliases"] == {"out.weight": "embed.weight"}
    fresh = kd.restore(Tied(), path)
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(tokens), model(tokens))
    assert fresh.out.weight is fresh.embed.weight
    # the dry run reads the same names from the header alone, tied ones included
    shapes = kd.serialization.header_shapes(path)
    assert shapes == {k: list(v.shape) for k, v in kd.load_state_dict(path).items()}
    assert shapes["out.weight"] == [10, 4]


def test_restore_into_converted_student(pair, batch, tmp_path):
    student, teacher = pair
    path = kd.save(student, tmp_path / "s.safetensors")
    dm = kd.convert(
        TinyNet(), teacher=teacher, criterion={("body", "body"): FeatureMSE()}, example_input=batch
    )
    kd.restore(dm, path)
    with dm.only_student_forward():
        torch.testing.assert_close(dm(batch), student(batch))
