"""kdlab.worker.catalog, kdlab.worker.models, kdlab.worker.datasets: built-ins, splits and entry-point plug-ins."""

from __future__ import annotations

import importlib.util
import math
import pickle
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.worker import catalog
from kdlab.worker.catalog import DataBundle, DataInfo
from kdlab.worker.config import DatasetSpec, ModelSpec

# scikit-learn's documented digits facts: 1,797 samples, 64 features (8×8), 10 classes, pixels 0..16.
DIGITS_SAMPLES, DIGITS_FEATURES, DIGITS_CLASSES = 1797, 64, 10


def dataset(
    name: str,
    seed: int = 0,
    data_root: Path | None = None,
    val_fraction: float = 0.2,
    **params: Any,
) -> DataBundle:
    spec = DatasetSpec(name=name, params=params, val_fraction=val_fraction)
    return catalog.build_dataset(spec, seed, data_root)


def model(name: str, info: DataInfo, **params: Any) -> nn.Module:
    return catalog.build_model(ModelSpec(name=name, params=params), info)


def stacked(split: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))), strict=True)  # type: ignore[arg-type]
    return torch.stack(xs), torch.stack(ys)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return dataset("digits")


@pytest.fixture(scope="module")
def lm() -> DataBundle:
    return dataset("synthetic_lm", n_sequences=16, seq_len=12, vocab_size=32)


# --------------------------------------------------------------------------- registry


def test_builtins_are_listed_with_descriptions() -> None:
    models, datasets = catalog.list_models(), catalog.list_datasets()
    assert {"mlp", "cnn_small", "resnet18", "resnet34", "resnet50", "gpt2"} <= models.keys()
    assert {
        "digits",
        "synthetic_classification",
        "synthetic_lm",
        "text_file",
        "image_folder",
        "cifar10",
    } <= datasets.keys()
    assert all(desc and "\n" not in desc for desc in [*models.values(), *datasets.values()])


def test_unknown_names_suggest_close_matches(digits: DataBundle) -> None:
    with pytest.raises(ValueError, match="unknown model 'cnn_smal'; did you mean 'cnn_small'"):
        catalog.build_model(ModelSpec.model_construct(name="cnn_smal", params={}), digits.info)
    with pytest.raises(ValueError, match="unknown dataset 'digts'; did you mean 'digits'"):
        catalog.build_dataset(DatasetSpec.model_construct(name="digts", params={}), 0)


def test_bad_params_name_the_model_and_param(digits: DataBundle) -> None:
    spec = ModelSpec.model_construct(name="mlp", params={"hidden": [8], "dropuot": 0.1})
    with pytest.raises(ValueError, match="model 'mlp': params.dropuot: Extra inputs"):
        catalog.build_model(spec, digits.info)
    bad_dataset = DatasetSpec.model_construct(
        name="digits", params={"as_image": "?"}, val_fraction=0.2
    )
    with pytest.raises(ValueError, match="dataset 'digits': params.as_image"):
        catalog.build_dataset(bad_dataset, 0)


def test_params_model_exposes_the_form_schema() -> None:
    params = catalog.params_model("models", "mlp")
    assert params is not None
    schema = params.model_json_schema()
    assert schema["properties"]["hidden"]["default"] == [128]


def test_example_input_matches_info_and_draws_no_random_numbers(
    digits: DataBundle, lm: DataBundle
) -> None:
    state = torch.get_rng_state()
    x = catalog.example_input(digits.info, batch_size=3)
    tokens = catalog.example_input(lm.info)
    assert torch.equal(state, torch.get_rng_state())
    assert (x.shape, x.dtype) == ((3, DIGITS_FEATURES), torch.float32)
    assert (tokens.shape, tokens.dtype) == ((2, 12), torch.long)


# --------------------------------------------------------------------------- digits and splits


