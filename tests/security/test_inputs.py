"""Hostile inputs at submit (issue 9): every number finite and bounded, names restricted, the dry
run size- and time-boxed, a malformed Authorization header a 401. Each test replays an attack
that used to be stored (201) or crash (500) and checks the 422/401 and that nothing was stored.

The expected limits are written out here on purpose (not imported), so a bound that moves or
disappears fails a test.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kdlab.backend.main import create_app
from kdlab.backend.settings import Settings
from tests.factories import DIGITS_KD, DIGITS_TEACHER, config, create_run

HUGE = 99999999999999999999  # > 2**64: no SQL integer holds it


def raw_json(body: Any) -> str:
    """`body` as JSON with Python's non-standard `Infinity`/`NaN` tokens (what an attacker
    sends; FastAPI's parser accepts them)."""
    return json.dumps(body, allow_nan=True)


def post(client: TestClient, path: str, body: Any) -> Any:
    return client.post(path, content=raw_json(body), headers={"Content-Type": "application/json"})


def with_value(base: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """A deep copy of `base` with `value` at `path` (parents created as needed)."""
    body = copy.deepcopy(base)
    node: Any = body
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = value
    return body


def run_count(client: TestClient) -> int:
    response = client.get("/api/runs")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def refused(response: Any, loc: list[str | int], *words: str) -> dict[str, Any]:
    """The 422 error at `loc`, whose message contains each of `words`."""
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    at = [e for e in errors if e["loc"] == loc]
    assert at, f"no error at {loc}: {errors}"
    for word in words:
        assert any(word in e["msg"] for e in at), (word, at)
    return at[0]


# --------------------------------------------------------------------------- non-finite numbers

NON_FINITE = [float("inf"), float("-inf"), float("nan")]
TRAIN_FLOATS = [
    (DIGITS_TEACHER, ["train", "optimizer", "lr"]),
    (DIGITS_TEACHER, ["train", "optimizer", "weight_decay"]),
    (DIGITS_TEACHER, ["train", "grad_clip"]),
    (DIGITS_TEACHER, ["train", "optimizer", "momentum"]),
    (DIGITS_TEACHER, ["dataset", "val_fraction"]),
    (DIGITS_TEACHER, ["student", "params", "dropout"]),  # a typed catalog param
    (DIGITS_KD, ["distill", "pairs", 0, "loss", "params", "temperature"]),  # passed through
    (DIGITS_KD, ["distill", "balancer", "params", "kd_weight"]),
]


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(
    ("base", "path"), TRAIN_FLOATS, ids=[".".join(map(str, p)) for _, p in TRAIN_FLOATS]
)
def test_non_finite_numbers_in_a_config_are_refused(client, base, path, value):
    before = run_count(client)
    body = with_value(base, path, value)
    for route in ("/api/runs", "/api/runs/validate"):
        refused(post(client, route, body), ["body", *path], "finite")
    assert run_count(client) == before


def test_a_finite_config_still_passes(client):
    body = with_value(DIGITS_TEACHER, ["train", "grad_clip"], 1.5)
    response = post(client, "/api/runs", body)
    assert response.status_code == 201, response.text
    assert response.json()["config"]["train"]["grad_clip"] == 1.5


def test_non_finite_numbers_in_free_form_model_params(client):
    """A plug-in-free path: dataset params are typed, but any free-form value is checked too."""
    body = with_value(
        DIGITS_TEACHER,
        ["dataset"],
        {"name": "synthetic_classification", "params": {"noise": float("inf")}},
    )
    refused(post(client, "/api/runs/validate", body), ["body", "dataset", "params", "noise"])
    assert run_count(client) == 0


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_non_finite_numbers_in_external_params_are_refused(client, value):
    body = {
        "kind": "external",
        "name": "ext-run",
        "experiment": "ext",
        "params": {"lr": 0.1, "sweep": {"values": [1.0, value]}},
    }
    refused(post(client, "/api/runs", body), ["body", "params", "sweep", "values", 1], "finite")
    assert run_count(client) == 0


def test_huge_integers_in_external_params_are_refused(client):
    body = {"kind": "external", "name": "ext-run", "params": {"steps": 2**64}}
    refused(post(client, "/api/runs", body), ["body", "params", "steps"], "64-bit")
    assert run_count(client) == 0


def nested(levels: int) -> str:
    """A params object `levels` containers deep (the params object itself is level 1),
    written by hand: json.dumps would hit Python's recursion limit first."""
    return '{"a":' * levels + "1" + "}" * levels


@pytest.mark.parametrize("levels", [33, 253, 980])
def test_deeply_nested_external_params_are_refused(client, levels):
    text = '{"kind":"external","name":"deep","params":' + nested(levels) + "}"
    response = client.post("/api/runs", content=text, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == "too_deep" and "levels deep" in error["msg"], error
    # a container past the bound is named: level k sits k - 1 keys below params (the app's
    # raw-body guard may stop a very deep body before the params check at level 33 does)
    assert error["loc"][:2] == ["body", "params"], error
    assert set(error["loc"][2:]) == {"a"} and 32 <= len(error["loc"][2:]) < levels, error
    assert run_count(client) == 0


def test_params_33_levels_deep_name_the_33rd_level(client):
    text = '{"kind":"external","name":"deep","params":' + nested(33) + "}"
    response = client.post("/api/runs", content=text, headers={"Content-Type": "application/json"})
    refused(response, ["body", "params", *["a"] * 32], "nested more than 32 levels deep")


def test_params_32_levels_deep_are_accepted(client):
    text = '{"kind":"external","name":"deep","params":' + nested(32) + "}"
    response = client.post("/api/runs", content=text, headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    node = response.json()["config"]["params"]
    containers = 0
    while isinstance(node, dict):
        node, containers = node["a"], containers + 1
    assert (node, containers) == (1, 32)


def test_deeply_nested_model_params_are_refused(client):
    body = with_value(DIGITS_TEACHER, ["student", "params"], json.loads(nested(40)))
    refused(post(client, "/api/runs/validate", body), ["body", "student", "params", *["a"] * 32])


# --------------------------------------------------------------------------- bounds


BOUNDS = [
    (["train", "epochs"], 10**30, "100000"),
    (["train", "epochs"], 100_001, "100000"),
    (["train", "batch_size"], 10**12, "65536"),
    (["train", "batch_size"], 65_537, "65536"),
    (["seed"], 2**70, str(2**32)),
    (["seed"], 2**32, str(2**32)),
    (["train", "max_steps"], HUGE, str(2**62)),
    (["train", "scheduler", "warmup_steps"], HUGE, str(2**62)),
    (["train", "log_every"], HUGE, str(2**62)),
    (["train", "eval_every_epochs"], 100_001, "100000"),
    (["resources", "gpus"], 10**6, "64"),
    (["student", "params", "hidden"], [8] * 5000, "64"),
    (["student", "params", "hidden"], [8] * 65, "64"),
    (["student", "params", "hidden", 0], 65_537, "65536"),
]


@pytest.mark.parametrize(
    ("path", "value", "limit"),
    BOUNDS,
    ids=[f"{'.'.join(map(str, p))}={str(v)[:12]}" for p, v, _ in BOUNDS],
)
def test_absurd_numbers_are_refused_naming_field_and_limit(client, path, value, limit):
    base = with_value(DIGITS_TEACHER, ["student", "params", "hidden"], [8])
    body = with_value(base, path, value)
    for route in ("/api/runs", "/api/runs/validate"):
        refused(post(client, route, body), ["body", *path], limit)
    assert run_count(client) == 0


def test_values_at_the_bounds_are_accepted(client):
    body = config(
        DIGITS_TEACHER,
        seed=2**32 - 1,
        student={"name": "mlp", "params": {"hidden": [4] * 64}},
    )
    body["train"] = {**body["train"], "epochs": 100_000, "batch_size": 65_536}
    response = post(client, "/api/runs/validate", body)
    assert response.status_code == 200, response.text
    resolved = response.json()["config"]
    assert (resolved["seed"], resolved["train"]["epochs"], resolved["train"]["batch_size"]) == (
        2**32 - 1,
        100_000,
        65_536,
    )


def test_gpt2_layer_count_is_bounded(client):
    body = config(
        DIGITS_TEACHER,
        dataset={"name": "synthetic_lm", "params": {"seq_len": 8, "vocab_size": 16}},
        student={"name": "gpt2", "params": {"n_layer": 5000, "n_head": 1, "n_embd": 8}},
    )
    refused(
        post(client, "/api/runs/validate", body), ["body", "student", "params", "n_layer"], "64"
    )


def test_synthetic_data_size_is_bounded(client):
    body = config(
        DIGITS_TEACHER,
        dataset={
            "name": "synthetic_classification",
            "params": {"n_samples": 10**7, "n_features": 65_536},
        },
    )
    refused(post(client, "/api/runs/validate", body), ["body", "dataset", "params"], str(2**28))


@pytest.mark.parametrize("query", [f"offset={HUGE}", f"offset={2**62 + 1}", "limit=501"])
def test_run_list_paging_is_bounded(client, query):
    name = query.split("=")[0]
    refused(client.get(f"/api/runs?{query}"), ["query", name])


def test_run_list_paging_at_the_bound(client):
    response = client.get(f"/api/runs?offset={2**62}")
    assert response.status_code == 200, response.text
    assert response.json()["runs"] == []


def test_runs_page_number_is_bounded(client):
    assert client.get(f"/?page={HUGE}").status_code == 422


@pytest.fixture
def run_id(db_session) -> Iterator[str]:
    yield create_run(db_session, name="with-metrics", status="running").id


@pytest.mark.parametrize("param", ["min_step", "max_step", "min_time", "max_time"])
def test_metric_windows_are_bounded(client, run_id, param):
    value = HUGE if param.endswith("step") else "inf"
    response = client.get(f"/api/runs/{run_id}/metrics?{param}={value}")
    refused(response, ["query", param])
    compare = client.get(f"/api/compare?runs={run_id}&keys=train/loss&{param}={value}")
    refused(compare, ["query", param])


def test_metric_window_steps_up_to_bigint_are_served(client, run_id):
    top = 2**63 - 1  # the metric step column is a BIGINT
    point = {"points": [{"key": "train/loss", "step": top, "value": 0.5}]}
    assert client.post(f"/api/runs/{run_id}/metrics", json=point).status_code == 200
    response = client.get(f"/api/runs/{run_id}/metrics?keys=train/loss&min_step={top}")
    assert response.status_code == 200, response.text
    assert response.json()["series"][0]["step"] == [top]
    refused(client.get(f"/api/runs/{run_id}/metrics?max_step={top + 1}"), ["query", "max_step"])


@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_metric_window_times_are_finite(client, run_id, value):
    refused(client.get(f"/api/runs/{run_id}/metrics?min_time={value}"), ["query", "min_time"])


# --------------------------------------------------------------------------- the dry run's box


def test_validate_with_5000_hidden_layers_is_refused_by_the_schema(client):
    body = config(DIGITS_TEACHER, student={"name": "mlp", "params": {"hidden": [8] * 5000}})
    error = refused(
        post(client, "/api/runs/validate", body), ["body", "student", "params", "hidden"]
    )
    assert "at most 64" in error["msg"], error


def test_a_model_with_too_many_modules_is_refused_before_its_probe(client, monkeypatch):
    from kdlab.worker import dry_run as service

    monkeypatch.setattr(service, "PROBE_MAX_MODULES", 10)
    body = config(DIGITS_TEACHER, student={"name": "mlp", "params": {"hidden": [8] * 4}})
    # MLP: itself, flatten, features, 4 blocks × (Sequential, Linear, ReLU), fc
    modules = 1 + 1 + 1 + 4 * 3 + 1
    error = refused(post(client, "/api/runs/validate", body), ["body", "student"])
    assert error["msg"] == (
        f"student 'mlp': {modules} layers (modules); the probe handles at most 10: use fewer layers"
    )
    assert run_count(client) == 0


def test_a_model_with_too_many_parameters_is_refused(client, monkeypatch):
    from kdlab.worker import dry_run as service

    monkeypatch.setattr(service, "PROBE_MAX_PARAMS", 1000)
    body = config(DIGITS_KD, student={"name": "mlp", "params": {"hidden": [4]}})
    params = 64 * 64 + 64 + 64 * 10 + 10  # the teacher: Linear(64→64) + Linear(64→10)
    error = refused(post(client, "/api/runs", body), ["body", "teacher"])
    assert error["msg"].startswith(f"teacher 'mlp': {params:,} parameters;"), error
    assert run_count(client) == 0


def test_a_model_that_needs_a_real_forward_is_bounded_in_size(client, monkeypatch):
    """Meta and fake tensors both fail (data-dependent code): the CPU forward that is left
    would allocate the model, so it has its own, smaller bound."""
    from kdlab.worker import dry_run as service

    def fails(*_: Any, **__: Any) -> Any:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(service, "probe_outputs", fails)
    monkeypatch.setattr(service, "fake_outputs", fails)
    monkeypatch.setattr(service, "CPU_FORWARD_MAX_PARAMS", 1000)
    params = 64 * 16 + 16 + 16 * 10 + 10  # Linear(64→16) + Linear(16→10)
    body = config(DIGITS_TEACHER, student={"name": "mlp", "params": {"hidden": [16]}})
    error = refused(post(client, "/api/runs/validate", body), ["body", "student"])
    assert error["msg"].startswith(f"student 'mlp': {params:,} parameters, and the model"), error
    assert "at most 1,000" in error["msg"]
    assert run_count(client) == 0


def test_the_dry_run_is_time_boxed(client, monkeypatch):
    from kdlab.backend.services import validation

    monkeypatch.setattr(validation, "PROBE_TIME_LIMIT_S", 0)
    error = refused(post(client, "/api/runs/validate", DIGITS_TEACHER), ["body", "student"])
    assert "the dry run took longer than 0 s" in error["msg"], error
    refused(post(client, "/api/runs", DIGITS_TEACHER), ["body", "student"], "took longer")
    assert run_count(client) == 0


def test_the_layer_tree_is_time_boxed(client, monkeypatch):
    from kdlab.backend.services import catalog as service

    monkeypatch.setattr(service, "PROBE_TIME_LIMIT_S", 0)
    response = client.get("/api/catalog/models/mlp/layers?dataset=digits")
    refused(response, ["query", "params"], "took longer than 0 s")


def test_probe_hooks_are_linear_in_the_layer_count():
    """The quadratic part was one named_modules() walk per hooked layer: count the walks."""
    import torch
    from torch import nn

    from kdlab.worker.kd.probe import probe_outputs

    class Counting(nn.Sequential):
        walks = 0

        def named_modules(self, *args: Any, **kwargs: Any) -> Any:
            Counting.walks += 1
            return super().named_modules(*args, **kwargs)

    def walks(layers: int) -> int:
        Counting.walks = 0
        model = Counting(*(nn.Linear(4, 4) for _ in range(layers)))
        names = [str(i) for i in range(layers)]
        outputs = probe_outputs(model, names, torch.zeros(2, 4))
        assert sorted(outputs, key=int) == names
        return Counting.walks

    assert walks(50) == walks(5) <= 5


# --------------------------------------------------------------------------- names

BAD_NAMES = ["a\x00b", "line\nbreak", "   ", "", "<script>alert(1)</script>", "x" * 101, "é"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_experiment_names_follow_the_run_name_rule(client, name):
    for body in (
        config(DIGITS_TEACHER, experiment=name),
        {"kind": "external", "name": "ext-run", "experiment": name, "params": {}},
    ):
        refused(post(client, "/api/runs", body), ["body", "experiment"])
        refused(
            post(client, "/api/runs", {**body, "experiment": "ok", "name": name}), ["body", "name"]
        )
    assert run_count(client) == 0


def test_a_good_experiment_name_is_accepted(client):
    response = post(client, "/api/runs", config(DIGITS_TEACHER, experiment="Exp_1.v-2"))
    assert response.status_code == 201, response.text
    assert response.json()["experiment"] == "Exp_1.v-2"


def test_clone_names_follow_the_run_name_rule(client):
    source = post(client, "/api/runs", DIGITS_TEACHER).json()["id"]
    response = client.post(f"/api/runs/{source}/clone", json={"name": "<b>"})
    refused(response, ["body", "name"])
    assert run_count(client) == 1


# --------------------------------------------------------------------------- Authorization

MALFORMED = [
    b"Bearer s\xe9cret",
    b"Bearer \xff\xfe\xfd",
    b"Bearer",
    b"Bearer    ",
    b"Basic c2VjcmV0",
    b"Bearer sec ret",
    b"bearer\tsecret",
]


@pytest.fixture
def secure_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"token": "secret"}))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c
    app.state.engine.dispose()


@pytest.mark.parametrize("header", MALFORMED, ids=repr)
def test_a_malformed_authorization_header_is_a_401(client, secure_client, header):
    for test_client in (client, secure_client):  # open loopback access and a token set
        response = test_client.get("/api/runs", headers={"Authorization": header})
        assert response.status_code == 401, (header, response.text)
        assert "Bearer <token>" in response.json()["detail"]
    assert (
        secure_client.get("/api/runs", headers={"Authorization": b"Bearer secret"}).status_code
        == 200
    )


def test_a_non_ascii_admin_token_compares_without_crashing(settings):
    app = create_app(settings.model_copy(update={"token": "s\xe9cret-token-value"}))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        response = c.get("/api/runs", headers={"Authorization": b"Bearer secret-token-value"})
    app.state.engine.dispose()
    assert response.status_code == 401, response.text
