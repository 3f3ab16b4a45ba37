"""What inference workers read and write about models: the jobs whose models they may need, and the
loads and swaps they made (job statistics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    error: str | None = None


def record_engine_load(session: Session, record: EngineLoadRecord) -> None:
    """Store a load; one caused by a job that is gone (deleted meanwhile) is kept without it."""
    known = record.job_id is not None and session.get(Job, record.job_id) is not None
    session.add(EngineLoad(**(asdict(record) | {"job_id": record.job_id if known else None})))


@dataclass(frozen=True)
class LoadStats:
    """Model loads a job caused: how many, their seconds, and the evictions they needed (swaps)."""

    loads: int
    load_seconds: float
    # model -> loads of it
    per_model: dict[str, int]
    swaps: int
    unload_seconds: float
    # model -> the loader's message of its latest failed load
    failed: dict[str, str] = field(default_factory=dict)


def load_stats(session: Session, job_id: str) -> LoadStats:
    ready = EngineLoad.kind != "failed"
    rows = session.execute(
        select(
            EngineLoad.model,
            func.count(),
            func.coalesce(func.sum(EngineLoad.seconds), 0.0),
            func.coalesce(func.sum(EngineLoad.unload_seconds), 0.0),
        )
        .where(EngineLoad.job_id == job_id, ready)
        .group_by(EngineLoad.model)
    ).all()
    failures = session.execute(
        select(EngineLoad.model, EngineLoad.error)
        .where(EngineLoad.job_id == job_id, ~ready)
        .order_by(EngineLoad.created_at, EngineLoad.id)
    ).tuples()
    swaps = list(session.scalars(select(EngineLoad.evicted).where(EngineLoad.job_id == job_id, ready)))
    return LoadStats(
        loads=sum(count for _, count, _, _ in rows),
        load_seconds=float(sum(seconds for _, _, seconds, _ in rows)),
        per_model={model: count for model, count, _, _ in rows},
        swaps=sum(1 for evicted in swaps if evicted),
        unload_seconds=float(sum(unload for *_, unload in rows)),
        failed={model: error or "load failed" for model, error in failures},
    )
