"""Built-in catalog datasets. Each builder is
`(params: dict, seed: int, val_fraction: float, data_root: Path | None) -> DataBundle`
(the plug-in signature too). Items are `(x, y)` tensors.

The run seed only chooses the train/val split (stratified for classification); the synthetic
generators have their own `seed` param so every run of an experiment sees the same data.
File-backed datasets read only below `data_root` and never download anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch.utils.data import Dataset, Subset, TensorDataset
from typing_extensions import Self

from kdlab.worker.catalog import CatalogEntry, DataBundle, DataInfo
from kdlab.worker.config import SEED_LIMIT
from kdlab.worker.kd.losses import IGNORE_INDEX
from kdlab.worker.params import Params

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".npy"})
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# bounds of the generated / decoded data (a 422 at submit rather than an out-of-memory later)
MAX_EXAMPLES = 10_000_000
MAX_ELEMENTS = 2**28  # numbers a synthetic generator makes in one array (1 GiB of float32)
MAX_FEATURES = 65_536  # input dimension, classes
MAX_SEQ_LEN = 65_536
MAX_VOCAB = 16_384  # synthetic_lm draws a vocab × vocab transition matrix
MAX_IMAGE_SIZE = 4096

# --------------------------------------------------------------------------- shared helpers


def split_indices(
    n: int, val_fraction: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists, each sorted; stratified when labels are given."""
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(
            np.arange(n), test_size=val_fraction, random_state=seed, stratify=stratify
        )
    except ValueError as err:
        raise ValueError(
            f"cannot split {n} examples with val_fraction={val_fraction}: {err}"
        ) from None
    return sorted(train.tolist()), sorted(val.tolist())


def _bundle(
    full: Dataset, n: int, info: DataInfo, seed: int, val_fraction: float, labels: Any = None
) -> DataBundle:
    stratify = np.asarray(labels) if info.task == "classification" else None
    train, val = split_indices(n, val_fraction, seed, stratify)
    return DataBundle(Subset(full, train), Subset(full, val), info)


def _tensor_bundle(
    x: torch.Tensor, y: torch.Tensor, info: DataInfo, seed: int, val_fraction: float
) -> DataBundle:
    return _bundle(TensorDataset(x, y), len(y), info, seed, val_fraction, y.numpy())


def _classification_info(num_classes: int, x: torch.Tensor) -> DataInfo:
    return DataInfo("classification", num_classes, tuple(x.shape[1:]), x.dtype)


def _lm_info(vocab_size: int, seq_len: int) -> DataInfo:
    return DataInfo("lm", vocab_size, (seq_len,), torch.long)


def resolve_data_path(data_root: Path | str | None, relative: str, owner: str) -> Path:
    """`data_root / relative`, resolved; ValueError when it lands outside the data root."""
    if data_root is None:
        raise ValueError(f"{owner} reads files under a data root, and none was given")
    root = Path(data_root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{owner}: path {relative!r} resolves outside the data root {root}")
    return path


class _DataPathParams(Params):
    path: str = Field(min_length=1, description="Path relative to the data root.")

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, path: str) -> str:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"{path!r} must be relative to the data root, without '..'")
        return path


# --------------------------------------------------------------------------- digits


class DigitsParams(Params):
    as_image: bool = Field(default=False, description="Items [1, 8, 8] instead of [64].")
    n_train: int | None = Field(
        default=None,
        ge=10,
        description=(
            "Train on only this many labelled examples: a class-stratified subset of the "
            "training split, chosen by the run seed (the same seed, the same subset). The "
            "validation split is unchanged, so accuracies stay comparable with full-data runs; "
            "null = the whole training split."
        ),
    )


