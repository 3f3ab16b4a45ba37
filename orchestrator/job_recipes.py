"""The recipe a stage runs under, parsed once per process: a job's recipe never changes after submit."""

from __future__ import annotations

from db import stages
from db.session import StageConnection
from orchestrator.errors import JobNotFound
from orchestrator.recipes import Recipe

__all__ = ["job_recipe"]

_recipes: dict[str, Recipe] = {}


def job_recipe(db: StageConnection, job_id: str) -> Recipe:
    """The job's recipe, from this process's cache or the record."""
    recipe = _recipes.get(job_id)
    if recipe is None:
        stored = stages.job_recipe(db, job_id)
        if stored is None:
            raise JobNotFound(f"job {job_id} not found")
        recipe = _recipes[job_id] = Recipe.model_validate(stored)
    return recipe
