"""Plain row types that cross module boundaries in `db`: what callers hand in and what queries hand back.

Kept apart from the SQLAlchemy models so that stage statements, submission and recovery share them
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

__all__ = ["GenerationRecord", "JobCounts", "NewItem", "RetryPlan", "StalledItem", "dialect_insert"]


@dataclass(frozen=True)
class NewItem:
    instruction: str
    external_id: str | None = None
    dataset: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] | None = None


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
    # When the engine was handed the request; None when the attempt failed before (at the load).
    started_at: datetime | None = None


@dataclass(frozen=True)
class JobCounts:
    """Progress of a job per stage: items by status, candidate rows per layer, tokens generated."""

    items: dict[str, int]
    # layer -> (finished candidates, failed candidates)
    candidates: dict[int, tuple[int, int]]
    outputs: int
    prompt_tokens: int
    output_tokens: int
    # The most recent failure recorded on a candidate or a failed item, as stored.
    latest_error: str | None = None


@dataclass(frozen=True)
class StalledItem:
    item_id: int
    job_id: str
    # (layer, slot) of every candidate row the item has, finished or failed.
    rows: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class RetryPlan:
    """Which items a retry re-runs, and from where: the whole canvas or the aggregator alone."""

    canvas: list[int]
    aggregator_only: list[int]


def dialect_insert(dialect: str, table: Any) -> Any:
    """An INSERT with ON CONFLICT support for the dialect (Postgres, or SQLite embedded)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
