"""Reading jobs and items as users follow them: lookups, pages, per-stage counts, and cancel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import FINAL_JOB_STATUSES, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow
from db.rows import JobCounts, steps_layer

__all__ = [
    "cancel_job",
    "count_rows",
    "get_item",
    "get_job",
    "job_counts",
    "latest_error",
    "list_items",
    "list_jobs",
]


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def get_item(session: Session, item_id: int) -> Item | None:
    return session.get(Item, item_id)


def list_jobs(
    session: Session, *, status: str | None, offset: int, limit: int, kind: str | None = None
) -> tuple[list[Job], int]:
    """One page of jobs (of a status, of a kind), newest first, and how many match in all."""
    where = ([Job.status == status] if status else []) + ([Job.kind == kind] if kind else [])
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


def job_counts(session: Session, job_id: str) -> JobCounts:
    """Count a job's rows per stage and status with a few aggregate queries (and find the latest
    failure when there is one). A sequential aggregator's steps are counted apart from the proposers'
    candidates; their tokens count in the job's totals and, apart, in the steps' own."""
    items = dict(
        session.execute(select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status))
        .tuples()
        .all()
    )
    failed = Candidate.error.is_not(None)
    layers: Sequence[Any] = session.execute(
        select(
            Candidate.turn,
            Candidate.layer,
            func.count().filter(~failed),
            func.count().filter(failed),
            func.coalesce(func.sum(Candidate.prompt_tokens), 0),
            func.coalesce(func.sum(Candidate.output_tokens), 0),
        )
        .join(Item)
        .where(Item.job_id == job_id)
        .group_by(Candidate.turn, Candidate.layer)
    ).all()
    failures = sum(row[3] for row in layers)
    recipe = session.scalar(select(Job.recipe).where(Job.id == job_id))
    step_layer = steps_layer(recipe) if recipe is not None else None
    answers: Sequence[Any] = session.execute(
        select(
            Output.turn,
            func.count(),
            func.count().filter(Output.turn == Item.last_turn),
            func.coalesce(func.sum(Output.prompt_tokens), 0),
            func.coalesce(func.sum(Output.output_tokens), 0),
        )
        .join(Item)
        .where(Item.job_id == job_id)
        .group_by(Output.turn)
    ).all()
    # How many items have each turn: one-turn items have only turn 0.
    reaching: dict[int, int] = {}
    for last_turn, count in session.execute(
        select(Item.last_turn, func.count()).where(Item.job_id == job_id).group_by(Item.last_turn)
    ).tuples():
        for turn in range(last_turn + 1):
            reaching[turn] = reaching.get(turn, 0) + count
    return JobCounts(
        items=items,
        candidates={(turn, layer): (ok, bad) for turn, layer, ok, bad, _, _ in layers if layer != step_layer},
        outputs=sum(row[2] for row in answers),
        prompt_tokens=sum(row[3] for row in answers) + sum(row[4] for row in layers),
        output_tokens=sum(row[4] for row in answers) + sum(row[5] for row in layers),
        latest_error=latest_error(session, job_id) if items.get(ItemStatus.FAILED) or failures else None,
        answers={turn: count for turn, count, *_ in answers},
        items_per_turn=reaching,
        steps={turn: ok for turn, layer, ok, *_ in layers if layer == step_layer},
        proposer_prompt_tokens=sum(row[4] for row in layers if row[1] != step_layer),
        proposer_output_tokens=sum(row[5] for row in layers if row[1] != step_layer),
        step_prompt_tokens=sum(row[4] for row in layers if row[1] == step_layer),
        step_output_tokens=sum(row[5] for row in layers if row[1] == step_layer),
    )


def latest_error(session: Session, job_id: str) -> str | None:
    """The most recent failure of a job's stages: a failed candidate's or a failed item's message."""
    candidate = session.execute(
        select(Candidate.error, Candidate.created_at)
        .join(Item)
        .where(Item.job_id == job_id, Candidate.error.is_not(None))
        .order_by(Candidate.created_at.desc())
        .limit(1)
    ).first()
    item = session.execute(
        select(Item.error, Item.finished_at)
        .where(Item.job_id == job_id, Item.status == ItemStatus.FAILED)
        .order_by(Item.finished_at.desc())
        .limit(1)
    ).first()
    found = [(when, error) for error, when in (candidate or (None, None), item or (None, None)) if when]
    return max(found, key=lambda pair: pair[0])[1] if found else None


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
