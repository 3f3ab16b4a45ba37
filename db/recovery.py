"""What dispatch, retry and the recovery sweep read and write: which items wait, and reopening failed ones.

Finished candidates are never touched here: a re-run stage finds its row and returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, selectinload

from db.models import ITEM_COUNTERS, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow
from db.rows import RetryPlan, StalledItem

__all__ = [
    "failed_stage_items",
    "item_ids",
    "mark_items_dispatched",
    "mark_job_running",
    "reopen_items",
    "stalled_items",
]


def item_ids(session: Session, job_id: str, *, pending_only: bool = False) -> list[int]:
    query = select(Item.id).where(Item.job_id == job_id).order_by(Item.position)
    if pending_only:
        query = query.where(Item.status == ItemStatus.PENDING)
    return list(session.scalars(query))


def mark_job_running(session: Session, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=utcnow())
    )


def mark_items_dispatched(
    session: Session, item_ids: Sequence[int] | None = None, *, job_id: str | None = None
) -> None:
    """Stamp many items whose canvases were just sent: by ids, or every pending item of a job."""
    statement = update(Item).values(dispatched_at=utcnow())
    if job_id is not None:
        statement = statement.where(Item.job_id == job_id, Item.status == ItemStatus.PENDING)
    elif item_ids:
        statement = statement.where(Item.id.in_(item_ids))
    else:
        return
    session.execute(statement)


def stalled_items(session: Session, quiet_since: datetime, limit: int = 10_000) -> list[StalledItem]:
    """Pending items of live jobs with no dispatch and no candidate written since `quiet_since`."""
    recent = select(Candidate.id).where(Candidate.item_id == Item.id, Candidate.created_at >= quiet_since)
    query = (
        select(Item.id, Item.job_id)
        .join(Job, Job.id == Item.job_id)
        .where(
            Item.status == ItemStatus.PENDING,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            Job.created_at < quiet_since,
            or_(Item.dispatched_at.is_(None), Item.dispatched_at < quiet_since),
            ~recent.exists(),
        )
        .order_by(Item.id)
        .limit(limit)
    )
    items = session.execute(query).all()
    rows: dict[int, set[tuple[int, int]]] = {item_id: set() for item_id, _ in items}
    if rows:
        found = session.execute(
            select(Candidate.item_id, Candidate.layer, Candidate.slot).where(Candidate.item_id.in_(rows))
        )
        for item_id, layer, slot in found:
            rows[item_id].add((layer, slot))
    return [StalledItem(item_id, job_id, frozenset(rows[item_id])) for item_id, job_id in items]


def reopen_items(session: Session, job_id: str, item_ids: Sequence[int], *, drop_outputs: bool) -> int:
    """Move finished items back to pending and uncount them on the job; returns how many moved.

    Finished candidates are kept: the re-run stages find them and return without generating.
    """
    if not item_ids:
        return 0
    rows = session.execute(
        select(Item.id, Item.status).where(
            Item.job_id == job_id, Item.id.in_(item_ids), Item.status != ItemStatus.PENDING
        )
    ).all()
    if not rows:
        return 0
    counts = {status: sum(1 for _, s in rows if s == status) for status in ITEM_COUNTERS}
    ids = [item_id for item_id, _ in rows]
    if drop_outputs:
        session.execute(delete(Output).where(Output.item_id.in_(ids)))
    session.execute(
        update(Item)
        .where(Item.id.in_(ids))
        .values(status=ItemStatus.PENDING, error=None, truncation=None, finished_at=None)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            {column: column - counts[status] for status, column in ITEM_COUNTERS.items()}
            | {Job.status: JobStatus.RUNNING, Job.finished_at: None, Job.error: None}
        )
    )
    return len(ids)


def failed_stage_items(session: Session, job_id: str, item_ids: Sequence[int] | None = None) -> RetryPlan:
    """Items with a failed stage: failed or degraded items, split by whether their pool needs work.

    An item whose pool is complete and whose aggregator failed needs the aggregator only, so its
    candidates are never regenerated.
    """
    query = (
        select(Item)
        .where(Item.job_id == job_id, Item.status.in_([ItemStatus.FAILED, ItemStatus.DEGRADED]))
        .options(selectinload(Item.candidates))
    )
    if item_ids is not None:
        query = query.where(Item.id.in_(item_ids))
    canvas, aggregator_only = [], []
    for item in session.scalars(query):
        if any(not c.ok for c in item.candidates) or item.status == ItemStatus.DEGRADED:
            canvas.append(item.id)
        elif item.candidates:
            aggregator_only.append(item.id)
        else:
            canvas.append(item.id)
    return RetryPlan(canvas=canvas, aggregator_only=aggregator_only)
