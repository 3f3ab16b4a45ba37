"""Plain row types that cross module boundaries in `db`: what callers hand in and what queries hand back.

Kept apart from the SQLAlchemy models so that stage statements, submission and recovery share them
without importing each other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

__all__ = [
    "GenerationRecord",
    "JobCounts",
    "NewItem",
    "RetryPlan",
    "StalledItem",
    "dialect_insert",
    "steps_layer",
    "waiting_turn",
]


@dataclass(frozen=True)
class NewItem:
    instruction: str
    external_id: str | None = None
    dataset: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] | None = None
    turns: list[str] | None = None


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
    """Progress of a job per stage: items by status, candidate rows per turn and layer, tokens generated."""

    items: dict[str, int]
    # (turn, layer) -> (finished candidates, failed candidates)
    candidates: dict[tuple[int, int], tuple[int, int]]
    # Items with their final output (their last turn's).
    outputs: int
    prompt_tokens: int
    output_tokens: int
    # The most recent failure recorded on a candidate or a failed item, as stored.
    latest_error: str | None = None
    # turn -> aggregated answers stored for it, and items that have the turn (all have turn 0).
    answers: dict[int, int] = field(default_factory=dict)
    items_per_turn: dict[int, int] = field(default_factory=dict)
    # turn -> intermediate steps stored by sequential aggregators (not proposer candidates).
    steps: dict[int, int] = field(default_factory=dict)
    # The tokens of the proposers' candidates and of the sequential aggregators' steps, apart.
    proposer_prompt_tokens: int = 0
    proposer_output_tokens: int = 0
    step_prompt_tokens: int = 0
    step_output_tokens: int = 0


@dataclass(frozen=True)
class StalledItem:
    item_id: int
    job_id: str
    # (turn, layer, slot) of every candidate row the item has, finished or failed.
    rows: frozenset[tuple[int, int, int]]
    # The turns that have their aggregated output, and the item's last turn.
    answered: frozenset[int] = frozenset()
    last_turn: int = 0

    @property
    def turn(self) -> int:
        """The turn the item is at: its first turn without an output."""
        return waiting_turn(self.answered, self.last_turn)


@dataclass(frozen=True)
class RetryPlan:
    """Which items a retry re-runs, and from where (item id -> turn): the turn's whole canvas, or its
    aggregator alone."""

    canvas: dict[int, int]
    aggregator_only: dict[int, int]


def waiting_turn(answered: Collection[int], last_turn: int) -> int:
    """The turn an item is at: its first turn without an output (the last when all have one)."""
    return next((turn for turn in range(last_turn + 1) if turn not in answered), last_turn)


def steps_layer(recipe: Mapping[str, Any]) -> int:
    """The layer a stored recipe's sequential aggregator keeps its intermediate steps under: the one
    after its last proposer layer (slot = step). Those rows are the aggregator's, not candidates."""
    return len(recipe["layers"])


def dialect_insert(dialect: str, table: Any) -> Any:
    """An INSERT with ON CONFLICT support for the dialect (Postgres, or SQLite embedded)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
