"""Submitting a job: store the job and all its items in one transaction, commit, then enqueue its dispatch.

A job is stored before anything is sent: when the broker is down at submit, the job stays `queued`
and the recovery sweep dispatches it once the broker is back (the submit says so). A retried submit
with the same Idempotency-Key gets the first job; the same key with a different request is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import submission
from db.models import Job, JobKind, JobStatus
from db.rows import NewItem
from orchestrator.celery_app import TASK_DISPATCH, app
from orchestrator.contracts import InputRecord
from orchestrator.errors import InputError, InvalidInput
from orchestrator.recipes import Recipe
from orchestrator.routing import BULK_PRIORITY, stage_priority

__all__ = ["Submission", "Submitted", "enqueue_job", "store_job", "submit_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """A validated job request: what the API (or any client of this module) asks to run."""

    recipe: Recipe
    records: Sequence[InputRecord]
    name: str | None = None
    priority: int = 0
    kind: JobKind = JobKind.BULK

    def digest(self) -> str:
        """A fingerprint of the request: what an Idempotency-Key stands for."""
        request = {
            "recipe": self.recipe.model_dump(mode="json"),
            "items": [record.model_dump(mode="json") for record in self.records],
            "name": self.name,
            "priority": self.priority,
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Submitted:
    """The job a submit answers with: new or the key's earlier one, and whether its dispatch was sent."""

    job: Job
    created: bool
    dispatched: bool


def store_job(session: Session, job: Submission, idempotency_key: str | None = None) -> Job:
    """Add the job and its items to the session's transaction; nothing is enqueued, the caller commits."""
    if not job.records:
        raise InputError("items: a job needs at least one item")
    items = [
        NewItem(
            instruction=r.instruction,
            external_id=r.id,
            dataset=r.dataset,
            system=r.system,
            messages=[m.model_dump() for m in r.messages] if r.messages else None,
            turns=r.turns,
        )
        for r in job.records
    ]
    return submission.insert_job(
        session,
        recipe_name=job.recipe.name,
        recipe=job.recipe.model_dump(mode="json"),
        items=items,
        name=job.name,
        priority=job.priority,
        kind=job.kind,
        idempotency_key=idempotency_key,
        idempotency_digest=job.digest() if idempotency_key is not None else None,
    )


def _earlier(session: Session, job: Submission, key: str | None) -> Job | None:
    """The job an Idempotency-Key was first used for; refused if it was used for another request."""
    if key is None:
        return None
    earlier = submission.job_by_idempotency_key(session, key)
    if earlier is not None and earlier.idempotency_digest not in (None, job.digest()):
        raise InvalidInput(
            f"Idempotency-Key {key!r} was already used for a different request (job {earlier.id}); "
            "use a new key for a new request"
        )
    return earlier


def submit_job(session: Session, job: Submission, idempotency_key: str | None = None) -> Submitted:
    """Store, commit and enqueue a job. A key already used for the same request returns its job."""
    earlier = _earlier(session, job, idempotency_key)
    if earlier is not None:
        return _found(earlier)
    try:
        stored = store_job(session, job, idempotency_key)
        session.commit()
    except IntegrityError:
        # A concurrent submit with the same key committed first: its job is the answer, and like any
        # earlier job it may not have been dispatched yet.
        session.rollback()
        earlier = _earlier(session, job, idempotency_key)
        if earlier is None:
            raise
        return _found(earlier)
    return _dispatched(stored, created=True)


def _found(earlier: Job) -> Submitted:
    """The key's earlier job. Still queued, its dispatch is sent again: the first submit may have stopped
    between its commit and its dispatch (a killed client, a broker down); a dispatch that finds the job
    started sends nothing."""
    if earlier.status == JobStatus.QUEUED:
        return _dispatched(earlier, created=False)
    return Submitted(earlier, created=False, dispatched=True)


def _dispatched(job: Job, *, created: bool) -> Submitted:
    try:
        enqueue_job(job.id, stage_priority(job.kind, job.priority))
    except (BrokerError, RedisError) as exc:
        log.warning("job %s stored, its dispatch not sent (%s): the recovery sweep sends it", job.id, exc)
        return Submitted(job, created=created, dispatched=False)
    return Submitted(job, created=created, dispatched=True)


def enqueue_job(job_id: str, priority: int = BULK_PRIORITY) -> None:
    """Send the job's dispatch task, at its stages' priority step (a chat request's dispatch must not
    wait behind bulk stages for a thread); call only after the job's transaction committed."""
    # Nothing waits for its result: no subscription to the result backend (one more connection that
    # could fail) is made for it.
    app.send_task(TASK_DISPATCH, args=(job_id,), ignore_result=True, priority=priority)
