"""Re-running what failed: retry of failed stages (the API's and CLI's `retry`).

A retry reopens only items with a failed stage and reuses every finished candidate: proposer tasks
find their rows and return, so only failed slots generate again. An item whose aggregator failed on
a complete pool gets the aggregator alone.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from pydantic import BaseModel

from db import queries
from db.models import JobStatus
from db.session import session_scope
from orchestrator.canvas import item_canvas
from orchestrator.celery_app import TASK_AGGREGATOR, app
from orchestrator.recipes import Recipe

__all__ = ["JobNotFound", "NotRetryable", "RetryResult", "RetryStage", "retry_job"]


class RetryStage(enum.StrEnum):
    ALL = "all"
    PROPOSERS = "proposers"
    AGGREGATOR = "aggregator"


class RetryResult(BaseModel):
    job_id: str
    items_reopened: int
    proposer_items: list[int]
    aggregator_items: list[int]


class JobNotFound(LookupError):
    """No job with that id."""


class NotRetryable(ValueError):
    """The job or the items named cannot be retried; the message says why."""


def retry_job(
    database_url: str,
    job_id: str,
    *,
    stage: RetryStage = RetryStage.ALL,
    item_ids: Sequence[int] | None = None,
) -> RetryResult:
    """Reopen the items with failed stages and enqueue exactly those stages, after the commit."""
    with session_scope(database_url) as session:
        job = queries.get_job(session, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.status == JobStatus.CANCELLED:
            raise NotRetryable(f"job {job_id} was cancelled")
        if item_ids is not None:
            known = set(queries.item_ids(session, job_id))
            unknown = sorted(set(item_ids) - known)
            if unknown:
                raise NotRetryable(f"items {unknown} are not items of job {job_id}")
        plan = queries.failed_stage_items(session, job_id, item_ids)
        canvas = plan.canvas if stage != RetryStage.AGGREGATOR else []
        aggregator = plan.aggregator_only if stage != RetryStage.PROPOSERS else []
        reopened = queries.reopen_items(session, job_id, canvas, drop_outputs=True)
        reopened += queries.reopen_items(session, job_id, aggregator, drop_outputs=False)
        recipe = Recipe.model_validate(job.recipe)
    for item_id in canvas:
        item_canvas(item_id, recipe).apply_async()
    for item_id in aggregator:
        app.send_task(TASK_AGGREGATOR, args=(item_id,))
    return RetryResult(
        job_id=job_id, items_reopened=reopened, proposer_items=canvas, aggregator_items=aggregator
    )
