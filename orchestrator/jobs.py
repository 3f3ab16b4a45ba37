"""Submitting a job: validate, store the job and all its items in one transaction, then enqueue."""

from __future__ import annotations

from collections.abc import Sequence

from db import queries
from db.session import session_scope
from orchestrator.celery_app import TASK_DISPATCH, app
from orchestrator.recipes import Recipe
from orchestrator.schemas import InputRecord

__all__ = ["create_job", "enqueue_job"]


def create_job(url: str, recipe: Recipe, records: Sequence[InputRecord], name: str | None = None) -> str:
    """Store the job and its items atomically and return the job id; nothing is enqueued yet."""
    if not records:
        raise ValueError("items: a job needs at least one item")
    items = [
        queries.NewItem(instruction=r.instruction, external_id=r.id, dataset=r.dataset, system=r.system)
        for r in records
    ]
    with session_scope(url) as session:
        job = queries.create_job(
            session, recipe_name=recipe.name, recipe=recipe.model_dump(mode="json"), items=items, name=name
        )
        return job.id


def enqueue_job(job_id: str) -> None:
    """Send the job's dispatch task; call only after the job's transaction committed."""
    app.send_task(TASK_DISPATCH, args=(job_id,))
