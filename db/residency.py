"""What inference workers read and write about models: the jobs whose models they may need, and the
loads and swaps they made (job statistics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import EngineLoad, Job, JobStatus

__all__ = ["EngineLoadRecord", "LoadStats", "active_jobs", "load_stats", "record_engine_load"]


def active_jobs(session: Session) -> list[tuple[str, dict[str, Any]]]:
    """(id, recipe) of the jobs that may still have stages to run."""
    rows = session.execute(
        select(Job.id, Job.recipe).where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
    )
    return [(job_id, recipe) for job_id, recipe in rows.tuples()]


@dataclass(frozen=True)
class EngineLoadRecord:
    job_id: str | None
    model: str
    kind: str
    seconds: float
    worker: str
    evicted: list[str] = field(default_factory=list)
    unload_seconds: float = 0.0


def record_engine_load(session: Session, record: EngineLoadRecord) -> None:
    known = record.job_id is not None and session.get(Job, record.job_id) is not None
    session.add(
        EngineLoad(
            job_id=record.job_id if known else None,
            model=record.model,
            kind=record.kind,
            seconds=record.seconds,
            evicted=record.evicted,
            unload_seconds=record.unload_seconds,
            worker=record.worker,
        )
    )


@dataclass(frozen=True)
class LoadStats:
    """Model loads a job caused: how many, their seconds, and the evictions they needed (swaps)."""

    loads: int
    load_seconds: float
    # model -> loads of it
    per_model: dict[str, int]
    swaps: int
    unload_seconds: float


def load_stats(session: Session, job_id: str) -> LoadStats:
    rows = session.execute(
        select(
            EngineLoad.model,
            func.count(),
            func.coalesce(func.sum(EngineLoad.seconds), 0.0),
            func.coalesce(func.sum(EngineLoad.unload_seconds), 0.0),
        )
        .where(EngineLoad.job_id == job_id)
        .group_by(EngineLoad.model)
    ).all()
    swaps = [
        evicted for evicted in session.scalars(select(EngineLoad.evicted).where(EngineLoad.job_id == job_id))
    ]
    return LoadStats(
        loads=sum(count for _, count, _, _ in rows),
        load_seconds=float(sum(seconds for _, _, seconds, _ in rows)),
        per_model={model: count for model, count, _, _ in rows},
        swaps=sum(1 for evicted in swaps if evicted),
        unload_seconds=float(sum(unload for *_, unload in rows)),
    )
