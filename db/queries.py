"""The reads and writes the stages make.

Every write is idempotent: a redelivered task changes nothing that is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import JSON, Connection, CursorResult, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from db.models import FINAL_JOB_STATUSES, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow

__all__ = [
    "CandidateRow",
    "Executor",
    "GenerationRecord",
    "JobCounts",
    "NewItem",
    "RetryPlan",
    "StageRead",
    "StalledItem",
    "cancel_job",
    "count_rows",
    "create_job",
    "failed_stage_items",
    "finish_item",
    "finished_items",
    "get_item",
    "get_job",
    "item_ids",
    "job_by_idempotency_key",
    "job_counts",
    "job_outputs",
    "job_recipe",
    "list_items",
    "list_jobs",
    "mark_dispatched",
    "mark_job_running",
    "read_stage",
    "record_candidate",
    "record_output",
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


# What the queries run on: an ORM session, or a Core connection (the stage tasks' hot path, where an
# ORM session and its identity map cost more CPU than the statements themselves).
Executor = Session | Connection


def _dialect(executor: Executor) -> str:
    bind = executor.get_bind() if isinstance(executor, Session) else executor
    return bind.dialect.name


def _insert(dialect: str, table: Any) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def upsert_insert(executor: Executor, table: Any) -> Any:
    """An INSERT with ON CONFLICT support for the executor's database (Postgres, or SQLite embedded)."""
    return _insert(_dialect(executor), table)


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
    executor: Executor, item_ids: Sequence[int] | None = None, *, job_id: str | None = None
) -> None:
    """Stamp items whose canvas was just sent: by ids, or every pending item of a job."""
    statement = update(Item).values(dispatched_at=utcnow())
    if job_id is not None:
        statement = statement.where(Item.job_id == job_id, Item.status == ItemStatus.PENDING)
    elif item_ids:
        statement = statement.where(Item.id.in_(item_ids))
    else:
        return
    executor.execute(statement)


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


class CandidateRow(NamedTuple):
    """A candidate as a stage reads it: the columns it uses, without an ORM object."""

    id: int
    layer: int
    slot: int
    text: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass(frozen=True)
class StageRead:
    """What a stage task needs of its item: its fields, its job's status, its candidate rows."""

    job_id: str
    instruction: str
    system: str | None
    status: str
    job_status: str
    # Rows of the layers read, ordered by layer and slot.
    candidates: list[CandidateRow]

    @property
    def runnable(self) -> bool:
        """The item still waits for its stages: it is pending and its job was not cancelled."""
        return self.status == ItemStatus.PENDING and self.job_status != JobStatus.CANCELLED

    def pool(self, layer: int) -> list[CandidateRow]:
        """Every slot row of a layer, ordered by slot: finished ones and recorded failures."""
        return [c for c in self.candidates if c.layer == layer]


# The stage statements are built once: building and hashing a statement per call costs more CPU
# than running it.
_STAGE_READ = (
    select(
        Item.job_id,
        Item.instruction,
        Item.system,
        Item.status,
        Job.status,
        Candidate.id,
        Candidate.layer,
        Candidate.slot,
        Candidate.text,
        Candidate.error,
    )
    .join(Job, Job.id == Item.job_id)
    .outerjoin(Candidate, and_(Candidate.item_id == Item.id, Candidate.layer >= bindparam("from_layer")))
    .where(Item.id == bindparam("item_id"))
    .order_by(Candidate.layer, Candidate.slot)
)


def read_stage(executor: Executor, item_id: int, from_layer: int = 0) -> StageRead | None:
    """The item, its job's status and its candidate rows of layers >= `from_layer`, in one query;
    None when there is no such item."""
    rows = executor.execute(_STAGE_READ, {"item_id": item_id, "from_layer": from_layer}).all()
    if not rows:
        return None
    job_id, instruction, system, status, job_status = rows[0][:5]
    # An item without candidate rows comes back as one row whose candidate columns are NULL.
    candidates = [CandidateRow._make(row[5:]) for row in rows if row[5] is not None]
    return StageRead(job_id, instruction, system, status, job_status, candidates)


_JOB_RECIPE = select(Job.recipe).where(Job.id == bindparam("job_id"))


def job_recipe(executor: Executor, job_id: str) -> dict[str, Any] | None:
    """The recipe a job was submitted with, as stored."""
    recipe: dict[str, Any] | None = executor.execute(_JOB_RECIPE, {"job_id": job_id}).scalar_one_or_none()
    return recipe


