"""The reads and writes of jobs and items: submit, progress, export, retry and recovery. The stage
tasks' own statements are in `db.stages`.

Every write is idempotent: a redelivered task changes nothing that is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from db.models import FINAL_JOB_STATUSES, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow

__all__ = [
    "ITEM_COUNTERS",
    "GenerationRecord",
    "JobCounts",
    "NewItem",
    "RetryPlan",
    "StalledItem",
    "cancel_job",
    "count_rows",
    "create_job",
    "failed_stage_items",
    "finished_items",
    "get_item",
    "get_job",
    "item_ids",
    "job_by_idempotency_key",
    "job_counts",
    "job_outputs",
    "list_items",
    "list_jobs",
    "mark_dispatched",
    "mark_job_running",
    "reopen_items",
    "stalled_items",
    "upsert_insert",
]


@dataclass(frozen=True)
class NewItem:
    instruction: str
    external_id: str | None = None
    dataset: str | None = None
    system: str | None = None


@dataclass(frozen=True)
class GenerationRecord:
    """What a stage stores about one generation (or its failure, with `error` set and `text` None)."""

    model: str
    text: str | None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    attempt: int = 1
    # The worker node that ran the stage.
    worker: str | None = None


def upsert_insert(session: Session, table: Any) -> Any:
    """An INSERT with ON CONFLICT support for the session's database (Postgres, or SQLite embedded)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def create_job(
    session: Session,
    *,
    recipe_name: str,
    recipe: dict[str, Any],
    items: Sequence[NewItem],
    name: str | None,
    priority: int = 0,
    idempotency_key: str | None = None,
) -> Job:
    """Add a job and all its items to the session's transaction; the caller commits once."""
    job = Job(
        name=name,
        recipe_name=recipe_name,
        recipe=recipe,
        total_items=len(items),
        priority=priority,
        idempotency_key=idempotency_key,
    )
    session.add(job)
    session.flush()
    session.execute(
        upsert_insert(session, Item),
        [
            {
                "job_id": job.id,
                "position": position,
                "external_id": item.external_id,
                "dataset": item.dataset,
                "instruction": item.instruction,
                "system": item.system,
                "status": ItemStatus.PENDING,
            }
            for position, item in enumerate(items)
        ],
    )
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def get_item(session: Session, item_id: int) -> Item | None:
    return session.get(Item, item_id)


def job_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == key))


def list_jobs(session: Session, *, status: str | None, offset: int, limit: int) -> tuple[list[Job], int]:
    """One page of jobs, newest first, and how many match in all."""
    where = [Job.status == status] if status else []
    count = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    page = session.scalars(
        select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)
    )
    return list(page), count


def list_items(
    session: Session, job_id: str, *, status: str | None, offset: int, limit: int
) -> tuple[list[Item], int]:
    """One page of a job's items in input order, and how many match in all."""
    where = [Item.job_id == job_id] + ([Item.status == status] if status else [])
    count = session.scalar(select(func.count()).select_from(Item).where(*where)) or 0
    page = session.scalars(select(Item).where(*where).order_by(Item.position).offset(offset).limit(limit))
    return list(page), count


@dataclass(frozen=True)
class JobCounts:
    """Progress of a job per stage: items by status, candidate rows per layer, tokens generated."""

    items: dict[str, int]
    # layer -> (finished candidates, failed candidates)
    candidates: dict[int, tuple[int, int]]
    outputs: int
    prompt_tokens: int
    output_tokens: int


def job_counts(session: Session, job_id: str) -> JobCounts:
    """Count a job's rows per stage and status with four aggregate queries."""
    items = dict(
        session.execute(select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status))
        .tuples()
        .all()
    )
    failed = Candidate.error.is_not(None)
    layers: Sequence[Any] = session.execute(
        select(
            Candidate.layer,
            func.count().filter(~failed),
            func.count().filter(failed),
            func.coalesce(func.sum(Candidate.prompt_tokens), 0),
            func.coalesce(func.sum(Candidate.output_tokens), 0),
        )
        .join(Item)
        .where(Item.job_id == job_id)
        .group_by(Candidate.layer)
    ).all()
    outputs, out_prompt, out_output = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(Output.prompt_tokens), 0),
            func.coalesce(func.sum(Output.output_tokens), 0),
        )
        .join(Item)
        .where(Item.job_id == job_id)
    ).one()
    return JobCounts(
        items=items,
        candidates={layer: (ok, bad) for layer, ok, bad, _, _ in layers},
        outputs=outputs,
        prompt_tokens=out_prompt + sum(row[3] for row in layers),
        output_tokens=out_output + sum(row[4] for row in layers),
    )