def digits(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """Handwritten digits, 8×8 (scikit-learn, offline): 1,797 images, 10 classes, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    p = DigitsParams.parse(params, "dataset 'digits'")
    data = load_digits()
    x = torch.from_numpy(data.data.astype(np.float32) / 16.0)
    if p.as_image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.from_numpy(data.target).long()
    bundle = _tensor_bundle(x, y, _classification_info(10, x), seed, val_fraction)
    if p.n_train is None:
        return bundle
    assert isinstance(bundle.train, Subset)
    train = labelled_subset(
        list(bundle.train.indices), data.target, p.n_train, seed, "dataset 'digits'"
    )
    return DataBundle(Subset(bundle.train.dataset, train), bundle.val, bundle.info)


def labelled_subset(
    train: list[int], labels: np.ndarray, n: int, seed: int, owner: str
) -> list[int]:
    """`n` of the `train` indices, sorted, stratified by `labels`, deterministic in `seed`."""
    if n > len(train):
        raise ValueError(
            f"{owner}: params.n_train={n} is more than the {len(train)} examples of "
            "the training split; lower it, or leave it null to use them all"
        )
    if n == len(train):
        return sorted(train)
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(
        np.asarray(train), train_size=n, random_state=seed, stratify=labels[train]
    )
    return sorted(kept.tolist())


# --------------------------------------------------------------------------- synthetic sets


class SyntheticClassificationParams(Params):
    n_samples: int = Field(default=2048, ge=2, le=MAX_EXAMPLES, description="Examples in total.")
    n_features: int = Field(default=32, ge=1, le=MAX_FEATURES, description="Input dimension.")
    n_classes: int = Field(default=10, ge=2, le=MAX_FEATURES, description="Classes (balanced).")
    clusters_per_class: int = Field(
        default=2, ge=1, le=MAX_FEATURES, description="Gaussian blobs per class."
    )
    noise: float = Field(default=1.0, gt=0, description="Std of the noise around each blob.")
    seed: int = Field(
        default=0, ge=0, lt=SEED_LIMIT, description="Seed of the generator (not of the split)."
    )

    @model_validator(mode="after")
    def _two_per_class(self) -> Self:
        if self.n_samples < 2 * self.n_classes:
            raise ValueError("n_samples must be at least 2 × n_classes (one train, one val each)")
        sizes = {
            "n_samples × n_features": self.n_samples * self.n_features,
            "n_classes × clusters_per_class × n_features": self.n_classes
            * self.clusters_per_class
            * self.n_features,
        }
        for what, size in sizes.items():
            if size > MAX_ELEMENTS:
                raise ValueError(f"{what} = {size} is more than the {MAX_ELEMENTS} numbers allowed")
        return self


def synthetic_classification(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """Gaussian blobs around random class centroids: a learnable classification task."""
    p = SyntheticClassificationParams.parse(params, "dataset 'synthetic_classification'")
    rng = np.random.default_rng(p.seed)
    centers = rng.normal(size=(p.n_classes, p.clusters_per_class, p.n_features))
    y = rng.permutation(np.arange(p.n_samples) % p.n_classes)
    cluster = rng.integers(p.clusters_per_class, size=p.n_samples)
    x = centers[y, cluster] + p.noise * rng.normal(size=(p.n_samples, p.n_features))
    x_t = torch.from_numpy(x.astype(np.float32))
    y_t = torch.from_numpy(y).long()
    return _tensor_bundle(x_t, y_t, _classification_info(p.n_classes, x_t), seed, val_fraction)


class SyntheticLMParams(Params):
    n_sequences: int = Field(default=512, ge=2, le=MAX_EXAMPLES, description="Sequences in total.")
    seq_len: int = Field(default=64, ge=2, le=MAX_SEQ_LEN, description="Tokens per sequence.")
    vocab_size: int = Field(default=256, ge=2, le=MAX_VOCAB, description="Vocabulary size.")
    concentration: float = Field(
        default=0.1,
        gt=0,
        description="Dirichlet concentration of the transitions (small = peaked).",
    )
    seed: int = Field(
        default=0, ge=0, lt=SEED_LIMIT, description="Seed of the generator (not of the split)."
    )

    @model_validator(mode="after")
    def _bounded_size(self) -> Self:
        size = self.n_sequences * self.seq_len
        if size > MAX_ELEMENTS:
            raise ValueError(
                f"n_sequences × seq_len = {size} is more than the {MAX_ELEMENTS} tokens allowed"
            )
        return self


def _markov_tokens(p: SyntheticLMParams) -> np.ndarray:
    rng = np.random.default_rng(p.seed)
    cumulative = rng.dirichlet(np.full(p.vocab_size, p.concentration), size=p.vocab_size).cumsum(1)
    tokens = np.empty((p.n_sequences, p.seq_len), dtype=np.int64)
    tokens[:, 0] = rng.integers(p.vocab_size, size=p.n_sequences)
    for t in range(1, p.seq_len):
        u = rng.random(p.n_sequences)[:, None]
        tokens[:, t] = (cumulative[tokens[:, t - 1]] < u).sum(1)
    return np.minimum(tokens, p.vocab_size - 1)


def synthetic_lm(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """Token sequences from a random first-order Markov chain: a learnable language model task."""
    p = SyntheticLMParams.parse(params, "dataset 'synthetic_lm'")
    x = torch.from_numpy(_markov_tokens(p))
    y = torch.cat([x[:, 1:], torch.full((len(x), 1), IGNORE_INDEX)], dim=1)
    return _tensor_bundle(x, y, _lm_info(p.vocab_size, p.seq_len), seed, val_fraction)


# --------------------------------------------------------------------------- text_file


class TextFileParams(_DataPathParams):
    seq_len: int = Field(default=128, ge=1, le=MAX_SEQ_LEN, description="Bytes per sequence.")


def text_file(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """Bytes-level language model (vocabulary 256) over a text file under the data root."""
    p = TextFileParams.parse(params, "dataset 'text_file'")
    path = resolve_data_path(data_root, p.path, "dataset 'text_file'")
    if not path.is_file():
        raise FileNotFoundError(f"dataset 'text_file': no file {path}; put the text file there")
    stream = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    n = len(stream) // p.seq_len
    if n < 2:
        raise ValueError(
            f"dataset 'text_file': {path} has {len(stream)} bytes; need at least "
            f"2 × seq_len = {2 * p.seq_len}"
        )
    targets = torch.cat([stream[1:], torch.tensor([IGNORE_INDEX])])
    x, y = (t[: n * p.seq_len].view(n, p.seq_len) for t in (stream, targets))
    return _tensor_bundle(x, y, _lm_info(256, p.seq_len), seed, val_fraction)


# --------------------------------------------------------------------------- image_folder


class ImageFolderParams(_DataPathParams):
    image_size: int = Field(
        default=32, ge=1, le=MAX_IMAGE_SIZE, description="Images are resized to size × size."
    )
    channels: Literal[1, 3] = Field(default=3, description="1 = grayscale, 3 = RGB.")


def _read_image(path: Path) -> np.ndarray:
    """An image as an [H, W, C] array: `.npy` directly, other formats through Pillow."""
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        try:
            from PIL import Image
        except ImportError as err:
            raise ImportError(
                f"reading {path.suffix} images needs Pillow: pip install kdlab[vision]"
            ) from err
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    return array[:, :, None] if array.ndim == 2 else array


def _image_tensor(array: np.ndarray, channels: int, size: int) -> torch.Tensor:
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / scale
    if image.shape[0] != channels:
        image = image[:3].mean(0, keepdim=True) if channels == 1 else image[:1].expand(3, -1, -1)
    if image.shape[1:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return image.contiguous()


class ImageFiles(Dataset):
    """Images decoded on access: item = ([channels, size, size] float in [0, 1], label)."""

    reads_from_disk = True  # kdlab.worker.batches loads it in worker processes

    def __init__(self, files: list[Path], labels: list[int], channels: int, size: int) -> None:
        self.files, self.labels, self.channels, self.size = files, labels, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = _image_tensor(_read_image(self.files[index]), self.channels, self.size)
        return image, torch.tensor(self.labels[index])


def image_folder(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """Images in <data_root>/<path>/<class>/<image> (png/jpg via Pillow, or .npy [H, W(, C)])."""
    p = ImageFolderParams.parse(params, "dataset 'image_folder'")
    root = resolve_data_path(data_root, p.path, "dataset 'image_folder'")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(classes) < 2 or not files:
        raise FileNotFoundError(
            f"dataset 'image_folder': put images in {root}/<class name>/<image file>, "
            f"one folder per class (at least 2 classes); found {len(classes)} classes"
        )
    paths, labels = [f for f, _ in files], [label for _, label in files]
    full = ImageFiles(paths, labels, p.channels, p.image_size)
    info = DataInfo(
        "classification", len(classes), (p.channels, p.image_size, p.image_size), torch.float32
    )
    return _bundle(full, len(full), info, seed, val_fraction, labels)


# --------------------------------------------------------------------------- cifar10


class Cifar10Params(_DataPathParams):
    path: str = Field(
        default="cifar-10-batches-py",
        min_length=1,
        description="Folder (under the data root) holding the python batches data_batch_1…5.",
    )
    use_test_batch: bool = Field(
        default=False, description="Validate on the official test_batch (val_fraction unused)."
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other class is refused (no code runs)."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) from one CIFAR-10 python batch file.

    The batches are pickles; they are read with `_NumpyOnlyUnpickler`, which can build numpy
    arrays and nothing else, so a tampered file cannot run code.
    """
    with path.open("rb") as f:
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


class UInt8Images(Dataset):
    """uint8 images kept compact in memory; item = (float image in [0, 1], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float() / 255.0, self.labels[index]


def _cifar_split(root: Path, pattern: str) -> UInt8Images:
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"dataset 'cifar10': no {pattern} in {root}; download {CIFAR10_URL} and extract it "
            f"so that {root}/data_batch_1 exists"
        )
    images, labels = zip(*(_read_cifar_batch(f) for f in files), strict=True)
    return UInt8Images(np.concatenate(images), np.concatenate(labels))


def cifar10(
    params: dict[str, Any], seed: int, val_fraction: float, data_root: Path | None = None
) -> DataBundle:
    """CIFAR-10 from the python batches under the data root (never downloaded): 10 classes."""
    p = Cifar10Params.parse(params, "dataset 'cifar10'")
    root = resolve_data_path(data_root, p.path, "dataset 'cifar10'")
    train = _cifar_split(root, "data_batch_*")
    info = DataInfo("classification", 10, (3, 32, 32), torch.float32)
    if p.use_test_batch:
        return DataBundle(train, _cifar_split(root, "test_batch"), info)
    return _bundle(train, len(train), info, seed, val_fraction, train.labels.numpy())


# --------------------------------------------------------------------------- declared infos
# What each dataset gives a model, from its params alone (no data loaded): the dry run's answer.
# tests/worker/test_catalog.py checks every declaration against the bundle its builder returns.


def digits_info(params: dict[str, Any], data_root: Path | None = None) -> DataInfo:
    shape = (1, 8, 8) if DigitsParams.parse(params, "dataset 'digits'").as_image else (64,)
    return DataInfo("classification", 10, shape, torch.float32)


def synthetic_classification_info(
    params: dict[str, Any], data_root: Path | None = None
) -> DataInfo:
    p = SyntheticClassificationParams.parse(params, "dataset 'synthetic_classification'")
    return DataInfo("classification", p.n_classes, (p.n_features,), torch.float32)


def synthetic_lm_info(params: dict[str, Any], data_root: Path | None = None) -> DataInfo:
    p = SyntheticLMParams.parse(params, "dataset 'synthetic_lm'")
    return _lm_info(p.vocab_size, p.seq_len)


def text_file_info(params: dict[str, Any], data_root: Path | None = None) -> DataInfo:
    return _lm_info(256, TextFileParams.parse(params, "dataset 'text_file'").seq_len)


def cifar10_info(params: dict[str, Any], data_root: Path | None = None) -> DataInfo:
    Cifar10Params.parse(params, "dataset 'cifar10'")
    return DataInfo("classification", 10, (3, 32, 32), torch.float32)


BUILTINS: dict[str, CatalogEntry] = {
    "digits": CatalogEntry.of(digits, DigitsParams, digits_info),
    "synthetic_classification": CatalogEntry.of(
        synthetic_classification, SyntheticClassificationParams, synthetic_classification_info
    ),
    "synthetic_lm": CatalogEntry.of(synthetic_lm, SyntheticLMParams, synthetic_lm_info),
    "text_file": CatalogEntry.of(text_file, TextFileParams, text_file_info),
    # image_folder has no declaration: its channels and classes come from the files, so it is
    # built (its folders listed, no image decoded) to learn them
    "image_folder": CatalogEntry.of(image_folder, ImageFolderParams),
    "cifar10": CatalogEntry.of(cifar10, Cifar10Params, cifar10_info),
}
