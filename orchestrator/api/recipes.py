"""/v1/recipes: the recipes a job may name."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.api.bodies import RecipePublic, RecipesPublic
from orchestrator.api.deps import SettingsDep
from orchestrator.errors import RecipeError
from orchestrator.recipes import available_recipes, load_recipe

__all__ = ["router"]

router = APIRouter(prefix="/recipes", tags=["recipes"])


@router.get("", response_model=RecipesPublic)
def list_recipes(settings: SettingsDep) -> RecipesPublic:
    """Every recipe in the recipes folder; a file that does not load is listed with its error."""
    data = []
    for name in available_recipes(settings.recipes_dir):
        try:
            data.append(RecipePublic.of(load_recipe(name, settings.recipes_dir)))
        except RecipeError as exc:
            data.append(RecipePublic(name=name, error=str(exc)))
    return RecipesPublic(data=data, count=len(data))