_RECORD_FIELDS = tuple(GenerationRecord.__dataclass_fields__)


@cache
def _candidate_upsert(dialect: str) -> Any:
    statement = _insert(dialect, Candidate)
    return statement.on_conflict_do_update(
        index_elements=["item_id", "layer", "slot"],
        set_={key: statement.excluded[key] for key in _RECORD_FIELDS},
        where=Candidate.error.is_not(None),
    ).returning(Candidate.id)


_CANDIDATE_ID = select(Candidate.id).where(
    Candidate.item_id == bindparam("item_id"),
    Candidate.layer == bindparam("layer"),
    Candidate.slot == bindparam("slot"),
)


def record_candidate(
    executor: Executor, item_id: int, layer: int, slot: int, record: GenerationRecord
) -> int:
    """Store a slot's result and return the row id. A finished slot is never overwritten; a failed one is."""
    key = {"item_id": item_id, "layer": layer, "slot": slot}
    statement = _candidate_upsert(_dialect(executor))
    written = executor.execute(statement, {**key, **record.__dict__}).scalar_one_or_none()
    if written is not None:
        return int(written)
    # The slot was already finished (a redelivered task): keep that row and return its id.
    return int(executor.execute(_CANDIDATE_ID, key).scalar_one())


@cache
def _output_insert(dialect: str) -> Any:
    return _insert(dialect, Output).on_conflict_do_nothing(index_elements=["item_id"])


def record_output(executor: Executor, item_id: int, record: GenerationRecord, pool_size: int) -> bool:
    """Store the aggregated answer; False when the item already had one (a redelivered aggregator)."""
    assert record.text is not None
    values = {
        "item_id": item_id,
        "model": record.model,
        "text": record.text,
        "pool_size": pool_size,
        "prompt_tokens": record.prompt_tokens,
        "output_tokens": record.output_tokens,
        "latency_ms": record.latency_ms,
        "finish_reason": record.finish_reason,
    }
    result: CursorResult[Any] = executor.execute(_output_insert(_dialect(executor)), values)  # type: ignore[assignment]
    return bool(result.rowcount)


_COUNTER = {
    ItemStatus.SUCCEEDED: Job.items_succeeded,
    ItemStatus.DEGRADED: Job.items_degraded,
    ItemStatus.FAILED: Job.items_failed,
}

_FINISH_ITEM = (
    update(Item)
    .where(Item.id == bindparam("item_id"), Item.status == ItemStatus.PENDING)
    .values(
        status=bindparam("new_status"),
        error=bindparam("new_error"),
        truncation=bindparam("new_truncation", type_=JSON),
        finished_at=bindparam("now"),
    )
    .returning(Item.job_id)
)
_COUNT_ON_JOB = {
    status: update(Job)
    .where(Job.id == bindparam("job_id"))
    .values({counter: counter + 1})
    .returning(Job.total_items, Job.items_succeeded, Job.items_degraded, Job.items_failed, Job.status)
    for status, counter in _COUNTER.items()
}
_END_JOB = (
    update(Job)
    .where(Job.id == bindparam("job_id"))
    .values(status=bindparam("final"), finished_at=bindparam("now"))
)


def finish_item(
    executor: Executor,
    item_id: int,
    status: ItemStatus,
    *,
    error: str | None = None,
    truncation: list[dict[str, Any]] | None = None,
) -> bool:
    """Move a pending item to its final status and count it on the job, once; False if it was not pending.

    Run it in one transaction with the stage's other writes: the job's row is locked from the count
    to the commit.
    """
    now = utcnow()
    values = {"new_status": status, "new_error": error, "new_truncation": truncation, "now": now}
    moved = executor.execute(_FINISH_ITEM, {"item_id": item_id, **values}).scalar_one_or_none()
    if moved is None:
        return False
    total, succeeded, degraded, failed, job_status = executor.execute(
        _COUNT_ON_JOB[status], {"job_id": moved}
    ).one()
    if succeeded + degraded + failed == total and job_status not in FINAL_JOB_STATUSES:
        final = (
            JobStatus.SUCCEEDED if not failed else JobStatus.FAILED if failed == total else JobStatus.PARTIAL
        )
        executor.execute(_END_JOB, {"job_id": moved, "final": final, "now": now})
    return True


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
    counts = {status: sum(1 for _, s in rows if s == status) for status in _COUNTER}
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
            {column: column - counts[status] for status, column in _COUNTER.items()}
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