def test_digits_counts_shapes_and_scale(digits: DataBundle) -> None:
    assert len(digits.train) + len(digits.val) == DIGITS_SAMPLES
    assert digits.info == DataInfo(
        "classification", DIGITS_CLASSES, (DIGITS_FEATURES,), torch.float32
    )
    x, y = stacked(digits.val)
    assert x.shape[1:] == (DIGITS_FEATURES,) and y.dtype == torch.long
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5])
def test_split_sizes_follow_val_fraction(val_fraction: float) -> None:
    spec = DatasetSpec(name="digits", val_fraction=val_fraction)
    bundle = catalog.build_dataset(spec, seed=0)
    assert len(bundle.val) == math.ceil(DIGITS_SAMPLES * val_fraction)
    assert len(bundle.train) == DIGITS_SAMPLES - len(bundle.val)


def test_split_is_stratified_and_disjoint(digits: DataBundle) -> None:
    _, y_val = stacked(digits.val)
    counts = torch.bincount(y_val, minlength=DIGITS_CLASSES)
    # each class has 174..183 samples, so a stratified 20% holds 34..37 of each
    assert counts.min() >= 34 and counts.max() <= 37
    assert set(digits.train.indices).isdisjoint(digits.val.indices)  # type: ignore[attr-defined]


def test_split_is_deterministic_in_the_seed(digits: DataBundle) -> None:
    same, other = dataset("digits", seed=0), dataset("digits", seed=1)
    assert torch.equal(stacked(same.val)[0], stacked(digits.val)[0])
    assert not torch.equal(stacked(other.val)[0], stacked(digits.val)[0])


def test_digits_n_train_keeps_a_stratified_labelled_subset_and_the_same_val_split(
    digits: DataBundle,
) -> None:
    # by hand: 1,797 examples, val_fraction 0.2 → ceil(359.4) = 360 val, 1,797 − 360 = 1,437 train
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    small = dataset("digits", n_train=100)
    assert (len(small.train), len(small.val)) == (100, 360)
    assert small.val.indices == digits.val.indices  # type: ignore[attr-defined]
    assert set(small.train.indices) <= set(digits.train.indices)  # type: ignore[attr-defined]
    _, y = stacked(small.train)
    # each class is 9.7-10.2% of the training split, so a stratified 100 holds 9..11 of each
    counts = torch.bincount(y, minlength=DIGITS_CLASSES)
    assert counts.sum() == 100 and counts.min() >= 9 and counts.max() <= 11
    again, other = dataset("digits", n_train=100), dataset("digits", seed=1, n_train=100)
    assert again.train.indices == small.train.indices  # type: ignore[attr-defined]
    assert other.train.indices != small.train.indices  # type: ignore[attr-defined]
    assert len(dataset("digits", n_train=1437).train) == 1437  # the whole split is allowed
    with pytest.raises(ValueError, match=r"n_train=1438 is more than the 1437 examples"):
        dataset("digits", n_train=1438)
    with pytest.raises(ValueError, match=r"params.n_train\n.*greater than or equal to 10"):
        dataset("digits", n_train=5)  # fewer than one per class


def test_digits_as_image() -> None:
    bundle = dataset("digits", as_image=True)
    assert bundle.info.input_shape == (1, 8, 8)
    assert bundle.train[0][0].shape == (1, 8, 8)


# --------------------------------------------------------------------------- synthetic sets


def test_synthetic_classification_is_learnable() -> None:
    bundle = dataset("synthetic_classification", n_samples=600, n_features=16, n_classes=6)
    assert bundle.info == DataInfo("classification", 6, (16,), torch.float32)
    assert len(bundle.train) + len(bundle.val) == 600
    x, y = stacked(bundle.train)
    means = torch.stack([x[y == c].mean(0) for c in range(6)])
    assert torch.pdist(means).min() > 1.0  # class centroids differ
    x_val, y_val = stacked(bundle.val)
    nearest_mean = torch.cdist(x_val, means).argmin(1)
    assert (nearest_mean == y_val).float().mean() > 0.5  # chance is 1/6


