"""What dispatch, retry and the recovery sweep read and write: which items wait, and reopening failed ones.

Finished candidates are never touched here: a re-run stage finds its row and returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, selectinload

from db.models import ITEM_COUNTERS, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow
from db.rows import RetryPlan, StalledItem, steps_layer, waiting_turn

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


def mark_job_running(session: Session, job_id: str) -> bool:
    """A queued job starts running; False if it was not queued (another dispatch or the sweep came first)."""
    started = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=utcnow())
        .returning(Job.id)
    )
    return started.first() is not None


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
        select(Item.id, Item.job_id, Item.last_turn)
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
    rows: dict[int, set[tuple[int, int, int]]] = {item_id: set() for item_id, *_ in items}
    answered: dict[int, set[int]] = {item_id: set() for item_id, *_ in items}
    if rows:
        found = session.execute(
            select(Candidate.item_id, Candidate.turn, Candidate.layer, Candidate.slot).where(
                Candidate.item_id.in_(rows)
            )
        )
        for item_id, turn, layer, slot in found:
            rows[item_id].add((turn, layer, slot))
        # Only multi-turn items have outputs while pending: the earlier turns' answers.
        multi_turn = [item_id for item_id, _, last_turn in items if last_turn > 0]
        for item_id, turn in session.execute(
            select(Output.item_id, Output.turn).where(Output.item_id.in_(multi_turn))
        ):
            answered[item_id].add(turn)
    return [
        StalledItem(item_id, job_id, frozenset(rows[item_id]), frozenset(answered[item_id]), last_turn)
        for item_id, job_id, last_turn in items
    ]


def reopen_items(
    session: Session, job_id: str, from_turns: Mapping[int, int], *, pool_reruns: bool = False
) -> int:
    """Move finished items back to pending at a turn (item id -> turn) and uncount them on the job;
    returns how many moved.

    The outputs of that turn and later ones are dropped, and so are the candidates of later turns:
    they answered a conversation that the re-run turn changes. The turn's own finished candidates
    are kept: the re-run stages find them and return without generating. With `pool_reruns` (the
    turn's failed candidates generate again) the turn's sequential aggregation steps are dropped too:
    they read the old pool. Otherwise they are kept, and the aggregator resumes at the missing step.
    """
    if not from_turns:
        return 0
    rows = session.execute(
        select(Item.id, Item.status).where(
            Item.job_id == job_id, Item.id.in_(list(from_turns)), Item.status != ItemStatus.PENDING
        )
    ).all()
    if not rows:
        return 0
    counts = {status: sum(1 for _, s in rows if s == status) for status in ITEM_COUNTERS}
    ids = [item_id for item_id, _ in rows]
    for turn in {from_turns[item_id] for item_id in ids}:
        at_turn = [item_id for item_id in ids if from_turns[item_id] == turn]
        session.execute(delete(Output).where(Output.item_id.in_(at_turn), Output.turn >= turn))
        session.execute(delete(Candidate).where(Candidate.item_id.in_(at_turn), Candidate.turn > turn))
        if pool_reruns:
            step_layer = steps_layer(session.get_one(Job, job_id).recipe)
            steps = (Candidate.turn == turn, Candidate.layer == step_layer)
            session.execute(delete(Candidate).where(Candidate.item_id.in_(at_turn), *steps))
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
    """Items with a failed stage: failed or degraded items, each from the first turn that needs work,
    split by whether that turn's pool needs work.

    A turn with a failed candidate re-runs its canvas (its pool was short); an item whose pools are
    complete and whose aggregator failed needs that turn's aggregator only, so its candidates are
    never regenerated.
    """
    query = (
        select(Item)
        .where(Item.job_id == job_id, Item.status.in_([ItemStatus.FAILED, ItemStatus.DEGRADED]))
        .options(selectinload(Item.candidates), selectinload(Item.outputs))
    )
    if item_ids is not None:
        query = query.where(Item.id.in_(item_ids))
    canvas: dict[int, int] = {}
    aggregator_only: dict[int, int] = {}
    for item in session.scalars(query):
        failed_turns = [c.turn for c in item.candidates if not c.ok]
        answered = {output.turn for output in item.outputs}
        waiting = waiting_turn(answered, item.last_turn)
        if failed_turns:
            canvas[item.id] = min(failed_turns)
        elif any(c.turn == waiting for c in item.candidates):
            aggregator_only[item.id] = waiting
        else:
            canvas[item.id] = waiting
    return RetryPlan(canvas=canvas, aggregator_only=aggregator_only)
