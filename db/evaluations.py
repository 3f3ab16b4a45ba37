"""The reads and writes of evaluations: creating one with its pending judgments, recording verdicts.

As with the stages, every write is idempotent: a verdict is stored once per (evaluation, item), and a
resumed evaluation finds its judgments instead of making new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    FINAL_OUTPUT,
    Evaluation,
    EvaluationStatus,
    Item,
    Judgment,
    JudgmentStatus,
    Output,
    utcnow,
)
from db.rows import dialect_insert

__all__ = [
    "NewJudgment",
    "Verdict",
    "add_judgments",
    "evaluation_rows",
    "finish_evaluation",
    "get_evaluation",
    "get_judgment",
    "judgment_counts",
    "latest_judgment_error",
    "mark_judgments_dispatched",
    "open_evaluation",
    "record_judgment",
    "stalled_judgments",
    "unfinished_judgments",
]


@dataclass(frozen=True)
class NewJudgment:
    item_id: int
    reference_output: str
    swapped: bool
    reference_index: int | None = None
    reference_generator: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What a judge task stores: a preference, or an error with the preference None."""

    preference: float | None
    verdict_logprobs: dict[str, Any] | None = None
    judge_text: str | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    attempt: int = 1


def open_evaluation(
    session: Session,
    *,
    job_id: str,
    reference: str,
    reference_digest: str,
    judge: str,
    judge_spec: dict[str, Any],
    seed: int,
) -> Evaluation:
    """The evaluation of a job against a reference by a judge: found (a resumed one keeps its seed and
    every verdict it has) or created, and marked running."""
    key = {"job_id": job_id, "reference_digest": reference_digest, "judge": judge}
    evaluation = session.scalar(select(Evaluation).filter_by(**key))
    if evaluation is None:
        evaluation = Evaluation(**key, reference=reference, judge_spec=judge_spec, seed=seed, total=0)
        session.add(evaluation)
        session.flush()
    evaluation.status = EvaluationStatus.RUNNING
    evaluation.finished_at = None
    return evaluation


def add_judgments(session: Session, evaluation: Evaluation, judgments: Sequence[NewJudgment]) -> int:
    """Add a pending judgment for each item that has none yet; returns the evaluation's total."""
    if judgments:
        rows = [
            {"evaluation_id": evaluation.id, "status": JudgmentStatus.PENDING, **j.__dict__}
            for j in judgments
        ]
        statement = dialect_insert(session.get_bind().dialect.name, Judgment).values(rows)
        session.execute(statement.on_conflict_do_nothing(index_elements=["evaluation_id", "item_id"]))
    evaluation.total = (
        session.scalar(select(func.count()).where(Judgment.evaluation_id == evaluation.id)) or 0
    )
    return evaluation.total


def get_evaluation(session: Session, evaluation_id: int) -> Evaluation | None:
    return session.get(Evaluation, evaluation_id)


def get_judgment(session: Session, judgment_id: int) -> Judgment | None:
    return session.get(Judgment, judgment_id)


def unfinished_judgments(session: Session, evaluation_id: int) -> list[int]:
    """Judgments without a verdict (pending, or failed and worth another try), in item order."""
    query = (
        select(Judgment.id)
        .where(Judgment.evaluation_id == evaluation_id, Judgment.status != JudgmentStatus.DONE)
        .order_by(Judgment.item_id)
    )
    return list(session.scalars(query))


def mark_judgments_dispatched(session: Session, judgment_ids: Sequence[int]) -> None:
    """Stamp judgments whose judge tasks were just sent (the recovery sweep leaves them alone a while)."""
    if judgment_ids:
        session.execute(update(Judgment).where(Judgment.id.in_(judgment_ids)).values(dispatched_at=utcnow()))


def stalled_judgments(session: Session, quiet_since: datetime, limit: int = 10_000) -> list[int]:
    """Pending judgments of running evaluations not sent since `quiet_since`: lost with a worker or
    the broker."""
    query = (
        select(Judgment.id)
        .join(Evaluation, Evaluation.id == Judgment.evaluation_id)
        .where(
            Judgment.status == JudgmentStatus.PENDING,
            Evaluation.status == EvaluationStatus.RUNNING,
            Evaluation.created_at < quiet_since,
            or_(Judgment.dispatched_at.is_(None), Judgment.dispatched_at < quiet_since),
        )
        .order_by(Judgment.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def record_judgment(session: Session, judgment_id: int, verdict: Verdict) -> bool:
    """Store a verdict (or a failure); False when the judgment already had a verdict."""
    status = JudgmentStatus.FAILED if verdict.preference is None else JudgmentStatus.DONE
    result = session.execute(
        update(Judgment)
        .where(Judgment.id == judgment_id, Judgment.status != JudgmentStatus.DONE)
        .values(status=status, judged_at=utcnow(), **verdict.__dict__)
        .returning(Judgment.id)
    )
    return result.scalar_one_or_none() is not None


def judgment_counts(session: Session, evaluation_id: int) -> dict[str, int]:
    """How many judgments of an evaluation are pending, done and failed."""
    rows = session.execute(
        select(Judgment.status, func.count())
        .where(Judgment.evaluation_id == evaluation_id)
        .group_by(Judgment.status)
    ).all()
    counts = {str(status): 0 for status in JudgmentStatus}
    counts.update({str(status): int(count) for status, count in rows})
    return counts


def latest_judgment_error(session: Session, evaluation_id: int) -> str | None:
    """The most recent failed judgment's message."""
    return session.scalar(
        select(Judgment.error)
        .where(Judgment.evaluation_id == evaluation_id, Judgment.status == JudgmentStatus.FAILED)
        .order_by(Judgment.judged_at.desc())
        .limit(1)
    )


def evaluation_rows(session: Session, evaluation_id: int) -> list[tuple[Judgment, Item, Output]]:
    """Every judgment with a verdict, with its item and the job's output, in item order."""
    query = (
        select(Judgment, Item, Output)
        .join(Item, Item.id == Judgment.item_id)
        .join(Output, FINAL_OUTPUT)
        .where(Judgment.evaluation_id == evaluation_id, Judgment.status == JudgmentStatus.DONE)
        .order_by(Item.position)
    )
    return [(j, i, o) for j, i, o in session.execute(query)]


def finish_evaluation(
    session: Session, evaluation_id: int, *, status: EvaluationStatus, summary: dict[str, Any]
) -> None:
    """Store the metrics and the final status of an evaluation whose judgments are all final."""
    session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id)
        .values(
            status=status,
            win_rate=summary.get("win_rate"),
            standard_error=summary.get("standard_error"),
            lc_win_rate=summary.get("lc_win_rate"),
            lc_standard_error=summary.get("lc_standard_error"),
            metrics=summary,
            finished_at=utcnow(),
        )
    )
