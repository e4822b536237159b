"""JSON nested past what Python's parser recurses through (issue 9): a 422 naming the path, never
a 400 "error parsing the body" or a 500 RecursionError, and nothing stored."""

from __future__ import annotations

import pytest

from kdlab.backend.json_depth import MAX_JSON_DEPTH, too_deep

JSON = {"Content-Type": "application/json"}


def lists(levels: int) -> str:
    return "[" * levels + "]" * levels


def run_count(client) -> int:
    response = client.get("/api/runs")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def test_the_bound_sits_above_the_params_bound_and_far_below_the_parsers():
    from kdlab.worker.config import MAX_PARAMS_DEPTH

    assert MAX_PARAMS_DEPTH < MAX_JSON_DEPTH <= 100


@pytest.mark.parametrize(
    ("text", "limit", "path"),
    [
        ('{"a": 1}', 1, None),
        ('{"a": [[1]]}', 3, None),
        ('{"a": [[[1]]]}', 3, ["a", 0, 0]),
        ('{"a": [1, 2, {"b\\u00e9": [[[1]]]}], "c": 1}', 3, ["a", 2, "bé"]),
        ('{"a": [1, "[[[[{{{{", {"b": {"x": 1, "y": [[1]]}}]}', 4, ["a", 2, "b", "y"]),
        ('{"k\\"[[[": {"l": [[]]}}', 2, ['k"[[[', "l"]),
        ('"[[[[[[[["', 2, None),  # brackets inside a string are text
        ("]]]" + lists(10), 2, None),  # not JSON: the parser's own error
    ],
)
def test_too_deep_names_the_first_container_past_the_limit(text, limit, path):
    assert too_deep(text, limit) == path
    assert too_deep(text.encode(), limit) == path


def test_too_deep_is_iterative():
    assert too_deep(lists(200_000)) == [0] * MAX_JSON_DEPTH


@pytest.mark.parametrize("levels", [980, 5000, 100_000])
def test_a_deep_external_run_body_is_a_422_naming_the_path(client, levels):
    body = '{"kind": "external", "name": "deep", "params": {"a": ' + lists(levels) + "}}"
    response = client.post("/api/runs", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == "too_deep", error
    assert f"more than {MAX_JSON_DEPTH} levels" in error["msg"], error
    assert error["loc"] == ["body", "params", "a", *[0] * (MAX_JSON_DEPTH - 2)], error
    assert run_count(client) == 0


@pytest.mark.parametrize("route", ["/api/runs", "/api/runs/validate"])
def test_a_deep_run_config_is_a_422_also_without_a_content_type(client, route):
    body = '{"name": "deep", "kind": "train", "student": {"name": "mlp", "params": '
    body += '{"hidden": ' + lists(980) + "}}}"
    response = client.post(route, content=body)  # FastAPI parses a body without a type too
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][:5] == ["body", "student", "params", "hidden", 0], error
    assert run_count(client) == 0


def test_a_deep_clone_body_is_a_422(client):
    response = client.post("/api/runs/nope/clone", content='{"name": ' + lists(980) + "}")
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "too_deep"


def test_deep_layer_tree_params_are_a_422(client):
    params = '{"a": ' + lists(980) + "}"
    response = client.get("/api/catalog/models/mlp/layers", params={"params": params})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][:3] == ["query", "params", "a"], error
    assert "levels deep" in error["msg"], error


def test_ordinary_bodies_still_pass(client):
    body = {"kind": "external", "name": "flat", "params": {"grid": [[1, 2], [3, 4]]}}
    response = client.post("/api/runs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["config"]["params"] == body["params"]
