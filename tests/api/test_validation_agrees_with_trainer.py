"""`POST /api/runs/validate` and the trainer agree: both accept a config, or both refuse it
naming the same field.

Each config goes through the API (in process) and through `kdlab.worker.trainer.Trainer` for one
step. A refusal is pinned by the error's location (the API's JSON path; the schema's for a
config the trainer cannot even parse) and by words both messages must contain.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kdlab.worker.config import RunConfig
from kdlab.worker.metrics import JsonlSink
from kdlab.worker.trainer import Trainer
from tests.factories import DIGITS_KD, DIGITS_TEACHER, config

GPT2_TINY = {"name": "gpt2", "params": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
GPT2_TEACHER = {"name": "gpt2", "params": {"n_layer": 1, "n_head": 2, "n_embd": 32}}
SYNTHETIC_LM = {"name": "synthetic_lm", "params": {"n_sequences": 64, "seq_len": 8}}


def _one_step(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["train"] = {**cfg["train"], "epochs": 1, "max_steps": 1, "batch_size": 16}
    if "distill" in cfg:  # an untrained teacher: the trainer's accuracy gate would stop it
        cfg["distill"] = {**cfg["distill"], "allow_weak_teacher": True}
    return cfg


def _pair(**pair: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DIGITS_KD)
    cfg["distill"]["pairs"] = [pair]
    return cfg


def _lm_kd(pair: dict[str, Any]) -> dict[str, Any]:
    cfg = config(DIGITS_KD, dataset=SYNTHETIC_LM, student=GPT2_TINY, teacher=GPT2_TEACHER)
    cfg["distill"]["pairs"] = [pair]
    return cfg


LM_LOGITS_KD = _lm_kd({"student_layer": "", "teacher_layer": "", "loss": {"name": "logits_kl"}})
ADAPTER_1CH = {"params": {"mean_from": 0.5, "std_from": 0.2, "mean_to": 0.4, "std_to": 0.3}}

# (id, config, None = accepted | (loc, words both messages contain))
CASES: list[tuple[str, dict[str, Any], tuple[list[Any], list[str]] | None]] = [
    ("logits_kd", DIGITS_KD, None),
    ("train_only", DIGITS_TEACHER, None),
    (
        "fitnet_auto_adapter",
        _pair(student_layer="features.0", teacher_layer="features.0", loss={"name": "feature_mse"}),
        None,
    ),
    (
        "shape_mismatch_no_adapter",
        _pair(
            student_layer="features.0",
            teacher_layer="features.0",
            loss={"name": "feature_mse", "params": {"adapter": None}},
        ),
        (["distill", "pairs", 0, "loss"], ["[2, 16]", "[2, 64]"]),
    ),
    (
        "unknown_student_layer",
        _pair(student_layer="features.1", teacher_layer="", loss={"name": "logits_kl"}),
        (["distill", "pairs", 0, "student_layer"], ["student_layer 'features.1'", "features.0"]),
    ),
    (
        "unknown_teacher_layer",
        _pair(student_layer="", teacher_layer="fcc", loss={"name": "logits_kl"}),
        (["distill", "pairs", 0, "teacher_layer"], ["teacher_layer 'fcc'"]),
    ),
    (
        "labels_loss_on_lm",
        _lm_kd({"student_layer": "", "teacher_layer": "", "loss": {"name": "mft"}}),
        None,
    ),
    (
        "bad_adapter_params",
        config(DIGITS_KD, distill={**DIGITS_KD["distill"], "teacher_input_adapter": ADAPTER_1CH}),
        (["distill", "teacher_input_adapter", "params"], ["NormalizationAdapter expects"]),
    ),
    (
        "unknown_dataset_param",
        config(DIGITS_KD, dataset={"name": "digits", "params": {"as_imag": True}}),
        (["dataset", "params", "as_imag"], ["Extra inputs are not permitted"]),
    ),
    (
        "adapter_on_token_ids",
        config(
            LM_LOGITS_KD, distill={**LM_LOGITS_KD["distill"], "teacher_input_adapter": ADAPTER_1CH}
        ),
        (["distill", "teacher_input_adapter"], ["token ids"]),
    ),
    (
        "non_tensor_layer_output",
        _lm_kd(
            {
                "student_layer": "transformer.h.0.attn",  # (attn_output, attn_weights)
                "teacher_layer": "transformer.h.0",
                "loss": {"name": "feature_mse"},
            }
        ),
        (
            ["distill", "pairs", 0, "student_layer"],
            ["not a tensor", "FeatureMSE needs tensors", "'transformer.h.0.attn'"],
        ),
    ),
]


def _trainer_refusal(cfg: dict[str, Any], out: Path) -> tuple[list[Any] | None, str] | None:
    """None when the trainer takes a step; else (schema loc or None, message)."""
    try:
        run_config = RunConfig.model_validate(cfg)
    except ValidationError as err:
        first = err.errors()[0]
        return list(first["loc"]), first["msg"]
    sink = JsonlSink(out / "metrics.jsonl")
    try:
        Trainer(run_config, out, sink, None, "cpu").fit()
    except (ValueError, TypeError) as err:  # a dry-run ConfigError carries the field's path
        return getattr(err, "loc", None), str(err)
    finally:
        sink.close()
    return None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("cfg", "expected"), [(c, e) for _, c, e in CASES], ids=[name for name, _, _ in CASES]
)
def test_validate_and_the_trainer_agree(client, tmp_path, cfg, expected):
    cfg = _one_step(cfg)
    response = client.post("/api/runs/validate", json=cfg)
    refusal = _trainer_refusal(cfg, tmp_path / "run")
    if expected is None:
        assert response.status_code == 200, response.text
        assert refusal is None, refusal
        return
    loc, words = expected
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"][: 1 + len(loc)] == ["body", *loc], error
    assert refusal is not None, "the trainer accepted a config the API refused"
    trainer_loc, trainer_msg = refusal
    if trainer_loc is not None:  # refused by the schema or the dry run: the very same path
        assert list(trainer_loc) == error["loc"][1 : 1 + len(trainer_loc)], (trainer_loc, error)
    for word in words:
        assert word in error["msg"], (word, error["msg"])
        assert word in trainer_msg, (word, trainer_msg)