def test_synthetic_data_does_not_depend_on_the_run_seed() -> None:
    a, b = (dataset("synthetic_classification", seed=s, n_samples=200) for s in (0, 1))
    total = [
        sum(stacked(split)[0].sum() for split in (bundle.train, bundle.val)) for bundle in (a, b)
    ]
    assert torch.allclose(total[0], total[1])
    assert not torch.equal(stacked(a.val)[0], stacked(b.val)[0])


def test_synthetic_lm_targets_are_next_tokens(lm: DataBundle) -> None:
    assert lm.info == DataInfo("lm", 32, (12,), torch.long)
    x, y = stacked(lm.train)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert (y[:, -1] == -100).all()
    assert x.min() >= 0 and x.max() < 32


def test_synthetic_lm_is_learnable() -> None:
    vocab = 64
    bundle = dataset("synthetic_lm", n_sequences=256, seq_len=32, vocab_size=vocab)
    (x, _), (x_val, _) = stacked(bundle.train), stacked(bundle.val)
    counts = torch.zeros(vocab, vocab)
    counts.index_put_(
        (x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)), torch.ones(x[:, 1:].numel()), accumulate=True
    )
    bigram_accuracy = (counts.argmax(1)[x_val[:, :-1]] == x_val[:, 1:]).float().mean()
    assert bigram_accuracy > 5 / vocab


# --------------------------------------------------------------------------- text_file


def test_text_file_is_a_bytes_lm(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    text = bytes(range(256)) * 5  # 1,280 bytes
    (tmp_path / "corpus" / "a.txt").write_bytes(text)
    bundle = dataset("text_file", data_root=tmp_path, path="corpus/a.txt", seq_len=64)
    assert bundle.info == DataInfo("lm", 256, (64,), torch.long)
    assert len(bundle.train) + len(bundle.val) == 1280 // 64
    x, y = stacked(bundle.train)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 256)  # the next byte of the stream


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd"])
def test_text_file_refuses_paths_outside_the_data_root(tmp_path: Path, path: str) -> None:
    spec = DatasetSpec.model_construct(name="text_file", params={"path": path}, val_fraction=0.2)
    with pytest.raises(ValueError, match="relative to the data root"):
        catalog.build_dataset(spec, 0, tmp_path)


def test_text_file_refuses_a_symlink_out_of_the_data_root(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_bytes(b"x" * 1000)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ValueError, match="resolves outside the data root"):
        dataset("text_file", data_root=root, path="link.txt", seq_len=8)


def test_text_file_missing_file_or_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no file"):
        dataset("text_file", data_root=tmp_path, path="nope.txt")
    with pytest.raises(ValueError, match="none was given"):
        dataset("text_file", path="nope.txt")


# --------------------------------------------------------------------------- image_folder


def _write_npy_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            shape = (10, 12) if i % 2 else (10, 12, 3)
            np.save(root / label / f"{i}.npy", rng.integers(0, 256, size=shape, dtype=np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_reads_npy_images(tmp_path: Path, channels: int) -> None:
    _write_npy_images(tmp_path / "pets")
    bundle = dataset(
        "image_folder", data_root=tmp_path, path="pets", image_size=8, channels=channels
    )
    assert bundle.info == DataInfo("classification", 2, (channels, 8, 8), torch.float32)
    assert len(bundle.train) + len(bundle.val) == 10
    x, y = stacked(bundle.val)
    assert x.shape[1:] == (channels, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) == {0, 1}  # stratified: both classes in val


def test_image_folder_reads_png(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            image_module.new("RGB", (9, 9), (i * 40, 0, 0)).save(
                tmp_path / "imgs" / label / f"{i}.png"
            )
    bundle = dataset(
        "image_folder", data_root=tmp_path, path="imgs", image_size=4, val_fraction=0.34
    )
    assert bundle.train[0][0].shape == (3, 4, 4)


def test_image_folder_missing_says_where_to_put_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="<class name>/<image file>"):
        dataset("image_folder", data_root=tmp_path, path="nothing")


# --------------------------------------------------------------------------- cifar10


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake",
        b"labels": [i % 10 for i in range(n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=3))  # bytes as BINBYTES, like py2 str


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in (1, 2):
        _write_cifar_batch(folder / f"data_batch_{i}", 30, seed=i)
    _write_cifar_batch(folder / "test_batch", 20, seed=9)
    return tmp_path


def test_cifar10_reads_the_python_batches(cifar_root: Path) -> None:
    bundle = dataset("cifar10", data_root=cifar_root, val_fraction=0.2)
    assert bundle.info == DataInfo("classification", 10, (3, 32, 32), torch.float32)
    assert (len(bundle.train), len(bundle.val)) == (48, 12)
    x, y = stacked(bundle.val)
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))  # stratified: 6 of each label, 12 in val


