"""Submitting a job: validate, store the job and all its items in one transaction, then enqueue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from db import queries, stages
from db.session import StageConnection, session_scope
from orchestrator.celery_app import TASK_DISPATCH, app
from orchestrator.recipes import Recipe
from orchestrator.schemas import InputRecord

__all__ = ["Submission", "create_job", "enqueue_job", "job_recipe", "submit_job"]


def create_job(
    url: str,
    recipe: Recipe,
    records: Sequence[InputRecord],
    name: str | None = None,
    *,
    priority: int = 0,
    idempotency_key: str | None = None,
) -> str:
    """Store the job and its items atomically and return the job id; nothing is enqueued yet."""
    if not records:
        raise ValueError("items: a job needs at least one item")
    items = [
        queries.NewItem(instruction=r.instruction, external_id=r.id, dataset=r.dataset, system=r.system)
        for r in records
    ]
    with session_scope(url) as session:
        job = queries.create_job(
            session,
            recipe_name=recipe.name,
            recipe=recipe.model_dump(mode="json"),
            items=items,
            name=name,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        return job.id


def _job_with_key(url: str, key: str | None) -> str | None:
    if key is None:
        return None
    with session_scope(url) as session:
        job = queries.job_by_idempotency_key(session, key)
        return job.id if job else None


@dataclass(frozen=True)
class Submission:
    """A validated job request: what the API (or any client of this module) asks to run."""

    recipe: Recipe
    records: Sequence[InputRecord]
    name: str | None = None
    priority: int = 0


def submit_job(url: str, job: Submission, idempotency_key: str | None = None) -> tuple[str, bool]:
    """Store and enqueue a job; returns (job id, created). A key already used returns its job, uncreated."""
    existing = _job_with_key(url, idempotency_key)
    if existing is not None:
        return existing, False
    try:
        job_id = create_job(
            url, job.recipe, job.records, job.name, priority=job.priority, idempotency_key=idempotency_key
        )
    except IntegrityError:
        # A concurrent submit with the same key committed first: its job is the answer.
        existing = _job_with_key(url, idempotency_key)
        if existing is None:
            raise
        return existing, False
    enqueue_job(job_id)
    return job_id, True


def enqueue_job(job_id: str) -> None:
    """Send the job's dispatch task; call only after the job's transaction committed."""
    app.send_task(TASK_DISPATCH, args=(job_id,))


_recipes: dict[str, Recipe] = {}


def job_recipe(db: StageConnection, job_id: str) -> Recipe:
    """A job's recipe never changes after submit, so each process parses it once."""
    recipe = _recipes.get(job_id)
    if recipe is None:
        stored = stages.job_recipe(db, job_id)
        if stored is None:
            raise LookupError(f"job {job_id} not found")
        recipe = _recipes[job_id] = Recipe.model_validate(stored)
    return recipe