def cancel_job(session: Session, job_id: str) -> bool:
    """Mark a job that has not ended `cancelled`; False when it had already ended.

    Stage tasks check the job's status when they start, so queued stages return without working.
    """
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(list(FINAL_JOB_STATUSES)))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        .returning(Job.id)
    ).scalar_one_or_none()
    return moved is not None


def finished_items(
    session: Session, job_id: str, *, after_position: int, limit: int, with_pools: bool
) -> list[tuple[Item, Output | None]]:
    """The next `limit` finished items after `after_position`, in input order, with their outputs.

    Keyset pages: an export reads a job of any size in constant memory, one page per query.
    """
    query = (
        select(Item, Output)
        .outerjoin(Output, Output.item_id == Item.id)
        .where(Item.job_id == job_id, Item.position > after_position, Item.status != ItemStatus.PENDING)
        .order_by(Item.position)
        .limit(limit)
    )
    if with_pools:
        query = query.options(selectinload(Item.candidates))
    return [(item, output) for item, output in session.execute(query).tuples()]


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


def mark_dispatched(
    session: Session, item_ids: Sequence[int] | None = None, *, job_id: str | None = None
) -> None:
    """Stamp items whose canvas was just sent: by ids, or every pending item of a job."""
    statement = update(Item).values(dispatched_at=utcnow())
    if job_id is not None:
        statement = statement.where(Item.job_id == job_id, Item.status == ItemStatus.PENDING)
    elif item_ids:
        statement = statement.where(Item.id.in_(item_ids))
    else:
        return
    session.execute(statement)


@dataclass(frozen=True)
class StalledItem:
    item_id: int
    job_id: str
    # (layer, slot) of every candidate row the item has, finished or failed.
    rows: frozenset[tuple[int, int]]


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


# Counted per final item status on its job.
ITEM_COUNTERS = {
    ItemStatus.SUCCEEDED: Job.items_succeeded,
    ItemStatus.DEGRADED: Job.items_degraded,
    ItemStatus.FAILED: Job.items_failed,
}


def job_outputs(session: Session, job_id: str) -> Iterable[tuple[Item, Output | None]]:
    """Items of a job in input order with their outputs (None for failed ones)."""
    query = (
        select(Item, Output)
        .outerjoin(Output, Output.item_id == Item.id)
        .where(Item.job_id == job_id)
        .order_by(Item.position)
    )
    yield from session.execute(query)


def count_rows(session: Session, job_id: str) -> dict[str, int]:
    """Items, candidates and outputs stored for a job: what `run` reports at the end."""
    items = session.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id)) or 0
    candidates = (
        session.scalar(select(func.count()).select_from(Candidate).join(Item).where(Item.job_id == job_id))
        or 0
    )
    outputs = (
        session.scalar(select(func.count()).select_from(Output).join(Item).where(Item.job_id == job_id)) or 0
    )
    return {"items": items, "candidates": candidates, "outputs": outputs}


@dataclass(frozen=True)
class RetryPlan:
    """Which items a retry re-runs, and from where: the whole canvas or the aggregator alone."""

    canvas: list[int]
    aggregator_only: list[int]


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
            | {Job.status: JobStatus.RUNNING, Job.finished_at: None}
        )
    )
    return len(ids)


def failed_stage_items(session: Session, job_id: str, item_ids: Sequence[int] | None = None) -> RetryPlan:
    """Items with a failed stage: failed or degraded items, split by whether their pool needs work.

    An item whose pool is complete and whose aggregator failed needs the aggregator only, so its
    candidates are never regenerated.
    """
    query = select(Item).where(
        Item.job_id == job_id, Item.status.in_([ItemStatus.FAILED, ItemStatus.DEGRADED])
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