def test_cifar10_can_validate_on_the_test_batch(cifar_root: Path) -> None:
    bundle = dataset("cifar10", data_root=cifar_root, use_test_batch=True)
    assert (len(bundle.train), len(bundle.val)) == (60, 20)


def test_cifar10_missing_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        dataset("cifar10", data_root=tmp_path)


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


def test_cifar10_refuses_pickles_that_are_not_plain_arrays(cifar_root: Path) -> None:
    folder = cifar_root / "cifar-10-batches-py"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        dataset("cifar10", data_root=cifar_root)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "params", "image", "layers"),
    [
        ("mlp", {}, False, ["features.0", "fc"]),
        ("mlp", {"hidden": [16, 8], "dropout": 0.1, "activation": "gelu"}, False, ["features.1"]),
        ("mlp", {}, True, ["features.0", "fc"]),
        ("cnn_small", {}, True, ["features.0", "features.1", "fc"]),
        ("cnn_small", {"channels": [4, 8, 8]}, True, ["features.2", "features.0.0", "pool"]),
    ],
)
def test_classifier_logits_shape_and_named_layers(
    name: str, params: dict[str, Any], image: bool, layers: list[str]
) -> None:
    bundle = dataset("digits", as_image=image)
    net = model(name, bundle.info, **params)
    x, _ = stacked(torch.utils.data.Subset(bundle.val, range(5)))
    logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, DIGITS_CLASSES)
    assert set(layers) <= dict(net.named_modules()).keys()


def test_mlp_on_synthetic_classification() -> None:
    bundle = dataset("synthetic_classification", n_samples=100, n_features=7, n_classes=4)
    assert model("mlp", bundle.info)(catalog.example_input(bundle.info, 3)).shape == (3, 4)


def test_cnn_small_needs_images(digits: DataBundle) -> None:
    with pytest.raises(ValueError, match="as_image: true"):
        model("cnn_small", digits.info)


def test_classifiers_refuse_lm_data(lm: DataBundle) -> None:
    with pytest.raises(ValueError, match="model 'mlp' needs a classification dataset"):
        model("mlp", lm.info)


def test_gpt2_returns_logits_over_the_vocabulary(lm: DataBundle) -> None:
    net = model("gpt2", lm.info, n_layer=1, n_head=2, n_embd=16)
    x, _ = stacked(lm.val)
    logits = net(x)
    assert type(logits) is torch.Tensor
    assert logits.shape == (len(x), 12, 32)
    assert {"transformer.h.0", "lm_head"} <= dict(net.named_modules()).keys()


def test_gpt2_params_and_task_are_checked(lm: DataBundle, digits: DataBundle) -> None:
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        model("gpt2", lm.info, n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="model 'gpt2' needs a lm dataset"):
        model("gpt2", digits.info)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_logits_shape(arch: str) -> None:
    pytest.importorskip("torchvision")
    info = DataInfo("classification", 10, (3, 32, 32), torch.float32)
    net = model(arch, info, small_input=True)
    assert net(catalog.example_input(info)).shape == (2, 10)
    assert isinstance(net.maxpool, nn.Identity)


def test_resnet_without_torchvision_says_how_to_install() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    info = DataInfo("classification", 10, (3, 32, 32), torch.float32)
    with pytest.raises(ImportError, match=r"pip install kdlab\[vision\]"):
        model("resnet18", info)


# --------------------------------------------------------------------------- entry-point plug-ins

PLUGIN_MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from kdlab.worker.catalog import DataBundle, DataInfo

