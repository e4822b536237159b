"""kdlab.worker.config: the RunConfig contract of DESIGN §2."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kdlab.worker.config import (
    DatasetSpec,
    RunConfig,
    error_lines,
    load_run_config,
    run_config_json_schema,
)

# DESIGN.md §2, verbatim (less the `// or "train"` comment).
DESIGN_EXAMPLE_JSON = """
{"name": "r18-from-r50", "experiment": "digits-kd", "kind": "distill",
 "seed": 0,
 "dataset": {"name": "digits", "params": {}, "val_fraction": 0.2},
 "student": {"name": "mlp", "params": {"hidden": [32]}},
 "teacher": {"name": "mlp", "params": {"hidden": [256, 256]},
             "weights": {"run_id": "<id of a finished run>", "checkpoint": "best"}},
 "distill": {"pairs": [{"student_layer": "", "teacher_layer": "",
                        "loss": {"name": "logits_kl", "params": {"temperature": 4.0}}}],
             "balancer": {"name": "static", "params": {"kd_weight": 0.7}},
             "teacher_input_adapter": null},
 "train": {"epochs": 10, "batch_size": 64,
           "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0},
           "scheduler": {"name": "cosine", "warmup_steps": 0},
           "amp": "none", "grad_clip": null, "ema_decay": null},
 "resources": {"gpus": 0}}
