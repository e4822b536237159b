"""Response bodies of `/api/catalog`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class CatalogItem(BaseModel):
    description: str
    params_schema: dict[str, Any] | None = Field(
        description="JSON Schema of the params; None for plug-ins that declare none."
    )


class LossParam(BaseModel):
    name: str
    default: Any = Field(default=None, description="The default value (absent when required).")
    required: bool


class LossItem(BaseModel):
    description: str = Field(description="First line of the loss's docstring.")
    params: list[LossParam]


class Catalog(BaseModel):
    models: dict[str, CatalogItem]
    datasets: dict[str, CatalogItem]
    losses: dict[str, LossItem]
    balancers: list[str]
    run_config_schema: dict[str, Any] = Field(description="JSON Schema of RunConfig.")
    schema_version: Literal[1] = 1


class Layer(BaseModel):
    """One module of a model, from a probe forward pass of a batch of 2."""

    name: str = Field(description="Name from named_modules(); '' is the whole model.")
    type: str = Field(description="Class name of the module.")
    output_shape: list[int] | None = Field(
        description="Shape of its output ([B, ...], B = 2); None when it is not a tensor or "
        "the module did not run."
    )
    params: int = Field(description="Parameters in this module and its children.")