def tiny_linear(params, info):
    return nn.Linear(info.input_shape[0], params.get("out", info.num_classes))

def tiny_data(params, seed, val_fraction, data_root):
    x, y = torch.ones(6, 3), torch.zeros(6, dtype=torch.long)
    info = DataInfo("classification", 2, (3,), torch.float32)
    return DataBundle(TensorDataset(x[:4], y[:4]), TensorDataset(x[4:], y[4:]), info)
"""


def _install_fake_distribution(
    site: Path, dist: str, entry_points: str, module: str | None = None
) -> None:
    """A real installed distribution: a `*.dist-info` folder, found through sys.path."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (site / f"{dist}.py").write_text(module)


def test_entry_point_plugins_are_listed_validated_and_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_points = """
        [kdlab.models]
        tiny_linear = kdlab_fake_plugin:tiny_linear
        [kdlab.datasets]
        tiny_data = kdlab_fake_plugin:tiny_data
    """
    _install_fake_distribution(tmp_path, "kdlab_fake_plugin", entry_points, PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "kdlab_fake_plugin:tiny_linear" in catalog.list_models()["tiny_linear"]
    assert "tiny_data" in catalog.list_datasets()
    bundle = catalog.build_dataset(DatasetSpec(name="tiny_data"), seed=0)
    net = catalog.build_model(ModelSpec(name="tiny_linear", params={"out": 5}), bundle.info)
    assert net(catalog.example_input(bundle.info)).shape == (2, 5)
    assert catalog.params_model("models", "tiny_linear") is None


def test_plugin_may_not_shadow_a_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_distribution(tmp_path, "kdlab_shadow", "[kdlab.models]\nmlp = kdlab_shadow:mlp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="plug-in model 'mlp' .* shadows the built-in"):
        catalog.list_models()


# --------------------------------------------------------------------------- declared infos


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("digits", {}),
        ("digits", {"as_image": True, "n_train": 50}),
        ("synthetic_classification", {"n_samples": 40, "n_features": 5, "n_classes": 4}),
        ("synthetic_lm", {"n_sequences": 8, "seq_len": 6, "vocab_size": 11}),
        ("text_file", {"path": "corpus/a.txt", "seq_len": 16}),
    ],
)
def test_declared_infos_are_what_the_builders_give(
    tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    """The dry run's DataInfo (no data loaded) is the trainer's (the built bundle's)."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(bytes(range(256)))
    spec = DatasetSpec(name=name, params=params)
    declared = catalog._registry("datasets")[name].info
    assert declared is not None
    built = catalog.build_dataset(spec, seed=0, data_root=tmp_path).info
    assert declared(dict(params), tmp_path) == built
    assert catalog.dataset_info(spec, 0, tmp_path) == built


def test_cifar10_info_needs_no_files() -> None:
    spec = DatasetSpec(name="cifar10", params={})
    info = catalog.dataset_info(spec, 0, None)
    assert info == DataInfo("classification", 10, (3, 32, 32), torch.float32)


def test_a_plugin_dataset_may_declare_its_info_or_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = PLUGIN_MODULE + textwrap.dedent(
        """
        def declared_data(params, seed, val_fraction, data_root):
            raise AssertionError("the dry run must not build a dataset that declares its info")

        declared_data.info = lambda params, data_root: DataInfo(
            "classification", params.get("classes", 3), (7,), torch.float32
        )
        """
    )
    entry_points = """
        [kdlab.datasets]
        tiny_data = kdlab_info_plugin:tiny_data
        declared_data = kdlab_info_plugin:declared_data
    """
    _install_fake_distribution(tmp_path, "kdlab_info_plugin", entry_points, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = catalog.dataset_info(DatasetSpec(name="declared_data", params={"classes": 4}), 0)
    assert declared == DataInfo("classification", 4, (7,), torch.float32)
    built = catalog.dataset_info(DatasetSpec(name="tiny_data"), 0)  # no `info`: built
    assert built == DataInfo("classification", 2, (3,), torch.float32)
