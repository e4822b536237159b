"""/api/catalog: what a config may name, and layer trees from a meta-device probe."""

from __future__ import annotations

import json

import jsonschema
import torch

from kdlab.worker import catalog
from kdlab.worker.config import ModelSpec, RunConfig
from kdlab.worker.kd.losses import LOSSES, LogitsKL
from kdlab.worker.models import MLPParams


def test_catalog_lists_everything_a_config_may_name(client):
    response = client.get("/api/catalog")
    assert response.status_code == 200
    body = response.json()
    assert body["schema_version"] == 1
    assert set(body["models"]) == set(catalog.list_models())
    assert set(body["datasets"]) == set(catalog.list_datasets())
    assert body["models"]["mlp"]["params_schema"] == MLPParams.model_json_schema()
    assert body["datasets"]["digits"]["description"] == catalog.list_datasets()["digits"]
    assert set(body["losses"]) == set(LOSSES)
    logits_kl = body["losses"]["logits_kl"]
    assert logits_kl["description"] == LogitsKL.__doc__.strip().splitlines()[0]
    assert {"name": "temperature", "default": 1.0, "required": False} in logits_kl["params"]
    assert body["balancers"] == ["static", "dynamic"]
    assert body["run_config_schema"] == RunConfig.model_json_schema()
    # the schema the form gets accepts a real config
    jsonschema.validate(
        {"name": "x", "kind": "train", "dataset": {"name": "digits"}, "student": {"name": "mlp"}},
        body["run_config_schema"],
    )


def test_layer_tree_of_an_mlp(client):
    params = json.dumps({"hidden": [32, 16]})
    response = client.get("/api/catalog/models/mlp/layers", params={"params": params})
    assert response.status_code == 200, response.text
    layers = {layer["name"]: layer for layer in response.json()}
    assert layers[""]["type"] == "MLP"
    assert layers[""]["output_shape"] == [2, 10]  # digits: 10 classes, batch 2
    assert layers[""]["params"] == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert layers["features.0"]["output_shape"] == [2, 32]
    assert layers["features.1"]["output_shape"] == [2, 16]
    assert layers["features.0.0"] == {
        "name": "features.0.0",
        "type": "Linear",
        "output_shape": [2, 32],
        "params": 64 * 32 + 32,
    }
    assert layers["fc"]["output_shape"] == [2, 10]


def test_layer_tree_of_an_image_model_and_an_lm(client):
    cnn = client.get(
        "/api/catalog/models/cnn_small/layers",
        params={"dataset_params": json.dumps({"as_image": True})},
    )
    assert cnn.status_code == 200, cnn.text
    shapes = {layer["name"]: layer["output_shape"] for layer in cnn.json()}
    assert shapes["features.0"] == [2, 16, 8, 8]
    assert shapes["features.1"] == [2, 32, 4, 4]  # stride 2 after the first block
    # gpt2 reads mask values in its forward (impossible on meta): probed with fake tensors
    lm = client.get(
        "/api/catalog/models/gpt2/layers",
        params={
            "dataset": "synthetic_lm",
            "dataset_params": json.dumps({"seq_len": 8, "vocab_size": 32}),
            "params": json.dumps({"n_layer": 1, "n_embd": 16, "n_head": 2}),
        },
    )
    assert lm.status_code == 200, lm.text
    shapes = {layer["name"]: layer["output_shape"] for layer in lm.json()}
    assert shapes[""] == [2, 8, 32]
    assert shapes["lm_head"] == [2, 8, 32]


def test_layer_tree_errors(client):
    unknown = client.get("/api/catalog/models/mpl/layers")
    assert unknown.status_code == 404
    assert "'mlp'" in unknown.json()["detail"]  # close match suggested
    for params, loc in (
        ({"params": "{not json"}, ["query", "params"]),
        ({"params": "[1]"}, ["query", "params"]),
        ({"params": json.dumps({"hidden": [0]})}, ["query", "params", "hidden", 0]),
        ({"params": json.dumps({"depth": 3})}, ["query", "params", "depth"]),
        ({"dataset": "digitz"}, ["query", "dataset"]),
    ):
        response = client.get("/api/catalog/models/mlp/layers", params=params)
        assert response.status_code == 422, params
        assert response.json()["detail"][0]["loc"] == loc
    flat = client.get("/api/catalog/models/cnn_small/layers")
    assert flat.status_code == 422
    assert "as_image" in flat.json()["detail"][0]["msg"]


def test_probe_falls_back_to_fake_tensors_then_the_cpu(monkeypatch):
    from kdlab.worker import dry_run as service

    info = catalog.DataInfo("classification", 10, (64,), torch.float32)
    spec = ModelSpec(name="mlp", params={"hidden": [8]})
    real_probe = service.probe_outputs

    def no_meta_kernels(model, names, x):
        if next(model.parameters()).is_meta:
            raise RuntimeError("no meta kernel")
        return real_probe(model, names, x)

    monkeypatch.setattr(service, "probe_outputs", no_meta_kernels)
    fake = service.probe_model(spec, info)
    assert (fake.mode, fake.shape("features.0"), fake.shape("")) == ("fake", [2, 8], [2, 10])

    def no_fake(*_args):
        raise RuntimeError("data-dependent")

    monkeypatch.setattr(service, "fake_outputs", no_fake)
    cpu = service.probe_model(spec, info)
    assert (cpu.mode, cpu.shape("features.0")) == ("cpu", [2, 8])
    monkeypatch.setattr(service, "CPU_PROBE_MAX_PARAMS", 10)  # too big to initialise
    empty = service.probe_model(spec, info)
    assert (empty.mode, empty.shape("")) == ("cpu", [2, 10])
