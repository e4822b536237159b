"""Built-in catalog models. Each builder is `(params: dict, info: DataInfo) -> nn.Module` (the
plug-in signature too) and every model's `forward(x)` returns a logits tensor.

Layer names are stable so KD layer pairs can name them: `mlp` and `cnn_small` have blocks
`features.0`, `features.1`, … and the head `fc`; the resnets keep torchvision's names (`layer1`,
…, `fc`); `gpt2` has `transformer.h.0`, … and `lm_head`. Weights are never downloaded.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from kdlab.worker.catalog import CatalogEntry, DataInfo
from kdlab.worker.params import Params

if TYPE_CHECKING:
    from transformers import GPT2Config

MAX_WIDTH = 65_536  # units / channels / hidden size of one layer
MAX_LAYERS = 64  # hidden layers of an mlp, conv blocks of a cnn_small, blocks of a gpt2
_Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def _require_task(info: DataInfo, task: str, owner: str) -> None:
    if info.task != task:
        raise ValueError(f"model {owner!r} needs a {task} dataset, got a {info.task} one")


def _image_shape(info: DataInfo, owner: str) -> tuple[int, int, int]:
    _require_task(info, "classification", owner)
    if len(info.input_shape) != 3:
        raise ValueError(
            f"model {owner!r} needs image inputs [C, H, W], got {list(info.input_shape)} "
            "(for digits set the dataset param as_image: true)"
        )
    c, h, w = info.input_shape
    return c, h, w


# --------------------------------------------------------------------------- mlp


class MLPParams(Params):
    hidden: list[_Width] = Field(
        default=[128], max_length=MAX_LAYERS, description="Width of each hidden layer."
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout after each block.")
    activation: Literal["relu", "gelu"] = Field(default="relu", description="Activation.")


def _dense_block(n_in: int, n_out: int, activation: str, dropout: float) -> nn.Sequential:
    layers = [nn.Linear(n_in, n_out), _ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout else nn.Sequential(*layers)


class MLP(nn.Module):
    """Flatten → `features` (Linear-activation blocks) → `fc`."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        dims = [in_features, *hidden]
        self.flatten = nn.Flatten()
        self.features = nn.Sequential(
            *(_dense_block(a, b, activation, dropout) for a, b in itertools.pairwise(dims))
        )
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.flatten(x)))


def mlp(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """Multi-layer perceptron on flattened inputs (blocks features.N, head fc)."""
    p = MLPParams.parse(params, "model 'mlp'")
    _require_task(info, "classification", "mlp")
    in_features = int(torch.Size(info.input_shape).numel())
    return MLP(in_features, p.hidden, info.num_classes, p.dropout, p.activation)


# --------------------------------------------------------------------------- cnn_small


class CNNParams(Params):
    channels: list[_Width] = Field(
        default=[16, 32],
        min_length=1,
        max_length=MAX_LAYERS,
        description="Output channels of each conv block.",
    )


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """`features` (conv-bn-relu blocks, stride 2 after the first) → global average pool → `fc`."""

    def __init__(self, in_channels: int, channels: list[int], num_classes: int) -> None:
        super().__init__()
        dims = [in_channels, *channels]
        self.features = nn.Sequential(
            *(
                _conv_block(a, b, 1 if i == 0 else 2)
                for i, (a, b) in enumerate(itertools.pairwise(dims))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def cnn_small(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """Small CNN for [C, H, W] images (blocks features.N, head fc)."""
    p = CNNParams.parse(params, "model 'cnn_small'")
    in_channels, _, _ = _image_shape(info, "cnn_small")
    return SmallCNN(in_channels, p.channels, info.num_classes)


# --------------------------------------------------------------------------- torchvision resnets


class ResNetParams(Params):
    small_input: bool = Field(
        default=False,
        description="3×3 stride-1 stem and no max-pool, for small images (CIFAR-sized or less).",
    )


def _resnet(arch: str, params: dict[str, Any], info: DataInfo) -> nn.Module:
    p = ResNetParams.parse(params, f"model {arch!r}")
    in_channels, _, _ = _image_shape(info, arch)
    try:
        from torchvision import models as tv_models
    except ImportError as err:
        raise ImportError(f"model {arch!r} needs torchvision: pip install kdlab[vision]") from err
    model = getattr(tv_models, arch)(weights=None, num_classes=info.num_classes)
    if p.small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """ResNet-18 (torchvision, random init; needs kdlab[vision])."""
    return _resnet("resnet18", params, info)


def resnet34(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """ResNet-34 (torchvision, random init; needs kdlab[vision])."""
    return _resnet("resnet34", params, info)


def resnet50(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """ResNet-50 (torchvision, random init; needs kdlab[vision])."""
    return _resnet("resnet50", params, info)


# --------------------------------------------------------------------------- gpt2


class GPT2Params(Params):
    n_layer: int = Field(default=2, ge=1, le=MAX_LAYERS, description="Transformer blocks.")
    n_head: int = Field(
        default=2, ge=1, le=MAX_WIDTH, description="Attention heads (must divide n_embd)."
    )
    n_embd: int = Field(default=64, ge=1, le=MAX_WIDTH, description="Hidden size.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Residual/embedding/attn dropout.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Self:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class GPT2LM(nn.Module):
    """GPT-2 (`transformer`, from transformers) plus an untied `lm_head`; forward → logits.

    The head is not tied to the token embedding so the state dict has no shared tensors
    (safetensors refuses those).
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        from transformers import GPT2Model

        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(input_ids=input_ids).last_hidden_state)


def gpt2(params: dict[str, Any], info: DataInfo) -> nn.Module:
    """Small GPT-2 language model from a transformers config (random init, never downloaded)."""
    p = GPT2Params.parse(params, "model 'gpt2'")
    _require_task(info, "lm", "gpt2")
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=info.num_classes,
        n_positions=info.input_shape[-1],
        n_layer=p.n_layer,
        n_head=p.n_head,
        n_embd=p.n_embd,
        resid_pdrop=p.dropout,
        embd_pdrop=p.dropout,
        attn_pdrop=p.dropout,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return GPT2LM(config)


BUILTINS: dict[str, CatalogEntry] = {
    "mlp": CatalogEntry.of(mlp, MLPParams),
    "cnn_small": CatalogEntry.of(cnn_small, CNNParams),
    "resnet18": CatalogEntry.of(resnet18, ResNetParams),
    "resnet34": CatalogEntry.of(resnet34, ResNetParams),
    "resnet50": CatalogEntry.of(resnet50, ResNetParams),
    "gpt2": CatalogEntry.of(gpt2, GPT2Params),
}
