"""Flat launch-form fields → the nested config (kdlab.backend.services.form_codec)."""

from __future__ import annotations

import pytest

from kdlab.backend.services.form_codec import decode, field_id, parse_value, split_name


def test_names_carry_path_and_type() -> None:
    assert split_name("distill.pairs.0.loss.name:str") == (
        ["distill", "pairs", 0, "loss", "name"],
        "str",
    )
    assert split_name("seed:int") == (["seed"], "int")
    assert split_name("plain") == (["plain"], "str")  # no known type: a string


def test_values_are_read_by_their_type() -> None:
    assert parse_value("7", "int", []) == 7
    assert parse_value("0.25", "float", []) == 0.25
    assert parse_value("64, 32", "list", []) == [64, 32]
    assert parse_value("[0.5, 1e-3]", "list", []) == [0.5, 0.001]
    assert parse_value('{"a": [1, 2]}', "json", []) == {"a": [1, 2]}
    assert parse_value("on", "bool", []) is True
    assert parse_value("false", "bool", []) is False


def test_a_form_becomes_a_nested_config_with_lists_by_index() -> None:
    fields = [
        ("csrf_token", "x"),
        ("_action", "add_pair"),
        ("name:str", "kd-1"),
        ("train.epochs:int", "3"),
        ("train.grad_clip:float", ""),  # empty: left out, the default applies
        ("student.params.hidden:list", "16"),
        ("distill.pairs.1.loss.name:str", "feature_mse"),
        ("distill.pairs.0.loss.name:str", "logits_kl"),
        ("distill.allow_weak_teacher:bool", "false"),
        ("distill.allow_weak_teacher:bool", "true"),  # the checkbox after its hidden field
    ]
    config, errors = decode(fields)
    assert errors == []
    assert config == {
        "name": "kd-1",
        "train": {"epochs": 3},
        "student": {"params": {"hidden": [16]}},
        "distill": {
            "pairs": [{"loss": {"name": "logits_kl"}}, {"loss": {"name": "feature_mse"}}],
            "allow_weak_teacher": True,
        },
    }


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("train.epochs:int", "ten", "'ten' is not a whole number"),
        ("train.optimizer.lr:float", "fast", "'fast' is not a number"),
        ("student.params.hidden:list", "16, wide", "numbers separated by commas"),
        ("distill.balancer.params.kd_weight:json", "[0.5,", "a JSON value"),
    ],
)
def test_unreadable_fields_are_errors_at_their_path(name: str, text: str, words: str) -> None:
    config, errors = decode([(name, text), ("name:str", "ok")])
    assert config == {"name": "ok"}  # the bad field is not half-stored
    assert len(errors) == 1
    assert errors[0].loc == split_name(name)[0]
    assert words in errors[0].msg


def test_field_ids_follow_the_path() -> None:
    assert field_id(["train", "log_every"]) == "f-train-log-every"
    assert field_id(["distill", "pairs", 0, "student_layer"]) == "f-distill-pairs-0-student-layer"
