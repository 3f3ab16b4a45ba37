"""SQLAlchemy 2.0 typed models: jobs, items, candidate pools, aggregated outputs, evaluations."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "FINAL_JOB_STATUSES",
    "FINAL_OUTPUT",
    "ITEM_COUNTERS",
    "Base",
    "Candidate",
    "EngineLoad",
    "Evaluation",
    "EvaluationStatus",
    "Item",
    "ItemStatus",
    "Job",
    "JobKind",
    "JobStatus",
    "Judgment",
    "JudgmentStatus",
    "Output",
    "utcnow",
]

# SQLite only autoincrements INTEGER PRIMARY KEY; Postgres gets a BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _new_job_id() -> str:
    return uuid.uuid4().hex


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every item has an output (some may be degraded)
    PARTIAL = "partial"  # some items failed
    FAILED = "failed"  # every item failed
    CANCELLED = "cancelled"


class JobKind(enum.StrEnum):
    BULK = "bulk"  # submitted as a job: a file, a list of items
    CHAT = "chat"  # one chat completion request (`POST /v1/chat/completions`), answered as it streams


class ItemStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DEGRADED = "degraded"  # aggregated from fewer candidates than the recipe asks for
    FAILED = "failed"


class EvaluationStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every judgment has a verdict
    PARTIAL = "partial"  # some judgments failed; the metrics use the others
    FAILED = "failed"  # no judgment has a verdict


class JudgmentStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


FINAL_JOB_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED}
)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_job_id)
    name: Mapped[str | None] = mapped_column(String(200))
    recipe_name: Mapped[str] = mapped_column(String(200))
    # The full recipe as submitted: stages read it from here, so later edits to YAML files don't leak in.
    recipe: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.BULK, server_default=JobKind.BULK.value)
    # A client-chosen key: a retried submit with the same key returns this job instead of a new one.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the submitted request: the same key with another request is refused, not answered
    # with this job.
    idempotency_digest: Mapped[str | None] = mapped_column(String(64))
    # 0 (lowest) to 9: orders the job's stages against other bulk jobs' (chat requests come first).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_items: Mapped[int] = mapped_column(Integer)
    items_succeeded: Mapped[int] = mapped_column(Integer, default=0)
    items_degraded: Mapped[int] = mapped_column(Integer, default=0)
    items_failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    items: Mapped[list[Item]] = relationship(back_populates="job", order_by="Item.position")

    @property
    def items_done(self) -> int:
        return self.items_succeeded + self.items_degraded + self.items_failed


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("job_id", "position", name="uq_items_job_position"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    external_id: Mapped[str | None] = mapped_column(String(200))
    dataset: Mapped[str | None] = mapped_column(String(200))
    instruction: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text)
    # A chat record's whole conversation ([{role, content}], ending with `instruction` as the user's
    # turn); None for a one-turn prompt (instruction and system alone).
    messages: Mapped[list[Any] | None]
    # The user turns of a multi-turn record (MT-Bench's `turns`), answered one MoA round each, every
    # round seeing the answers to the turns before it; None for a one-turn prompt. `instruction` is
    # the last turn (the one the item's output answers).
    turns: Mapped[list[Any] | None]
    # The item's answer is the output of this turn: 0 for a one-turn prompt, len(turns) - 1 otherwise.
    last_turn: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    # One TruncationRecord per stage whose pool had to be cut to fit the model's context.
    truncation: Mapped[list[Any] | None]
    # When a canvas was last sent for the item (dispatch, retry, recovery): the sweep leaves items
    # with recent activity alone, so it does not re-send what is merely queued.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="items")
    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="item", order_by="(Candidate.turn, Candidate.layer, Candidate.slot)"
    )
    # Every turn's aggregated answer, in turn order (one for a one-turn prompt).
    outputs: Mapped[list[Output]] = relationship(back_populates="item", order_by="Output.turn")
    # The item's answer: its last turn's output.
    output: Mapped[Output | None] = relationship(
        primaryjoin="and_(Item.id == foreign(Output.item_id), Output.turn == Item.last_turn)",
        viewonly=True,
        uselist=False,
    )


class Candidate(Base):
    """One proposer generation. Unique on (item, turn, layer, slot): a redelivered task cannot add
    a second."""

    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("item_id", "turn", "layer", "slot", name="uq_candidates_item_turn_layer_slot"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    # The user turn this candidate answers (0 for a one-turn prompt).
    turn: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    layer: Mapped[int] = mapped_column(Integer)
    slot: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    text: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # Set when the slot failed after its retries; the text is then NULL.
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # The Celery node that ran the stage (`name@host`): which host served the model.
    worker: Mapped[str | None] = mapped_column(String(200))
    # When the engine was handed the request (after any load); `created_at` is when the row was stored.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    item: Mapped[Item] = relationship(back_populates="candidates")

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class Output(Base):
    """The aggregated answer to one turn of an item; at most one per (item, turn)."""

    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("item_id", "turn", name="uq_outputs_item_turn"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    model: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    pool_size: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # The Celery node that ran the aggregator.
    worker: Mapped[str | None] = mapped_column(String(200))
    # When the engine was handed the request (after any load); `created_at` is when the row was stored.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    item: Mapped[Item] = relationship(back_populates="outputs")


class Evaluation(Base):
    """Pairwise judging of a job's outputs against reference outputs (a file, or another job's outputs).

    One per (job, reference, judge): running `eval` again resumes it instead of starting over.
    """

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("job_id", "reference_digest", "judge", name="uq_evaluations_job_reference_judge"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # A file path, or `job:ID` for a head-to-head against another job's outputs.
    reference: Mapped[str] = mapped_column(String(1000))
    reference_digest: Mapped[str] = mapped_column(String(64))
    judge: Mapped[str] = mapped_column(String(500))
    # The judge's model spec as resolved when the evaluation started (engine, endpoint or weights).
    judge_spec: Mapped[dict[str, Any]]
    # Seeds each item's choice of which output the judge sees first.
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=EvaluationStatus.RUNNING)
    total: Mapped[int] = mapped_column(Integer)
    win_rate: Mapped[float | None] = mapped_column(Float)
    standard_error: Mapped[float | None] = mapped_column(Float)
    lc_win_rate: Mapped[float | None] = mapped_column(Float)
    lc_standard_error: Mapped[float | None] = mapped_column(Float)
    # Everything else the metrics report: counts, the GLM's weights, per-subset win rates.
    metrics: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    judgments: Mapped[list[Judgment]] = relationship(back_populates="evaluation", order_by="Judgment.id")


class Judgment(Base):
    """The judge's verdict on one item: unique per (evaluation, item), so a resumed eval never re-judges."""

    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("evaluation_id", "item_id", name="uq_judgments_evaluation_item"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    # Row of the reference file (the key of AlpacaEval's instruction difficulty); None for a job reference.
    reference_index: Mapped[int | None] = mapped_column(Integer)
    reference_output: Mapped[str] = mapped_column(Text)
    reference_generator: Mapped[str | None] = mapped_column(String(200))
    # True when the job's output was shown first (the order is drawn per item to cancel position bias).
    swapped: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16), default=JudgmentStatus.PENDING, index=True)
    # Probability that the job's output is the better one, from the verdict tokens' logprobs.
    preference: Mapped[float | None] = mapped_column(Float)
    verdict_logprobs: Mapped[dict[str, Any] | None]
    judge_text: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    judged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the judge task was last sent: the recovery sweep leaves recently sent judgments alone.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    evaluation: Mapped[Evaluation] = relationship(back_populates="judgments")
    item: Mapped[Item] = relationship()


class EngineLoad(Base):
    """A model made ready on a worker (a cold load or a wake), and the models it evicted to fit.

    Counted per job: a job whose models do not all fit pays about one load per model per layer.
    """

    __tablename__ = "engine_loads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The job whose stage needed the model; None when the job is unknown (deleted since).
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(8))  # "load", "wake" or "failed"
    seconds: Mapped[float] = mapped_column(Float)
    evicted: Mapped[list[Any]]
    unload_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    worker: Mapped[str] = mapped_column(String(200))
    # Why a `failed` load failed (the loader's message).
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# Joins an item to its answer: the output of its last turn.
FINAL_OUTPUT = and_(Output.item_id == Item.id, Output.turn == Item.last_turn)

# The job's counter of each final item status.
ITEM_COUNTERS = {
    ItemStatus.SUCCEEDED: Job.items_succeeded,
    ItemStatus.DEGRADED: Job.items_degraded,
    ItemStatus.FAILED: Job.items_failed,
}
