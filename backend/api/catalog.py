"""/api/catalog routes: what a run config may name, and model layer trees."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kdlab.backend.api.deps import PrincipalDep, SettingsDep
from kdlab.backend.schemas.catalog import Catalog, Layer
from kdlab.backend.services import catalog as service
from kdlab.backend.services.validation import data_root

router = APIRouter(prefix="/catalog", tags=["catalog"])


@router.get("")
def get_catalog(_: PrincipalDep) -> Catalog:
    """Models and datasets (with their params' JSON Schema), losses, balancers and the
    RunConfig JSON Schema that drives the launch form."""
    return service.catalog_listing()


@router.get(
    "/models/{name}/layers",
    responses={404: {"description": "Unknown model name."}, 422: {"description": "Bad params."}},
)
def model_layers(
    name: str,
    settings: SettingsDep,
    _: PrincipalDep,
    dataset: Annotated[
        str, Query(description="Catalog dataset the model is built for.")
    ] = "digits",
    params: Annotated[str | None, Query(description="Model params, a JSON object.")] = None,
    dataset_params: Annotated[
        str | None, Query(description="Dataset params, a JSON object.")
    ] = None,
) -> list[Layer]:
    """Every named module with its output shape ([B, ...], B = 2) and parameter count, from a
    meta-device probe (for the layer-pair picker)."""
    return service.model_layers(name, params, dataset, dataset_params, data_root(settings))
