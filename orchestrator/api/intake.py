"""Reading a job submission, JSON or a multipart upload: everything is validated before anything is stored."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from orchestrator.api.bodies import JobCreate
from orchestrator.api.problems import ProblemError, validation_problem
from orchestrator.contracts import InputRecord
from orchestrator.errors import InputError, RecipeError
from orchestrator.inputs import FieldMap, assign_ids, read_stream, upload_options
from orchestrator.recipes import Recipe, available_recipes, load_recipe, parse_recipe
from orchestrator.settings import Settings
from orchestrator.submission import Submission

__all__ = ["read_submission", "resolve_recipe"]

# Names stored in VARCHAR(200) columns (job recipe name, candidate and output model).
MAX_NAME = 200


def _unprocessable(message: str) -> ProblemError:
    return ProblemError(422, message, [message])


def resolve_recipe(ref: str | dict[str, Any], settings: Settings) -> Recipe:
    """A recipe by name from the recipes folder (never a path), or an inline recipe object."""
    if isinstance(ref, str):
        known = available_recipes(settings.recipes_dir)
        if ref not in known:
            raise _unprocessable(
                f"recipe: unknown recipe {ref!r} (known recipes: {', '.join(known) or 'none'})"
            )
        try:
            return load_recipe(ref, settings.recipes_dir)
        except RecipeError as exc:
            raise _unprocessable(f"recipe: {exc}") from None
    try:
        recipe = parse_recipe({"name": "inline", **ref}, source="recipe")
    except RecipeError as exc:
        lines = str(exc).splitlines()
        raise ProblemError(422, lines[0], lines) from None
    names = [recipe.name, *recipe.models]
    if any(len(name) > MAX_NAME or "\x00" in name for name in names):
        raise _unprocessable(
            f"recipe: names of the recipe and its models: at most {MAX_NAME} characters, no NUL"
        )
    return recipe


def _from_json(body: bytes) -> JobCreate:
    try:
        return JobCreate.model_validate_json(body)
    except ValidationError as exc:
        raise validation_problem(exc) from None


async def _from_upload(request: Request) -> tuple[str, list[InputRecord], str | None, int]:
    form = await request.form(max_files=1, max_fields=8)
    upload, recipe = form.get("file"), form.get("recipe")
    if not isinstance(upload, UploadFile):
        raise _unprocessable("file: a JSONL or AlpacaEval-JSON prompt file is required (or Parquet, CSV)")
    if not isinstance(recipe, str) or not recipe:
        raise _unprocessable("recipe: a recipe name is required")
    name = form.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME or "\x00" in name):
        raise _unprocessable(f"name: at most {MAX_NAME} characters of text")
    priority_text = form.get("priority") or "0"
    if not isinstance(priority_text, str) or not priority_text.isdigit() or int(priority_text) > 9:
        raise _unprocessable("priority: an integer from 0 to 9")
    source = upload.filename or "upload"
    try:
        fields, input_format = upload_options(form.get("fields"), form.get("input_format"))
        records = await run_in_threadpool(
            read_stream, upload.file, source, input_format=input_format, fields=fields
        )
    except InputError as exc:
        raise _unprocessable(str(exc)) from None
    return recipe, records, name, int(priority_text)


async def read_submission(request: Request, settings: Settings) -> Submission:
    """Parse and validate a submission; raises ProblemError (415, 422) naming every bad field."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        job_in = await run_in_threadpool(_from_json, await request.body())
        recipe_ref, name, priority = job_in.recipe, job_in.name, job_in.priority
        try:
            records = assign_ids(job_in.items, lambda i: f"items[{i}]", FieldMap.of(job_in.fields))
        except InputError as exc:
            raise _unprocessable(str(exc)) from None
    elif media_type == "multipart/form-data":
        recipe_ref, records, name, priority = await _from_upload(request)
    else:
        raise ProblemError(415, "send application/json or a multipart/form-data upload")
    if len(records) > settings.max_items_per_job:
        raise _unprocessable(f"items: at most {settings.max_items_per_job} a job, got {len(records)}")
    recipe = await run_in_threadpool(resolve_recipe, recipe_ref, settings)
    return Submission(recipe=recipe, records=records, name=name, priority=priority)
