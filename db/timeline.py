"""What a job's timeline is drawn from: its generations (start and end of every candidate and output)
and the loads, wakes and evictions its stages caused, as recorded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Candidate, EngineLoad, Item, Job, Output
from db.rows import steps_layer

__all__ = ["GenerationRow", "JobTimelineRows", "LoadRow", "job_timeline_rows"]


@dataclass(frozen=True)
class GenerationRow:
    """One stored generation: `layer` is None for the aggregator's (its output, or a step of a
    sequential aggregation)."""

    model: str
    layer: int | None
    started_at: datetime
    finished_at: datetime
    output_tokens: int
    ok: bool


@dataclass(frozen=True)
class LoadRow:
    """A load, wake or failed load as recorded when it ended, and the models it evicted before it."""

    model: str
    kind: str
    seconds: float
    unload_seconds: float
    evicted: list[str]
    recorded_at: datetime


@dataclass(frozen=True)
class JobTimelineRows:
    job_id: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    generations: list[GenerationRow]
    loads: list[LoadRow]
    # Rows without a start time: failed before reaching an engine, or stored before start times were.
    untimed: int


def _aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def job_timeline_rows(session: Session, job_id: str) -> JobTimelineRows | None:
    """Every generation and load of a job, in three queries; None when there is no such job."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    candidates = session.execute(
        select(
            Candidate.model,
            Candidate.layer,
            Candidate.started_at,
            Candidate.created_at,
            Candidate.output_tokens,
            Candidate.error,
        )
        .join(Item, Item.id == Candidate.item_id)
        .where(Item.job_id == job_id)
    ).tuples()
    outputs = session.execute(
        select(Output.model, Output.started_at, Output.created_at, Output.output_tokens)
        .join(Item, Item.id == Output.item_id)
        .where(Item.job_id == job_id)
    ).tuples()
    step_layer = steps_layer(job.recipe)
    rows: list[tuple[str, int | None, datetime | None, datetime, int | None, bool]] = [
        (model, None if layer == step_layer else layer, start, end, tokens, error is None)
        for model, layer, start, end, tokens, error in candidates
    ]
    rows += [(model, None, start, end, tokens, True) for model, start, end, tokens in outputs]
    generations = [
        GenerationRow(model, layer, _aware(start), _aware(end), tokens or 0, ok)
        for model, layer, start, end, tokens, ok in rows
        if start is not None
    ]
    loads = session.execute(
        select(
            EngineLoad.model,
            EngineLoad.kind,
            EngineLoad.seconds,
            EngineLoad.unload_seconds,
            EngineLoad.evicted,
            EngineLoad.created_at,
        )
        .where(EngineLoad.job_id == job_id)
        .order_by(EngineLoad.created_at, EngineLoad.id)
    ).tuples()
    return JobTimelineRows(
        job_id=job.id,
        status=job.status,
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at) if job.started_at else None,
        finished_at=_aware(job.finished_at) if job.finished_at else None,
        generations=sorted(generations, key=lambda g: g.started_at),
        loads=[
            LoadRow(model, kind, seconds, unload, list(evicted), _aware(at))
            for model, kind, seconds, unload, evicted, at in loads
        ],
        untimed=len(rows) - len(generations),
    )
