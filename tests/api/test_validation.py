"""Run-config validation: POST /api/runs/validate, and every bad input POST /api/runs refuses."""

from __future__ import annotations

import copy
from typing import Any

import torch
from safetensors.torch import save_file

from kdlab.backend.db.models import Artifact, Upload
from kdlab.worker import catalog
from kdlab.worker.config import ModelSpec, SchedulerSpec
from kdlab.worker.kd.losses import LogitsKL
from tests.factories import DIGITS_KD, DIGITS_TEACHER, config, create_run

DIGITS_INFO = catalog.DataInfo("classification", 10, (64,), torch.float32)


def run_count(client) -> int:
    return client.get("/api/runs").json()["total"]


def kd_config(**pair: Any) -> dict[str, Any]:
    """DIGITS_KD with one pair replaced by `pair` (student_layer, teacher_layer, loss)."""
    cfg = copy.deepcopy(DIGITS_KD)
    if pair:
        cfg["distill"]["pairs"] = [pair]
    return cfg


def independent_param_bytes(name: str, params: dict[str, Any]) -> int:
    model = catalog.build_model(ModelSpec(name=name, params=params), DIGITS_INFO)
    return sum(p.numel() * 4 for p in model.parameters())


def test_validate_resolves_defaults_shapes_and_memory(client):
    response = client.post("/api/runs/validate", json=DIGITS_KD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["valid"] is True
    resolved = body["config"]
    # defaults filled in from the pydantic model itself
    assert resolved["train"]["scheduler"]["name"] == SchedulerSpec.model_fields["name"].default
    assert resolved["dataset"]["val_fraction"] == 0.2
    assert resolved["schema_version"] == 1
    assert body["pairs"] == [
        {
            "student_layer": "",
            "teacher_layer": "",
            "student_shape": [2, 10],
            "teacher_shape": [2, 10],
            "adapter": None,
            "formula": LogitsKL(temperature=4.0).describe(),
        }
    ]
    # 0.7 on the KD term, 1 − 0.7 on cross-entropy, as the trainer will log it
    kd_term = LogitsKL(temperature=4.0).describe()
    assert body["loss_formula"] == (
        "total = 0.3·[cross_entropy(student_logits, labels), mean over labels != -100]"
        f" + 0.7·[{kd_term}]"
    )
    memory = body["memory"]
    student_bytes = independent_param_bytes("mlp", {"hidden": [16]})
    teacher_bytes = independent_param_bytes("mlp", {"hidden": [64]})
    assert memory["parameters"] == student_bytes
    assert memory["gradients"] == student_bytes
    assert memory["optimizer_state"] == 2 * student_bytes  # AdamW: two fp32 states
    assert memory["logits"] == 64 * 10 * 4 * 3  # batch 64 × 10 classes × fp32 × 3 (KD)
    assert memory["teacher"] >= teacher_bytes
    parts = ("parameters", "gradients", "optimizer_state", "activations", "logits", "teacher")
    assert memory["per_gpu_bytes"] == sum(memory[k] for k in parts)
    assert run_count(client) == 0  # a dry run stores nothing


def test_validate_reports_the_learned_adapter(client):
    pair = {"student_layer": "features.0", "teacher_layer": "features.0"}
    cfg = kd_config(**pair, loss={"name": "feature_mse"})
    body = client.post("/api/runs/validate", json=cfg).json()
    assert body["pairs"][0]["student_shape"] == [2, 16]
    assert body["pairs"][0]["teacher_shape"] == [2, 64]
    assert body["pairs"][0]["adapter"] == "Linear(16→64)"
    # the adapter (16×64, no bias) is trained too
    expected = independent_param_bytes("mlp", {"hidden": [16]}) + 16 * 64 * 4
    assert body["memory"]["parameters"] == expected


def test_train_run_validates_without_teacher(client):
    body = client.post("/api/runs/validate", json=DIGITS_TEACHER).json()
    assert body["pairs"] == []
    assert body["memory"]["teacher"] == 0
    assert body["memory"]["logits"] == 64 * 10 * 4


def _bad(cfg: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    target = cfg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return cfg


BAD_CONFIGS = [
    # (config, loc of the first error, words its message must contain)
    (_bad(DIGITS_KD, ["student", "name"], "mpl"), ["student", "name"], ["'mpl'", "'mlp'"]),
    (_bad(DIGITS_KD, ["dataset", "name"], "digitz"), ["dataset", "name"], ["'digits'"]),
    (
        _bad(DIGITS_KD, ["distill", "pairs", 0, "loss", "name"], "kl"),
        ["distill", "pairs", 0, "loss", "name"],
        ["unknown loss 'kl'"],
    ),
    (_bad(DIGITS_KD, ["train", "optimizer", "lr"], -0.1), ["train", "optimizer", "lr"], ["0"]),
    (_bad(DIGITS_KD, ["train", "epochs"], -1), ["train", "epochs"], ["1"]),
    (_bad(DIGITS_KD, ["train", "batch_size"], 0), ["train", "batch_size"], ["1"]),
    (
        _bad(DIGITS_KD, ["student", "params"], {"hidden": [0]}),
        ["student", "params", "hidden", 0],
        [],
    ),
    (
        kd_config(student_layer="features.1", teacher_layer="", loss={"name": "logits_kl"}),
        ["distill", "pairs", 0, "student_layer"],
        ["'features.1'", "features.0"],
    ),
    (
        kd_config(
            student_layer="features.0",
            teacher_layer="features.0",
            loss={"name": "feature_mse", "params": {"adapter": None}},
        ),
        ["distill", "pairs", 0, "loss"],
        ["[2, 16]", "[2, 64]"],
    ),
    (
        _bad(DIGITS_KD, ["teacher", "weights"], {"path": "/tmp/teacher.safetensors"}),
        ["teacher", "weights", "path"],
        ["kdlab train", "upload_id"],
    ),
    (
        _bad(
            DIGITS_KD,
            ["distill", "teacher_input_adapter"],
            {"params": {"mean_from": 0.5, "std_from": 0.2, "mean_to": 0.4, "std_to": 0.3}},
        ),
        ["distill", "teacher_input_adapter", "params"],
        ["[B, 64]"],
    ),
    (
        config(DIGITS_KD, student={"name": "cnn_small", "params": {}}),
        ["student"],
        ["as_image"],
    ),
]


def test_bad_bodies_get_422_with_json_paths_and_store_nothing(client):
    for cfg, loc, words in BAD_CONFIGS:
        created = client.post("/api/runs", json=cfg)
        assert created.status_code == 422, (loc, created.text)
        errors = created.json()["detail"]
        assert errors[0]["loc"] == ["body", *loc], errors
        for word in words:
            assert word in errors[0]["msg"], (word, errors[0]["msg"])
        validated = client.post("/api/runs/validate", json=cfg)
        assert validated.status_code == 422
        assert validated.json()["detail"] == errors  # one validator for both
    # malformed JSON and bodies that are no object: FastAPI's own 422
    for content in (b'{"name": "x",', b"[1, 2]", b"null"):
        response = client.post(
            "/api/runs", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, content
        assert response.json()["detail"][0]["loc"][0] == "body"
    assert run_count(client) == 0


def _teacher_run(db_session, status: str, student_params: dict[str, Any], artifact: str | None):
    cfg = config(DIGITS_TEACHER, student={"name": "mlp", "params": student_params})
    run = create_run(db_session, name="teacher", status=status, run_config=cfg)
    if artifact is not None:
        db_session.add(
            Artifact(
                run_id=run.id,
                name=artifact,
                kind="checkpoint",
                sha256="0" * 64,
                size=1,
                path=f"{run.id}/{artifact}",
            )
        )
        db_session.commit()
    return run.id


def _with_teacher_run(run_id: str, checkpoint: str = "best") -> dict[str, Any]:
    cfg = copy.deepcopy(DIGITS_KD)
    cfg["teacher"]["weights"] = {"run_id": run_id, "checkpoint": checkpoint}
    return cfg


def test_teacher_run_must_exist_succeed_match_and_have_the_checkpoint(client, db_session):
    loc = ["body", "teacher", "weights", "run_id"]
    running = _teacher_run(db_session, "running", {"hidden": [64]}, "best.safetensors")
    failed = _teacher_run(db_session, "failed", {"hidden": [64]}, "best.safetensors")
    other_model = _teacher_run(db_session, "succeeded", {"hidden": [128]}, "best.safetensors")
    no_best = _teacher_run(db_session, "succeeded", {"hidden": [64]}, "latest.pt")
    good = _teacher_run(db_session, "succeeded", {"hidden": [64]}, "best.safetensors")
    other_data = create_run(
        db_session,
        name="lm",
        status="succeeded",
        run_config=config(
            DIGITS_TEACHER,
            dataset={"name": "synthetic_classification", "params": {"n_classes": 5}},
            student={"name": "mlp", "params": {"hidden": [64]}},
        ),
    ).id
    db_session.close()
    before = run_count(client)
    cases = [
        ("nope", loc, ["'nope'", "does not exist"]),
        (running, loc, [f"teacher run {running} is running", "wait until it succeeds"]),
        (failed, loc, [f"teacher run {failed} is failed"]),
        (other_model, loc, ["[128]", "[64]", "'mlp'"]),
        (other_data, loc, ["synthetic_classification", "5 classes", "10 classes"]),
        (no_best, ["body", "teacher", "weights", "checkpoint"], ["best.safetensors"]),
    ]
    for run_id, where, words in cases:
        response = client.post("/api/runs", json=_with_teacher_run(run_id))
        assert response.status_code == 422, (run_id, response.text)
        error = response.json()["detail"][0]
        assert error["loc"] == where
        for word in words:
            assert word in error["msg"], (word, error["msg"])
    assert run_count(client) == before

    latest = client.post("/api/runs", json=_with_teacher_run(no_best, "latest"))
    assert latest.status_code == 201, latest.text
    created = client.post("/api/runs", json=_with_teacher_run(good))
    assert created.status_code == 201, created.text
    assert created.json()["teacher_run_id"] == good
    assert run_count(client) == before + 2


def _upload(db_session, settings, upload_id: str, hidden: list[int]) -> None:
    model = catalog.build_model(ModelSpec(name="mlp", params={"hidden": hidden}), DIGITS_INFO)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(model.state_dict()), str(settings.uploads_dir / f"{upload_id}.safetensors"))
    db_session.add(
        Upload(
            id=upload_id,
            filename="teacher.safetensors",
            format="safetensors",
            sha256="0" * 64,
            size=1,
            path=f"{upload_id}.safetensors",
            tensor_count=len(model.state_dict()),
        )
    )
    db_session.commit()


def test_uploaded_teacher_weights_must_fit_the_teacher(client, db_session, settings):
    _upload(db_session, settings, "fits", [64])
    _upload(db_session, settings, "misfit", [32])
    db_session.close()
    loc = ["body", "teacher", "weights", "upload_id"]
    for upload_id, words in (("nope", ["'nope'"]), ("misfit", ["[32, 64]", "[64, 64]"])):
        cfg = copy.deepcopy(DIGITS_KD)
        cfg["teacher"]["weights"] = {"upload_id": upload_id}
        response = client.post("/api/runs", json=cfg)
        assert response.status_code == 422, response.text
        error = response.json()["detail"][0]
        assert error["loc"] == loc
        for word in words:
            assert word in error["msg"], (word, error["msg"])
    assert run_count(client) == 0
    cfg = copy.deepcopy(DIGITS_KD)
    cfg["teacher"]["weights"] = {"upload_id": "fits"}
    assert client.post("/api/runs", json=cfg).status_code == 201