"""
NORMALIZATION = {"mean_from": 0.5, "std_from": 0.5, "mean_to": 0.0, "std_to": 1.0}


def example() -> dict[str, Any]:
    return json.loads(DESIGN_EXAMPLE_JSON)


def with_value(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with the dotted `path` set to `value` (list indices as digits)."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node: Any = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return config


def errors_of(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(config)
    return error_lines(info.value)


# --------------------------------------------------------------------------- the happy path


def test_design_example_validates_with_its_values() -> None:
    config = RunConfig.model_validate(example())
    assert config.schema_version == 1
    assert config.kind == "distill"
    assert config.teacher is not None and config.teacher.weights is not None
    assert config.teacher.weights.run_id == "<id of a finished run>"
    assert config.distill is not None
    assert config.distill.pairs[0].loss.params == {"temperature": 4.0}
    assert config.distill.balancer.params == {"kd_weight": 0.7}
    assert config.train.optimizer.lr == 0.001
    assert config.distill.allow_weak_teacher is False


def test_dump_round_trips() -> None:
    config = RunConfig.model_validate(example())
    assert RunConfig.model_validate_json(config.model_dump_json()) == config


def test_minimal_train_config_gets_defaults() -> None:
    config = RunConfig.model_validate(
        {"name": "t", "kind": "train", "dataset": {"name": "digits"}, "student": {"name": "mlp"}}
    )
    assert config.experiment == "default"
    assert config.seed == 0
    assert config.teacher is None and config.distill is None
    assert config.dataset.val_fraction == 0.2
    assert (config.train.log_every, config.train.eval_every_epochs) == (10, 1)
    assert config.train.best_metric == "eval/student_acc"
    assert config.train.student_loss == "cross_entropy"
    assert config.train.max_steps is None
    assert config.resources.gpus == 0


def test_distill_defaults_distill_the_outputs_with_logits_kl() -> None:
    config = RunConfig.model_validate(with_value(example(), "distill", {}))
    assert config.distill is not None
    [pair] = config.distill.pairs
    assert (pair.student_layer, pair.teacher_layer, pair.loss.name) == ("", "", "logits_kl")
    assert config.distill.balancer.name == "static"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("teacher.weights", {"upload_id": "u1"}),
        ("teacher.weights", {"path": "teacher.safetensors"}),
        ("teacher.weights", {"run_id": "r1", "checkpoint": "latest"}),
        ("teacher.weights", None),
        ("distill.balancer", {"name": "dynamic", "params": {"kd_weight": 0.3, "eps": 1e-6}}),
        ("distill.teacher_input_adapter", {"name": "normalization", "params": NORMALIZATION}),
        ("train.grad_clip", 1.0),
        ("train.ema_decay", 0.999),
        ("student.params", {"hidden": [], "dropout": 0.1, "activation": "gelu"}),
    ],
)
def test_valid_variants(path: str, value: Any) -> None:
    RunConfig.model_validate(with_value(example(), path, value))


def test_per_pair_weights_match_pairs() -> None:
    pairs = [
        {"loss": {"name": "logits_kl"}},
        {
            "student_layer": "features.0",
            "teacher_layer": "features.1",
            "loss": {"name": "feature_mse"},
        },
    ]
    config = with_value(example(), "distill.pairs", pairs)
    config = with_value(config, "distill.balancer.params", {"kd_weight": [0.4, 0.3]})
    assert RunConfig.model_validate(config).distill is not None


# --------------------------------------------------------------------------- every constraint


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("name", "", "name: String should have at least 1 character"),
        ("name", "has space", "name: String should match pattern"),
        ("name", "a/b", "name: String should match pattern"),
        ("name", "x" * 101, "name: String should have at most 100 characters"),
        ("schema_version", 2, "schema_version: Input should be 1"),
        ("kind", "finetune", "kind: Input should be 'distill' or 'train'"),
        ("train.optimizer.lr", 0, "train.optimizer.lr: Input should be greater than 0"),
        ("train.optimizer.lr", -1e-3, "train.optimizer.lr: Input should be greater than 0"),
        ("train.optimizer.name", "lamb", "train.optimizer.name: Input should be"),
        ("train.optimizer.weight_decay", -0.1, "train.optimizer.weight_decay: Input should be"),
        ("train.epochs", 0, "train.epochs: Input should be greater than or equal to 1"),
        ("train.batch_size", 0, "train.batch_size: Input should be greater than or equal to 1"),
        ("train.scheduler.warmup_steps", -1, "train.scheduler.warmup_steps: Input should be"),
        ("train.scheduler.name", "step", "train.scheduler.name: Input should be"),
        ("train.log_every", 0, "train.log_every: Input should be greater than or equal to 1"),
        ("train.amp", "fp8", "train.amp: Input should be 'none', 'bf16' or 'fp16'"),
        ("train.grad_clip", 0, "train.grad_clip: Input should be greater than 0"),
        ("train.ema_decay", 0, "train.ema_decay: Input should be greater than 0"),
        ("train.ema_decay", 1, "train.ema_decay: Input should be less than 1"),
        ("dataset.val_fraction", 0, "dataset.val_fraction: Input should be greater than 0"),
        ("dataset.val_fraction", 1, "dataset.val_fraction: Input should be less than 1"),
        ("resources.gpus", -1, "resources.gpus: Input should be greater than or equal to 0"),
        ("train.optimzer", {}, "train.optimzer: Extra inputs are not permitted"),
        ("student.weights", {"run_id": "r"}, "student.weights: Extra inputs are not permitted"),
        ("dataset.name", "digit", "dataset.name: unknown dataset 'digit'; did you mean 'digits'?"),
        ("student.name", "mpl", "student.name: unknown model 'mpl'; did you mean 'mlp'?"),
        ("teacher.name", "resnet", "teacher.name: unknown model 'resnet'; did you mean"),
        ("student.params", {"hidden": [0]}, "student.params.hidden.0: Input should be greater"),
        ("student.params", {"hiden": [8]}, "student.params.hiden: Extra inputs are not permitted"),
        ("dataset.params", {"as_image": "maybe"}, "dataset.params.as_image: Input should be"),
        ("teacher.weights", {}, "teacher.weights: give exactly one of run_id, upload_id, path"),
        (
            "teacher.weights",
            {"run_id": "r", "upload_id": "u"},
            "teacher.weights: give exactly one of run_id, upload_id, path",
        ),
        ("teacher.weights.checkpoint", "last", "teacher.weights.checkpoint: Input should be"),
        ("distill.pairs", [], "distill.pairs: List should have at least 1 item"),
        (
            "distill.pairs.0.loss.name",
            "logit_kl",
            "distill.pairs.0.loss.name: unknown loss 'logit_kl'; did you mean 'logits_kl'?",
        ),
        ("distill.pairs.0.loss.params", {"temp": 2.0}, "distill.pairs.0.loss.params: "),
        ("distill.balancer.name", "fancy", "distill.balancer.name: Input should be"),
        ("distill.balancer.params", {"kd_weight": 1.5}, "distill.balancer.params.kd_weight: "),
        ("distill.balancer.params", {"kd_weight": -0.1}, "distill.balancer.params.kd_weight: "),
        (
            "distill.balancer.params",
            {"kd_weight": [0.6, 0.6]},
            "distill.balancer.params.kd_weight: weights must sum to at most 1",
        ),
        (
            "distill.balancer.params",
            {"kd_weight": [0.3, 0.3]},
            "distill.balancer: params.kd_weight has 2 weights for 1 pairs",
        ),
        ("distill.balancer.params", {"weight": 0.5}, "distill.balancer.params.weight: Extra"),
        (
            "distill.teacher_input_adapter",
            {"name": "whiten", "params": NORMALIZATION},
            "distill.teacher_input_adapter.name: Input should be 'normalization'",
        ),
        (
            "distill.teacher_input_adapter",
            {"name": "normalization", "params": {**NORMALIZATION, "std_to": 0.0}},
            "distill.teacher_input_adapter.params: std_from and std_to must be > 0",
        ),
        (
            "distill.teacher_input_adapter",
            {"name": "normalization", "params": {"mean_from": 0.5}},
            "distill.teacher_input_adapter.params.std_from: Field required",
        ),
        (
            "distill.teacher_input_adapter",
            {"name": "normalization", "params": {**NORMALIZATION, "mean_to": [0.1, 0.2]}},
            "distill.teacher_input_adapter.params: mean_from, std_from, mean_to, std_to need",
        ),
        ("distill.allow_weak_teacher", "sometimes", "distill.allow_weak_teacher: Input should be"),
    ],
)
def test_constraint_is_rejected_with_its_json_path(path: str, value: Any, expected: str) -> None:
    lines = errors_of(with_value(example(), path, value))
    assert any(line.startswith(expected) for line in lines), lines


def test_duplicate_pairs_are_rejected() -> None:
    pair = {"loss": {"name": "logits_kl"}}
    lines = errors_of(with_value(example(), "distill.pairs", [pair, pair]))
    assert any(
        line.startswith("distill.pairs: each (student_layer, teacher_layer)") for line in lines
    )


def test_every_error_is_reported_at_once() -> None:
    config = with_value(example(), "train.optimizer.lr", 0)
    config = with_value(config, "train.epochs", 0)
    lines = errors_of(config)
    assert {line.split(":")[0] for line in lines} == {"train.optimizer.lr", "train.epochs"}


# --------------------------------------------------------------------------- kind consistency


def test_train_run_must_not_have_teacher_or_distill() -> None:
    lines = errors_of(with_value(example(), "kind", "train"))
    assert any(line.startswith("teacher: a train run has no teacher") for line in lines)
    assert any(line.startswith("distill: a train run has no distill") for line in lines)


def test_distill_run_needs_teacher_and_distill() -> None:
    config = example()
    del config["teacher"], config["distill"]
    lines = errors_of(config)
    assert "teacher: a distill run needs teacher" in lines
    assert "distill: a distill run needs distill" in lines


def test_train_run_without_teacher_validates() -> None:
    config = example()
    del config["teacher"], config["distill"]
    config["kind"] = "train"
    assert RunConfig.model_validate(config).kind == "train"


def test_train_run_needs_a_student_loss() -> None:
    config = example()
    del config["teacher"], config["distill"]
    config = with_value(with_value(config, "kind", "train"), "train.student_loss", "none")
    assert any(line.startswith("train: student_loss") for line in errors_of(config))


def test_pure_kd_distill_run_may_drop_the_student_loss() -> None:
    config = with_value(example(), "train.student_loss", "none")
    assert RunConfig.model_validate(config).train.student_loss == "none"


# --------------------------------------------------------------------------- files


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(example()), encoding="utf-8")
    assert load_run_config(path) == RunConfig.model_validate(example())


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(DESIGN_EXAMPLE_JSON, encoding="utf-8")
    assert load_run_config(path).name == "r18-from-r50"


def test_load_lists_each_error_with_its_path(tmp_path: Path) -> None:
    config = with_value(with_value(example(), "train.optimizer.lr", 0), "student.name", "mpl")
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_run_config(path)
    message = str(info.value)
    assert "train.optimizer.lr: Input should be greater than 0" in message.splitlines()
    assert "student.name: unknown model 'mpl'; did you mean 'mlp'?" in message


def test_load_refuses_broken_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid"):
        load_run_config(path)


def test_load_refuses_a_non_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="<root>: Input should be a valid dictionary"):
        load_run_config(path)


def test_dataset_path_param_cannot_escape_the_data_root() -> None:
    with pytest.raises(ValidationError) as info:
        DatasetSpec.model_validate({"name": "text_file", "params": {"path": "../x"}})
    [line] = error_lines(info.value)
    assert line.startswith("params.path: '../x' must be relative to the data root")


# --------------------------------------------------------------------------- JSON Schema


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_json_schema_is_self_contained_and_described() -> None:
    schema = json.loads(json.dumps(run_config_json_schema()))
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "kind", "dataset", "student"}
    for ref in _refs(schema):
        assert ref.removeprefix("#/$defs/") in schema["$defs"], ref
    for model in [schema, *schema["$defs"].values()]:
        for field, spec in model.get("properties", {}).items():
            assert spec.get("description"), f"{model['title']}.{field} has no description"


def test_json_schema_validates_the_design_example() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = run_config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(example(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(with_value(example(), "train.optimizer.lr", 0), schema)
