"""Evaluating a job: match its items to reference outputs, judge each pair as a Celery task, and turn
the verdicts into a win rate with its standard error and the length-controlled win rate.

The reference is a file of AlpacaEval-style records (AlpacaEval 2.0's GPT-4-Turbo outputs by default)
or another job (`job:ID`), which makes a head-to-head of two recipes on the same prompts. Items are
matched to reference rows by instruction text.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from db import evaluations
from db.evaluations import NewJudgment
from db.models import EvaluationStatus
from db.progress import get_job
from db.results import job_outputs
from db.session import session_scope
from orchestrator.celery_app import TASK_JUDGE, app
from orchestrator.errors import EvaluationError
from orchestrator.judging import JudgeSpec, shows_model_first
from orchestrator.routing import BULK_PRIORITY
from orchestrator.winrate import fit_length_controlled, win_rate

__all__ = [
    "JOB_REFERENCE_PREFIX",
    "EvaluationStart",
    "Reference",
    "ReferenceRow",
    "enqueue_judgments",
    "finalize_evaluation",
    "load_difficulties",
    "load_reference",
    "start_evaluation",
]

JOB_REFERENCE_PREFIX = "job:"


class ReferenceRow(BaseModel):
    index: int | None
    output: str
    generator: str | None = None


class Reference(BaseModel):
    """Reference outputs keyed by instruction, and a digest that identifies their content."""

    source: str
    digest: str
    rows: dict[str, ReferenceRow]


def _key(instruction: str) -> str:
    return instruction.strip()


def _read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise EvaluationError(f"{path}: expected JSON objects with 'instruction' and 'output'")
    return records


def load_reference(reference: str, database_url: str, *, setting: str = "EVAL_REFERENCE") -> Reference:
    """Reference outputs from a file or from another job (`job:ID`); raises EvaluationError."""
    if reference.startswith(JOB_REFERENCE_PREFIX):
        job_id = reference.removeprefix(JOB_REFERENCE_PREFIX)
        rows: dict[str, ReferenceRow] = {}
        with session_scope(database_url) as session:
            job = get_job(session, job_id)
            if job is None:
                raise EvaluationError(f"reference job {job_id}: not found")
            generator = f"slimmoa-{job.recipe_name}"
            for item, output in job_outputs(session, job_id):
                if output is not None:
                    rows.setdefault(
                        _key(item.instruction),
                        ReferenceRow(index=None, output=output.text, generator=generator),
                    )
        return Reference(source=reference, digest=reference, rows=rows)
    path = Path(reference).expanduser()
    if not path.is_file():
        raise EvaluationError(
            f"reference file {path} not found: pass --reference FILE or set {setting} "
            "(AlpacaEval 2.0's GPT-4-Turbo outputs as JSONL: instruction, output, generator)"
        )
    try:
        records = _read_records(path)
        rows = {}
        for index, record in enumerate(records):
            row = ReferenceRow(index=index, output=str(record["output"]), generator=record.get("generator"))
            rows.setdefault(_key(str(record["instruction"])), row)
    except (ValueError, KeyError) as exc:
        raise EvaluationError(f"{path}: not a reference file: {type(exc).__name__}: {exc}") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Reference(source=str(path.resolve()), digest=digest, rows=rows)


def load_difficulties(path: Path | None) -> dict[int, float] | None:
    """Instruction difficulties keyed by reference row, from a CSV `index,instruction_difficulty`."""
    if path is None:
        return None
    with path.open(newline="") as handle:
        return {int(row["index"]): float(row["instruction_difficulty"]) for row in csv.DictReader(handle)}


class EvaluationStart(BaseModel):
    evaluation_id: int
    seed: int
    total: int
    to_judge: list[int]
    already_judged: int
    without_output: int
    without_reference: int


def start_evaluation(
    database_url: str, job_id: str, reference: Reference, judge: JudgeSpec, *, seed: int = 0
) -> EvaluationStart:
    """Create (or resume) the evaluation and its pending judgments in one transaction; nothing is sent."""
    with session_scope(database_url) as session:
        job = get_job(session, job_id)
        if job is None:
            raise EvaluationError(f"job {job_id}: not found")
        matched, without_output, without_reference = [], 0, 0
        for item, output in job_outputs(session, job_id):
            row = reference.rows.get(_key(item.instruction))
            if output is None:
                without_output += 1
            elif row is None:
                without_reference += 1
            else:
                matched.append((item.id, row))
        if not matched:
            raise EvaluationError(
                f"job {job_id}: no item has both an output and a reference row "
                f"({without_output} without output, {without_reference} not in {reference.source})"
            )
        evaluation = evaluations.open_evaluation(
            session,
            job_id=job_id,
            reference=reference.source,
            reference_digest=reference.digest,
            judge=judge.label,
            judge_spec={"name": judge.name, **judge.spec.model_dump(mode="json")},
            seed=seed,
        )
        # A resumed evaluation keeps the order it drew first: its own seed, not this call's.
        new = [
            NewJudgment(
                item_id=item_id,
                reference_output=row.output,
                reference_index=row.index,
                reference_generator=row.generator,
                swapped=shows_model_first(evaluation.seed, item_id),
            )
            for item_id, row in matched
        ]
        evaluations.add_judgments(session, evaluation, new)
        to_judge = evaluations.unfinished_judgments(session, evaluation.id)
        evaluations.mark_judgments_dispatched(session, to_judge)
        return EvaluationStart(
            evaluation_id=evaluation.id,
            seed=evaluation.seed,
            total=evaluation.total,
            to_judge=to_judge,
            already_judged=evaluation.total - len(to_judge),
            without_output=without_output,
            without_reference=without_reference,
        )


def enqueue_judgments(judgment_ids: list[int]) -> None:
    """Send one judge task per judgment; call only after the evaluation's transaction committed."""
    for judgment_id in judgment_ids:
        # Judging is bulk work: chat stages go first (an unmarked message would go to the top step).
        app.send_task(TASK_JUDGE, args=(judgment_id,), priority=BULK_PRIORITY)


# Output-length buckets (characters) of the comparison: AlpacaEval outputs run from a line to pages.
LENGTH_BUCKETS = (500, 1000, 2000, 4000)


def _length_bucket(chars: int) -> str:
    low = 0
    for limit in LENGTH_BUCKETS:
        if chars < limit:
            return f"{low}-{limit - 1}"
        low = limit
    return f"{low}+"


def _breakdown(groups: dict[str, list[float]], order: list[str]) -> dict[str, dict[str, float | None]]:
    """Win rate, its standard error and the count per group, groups in the given order."""
    out: dict[str, dict[str, float | None]] = {}
    for name in order:
        if name in groups:
            result = win_rate(groups[name])
            out[name] = {
                "win_rate": result.win_rate,
                "standard_error": result.standard_error,
                "n": result.n_total,
            }
    return out


def _difficulties(keys: list[int | None], known: dict[int, float] | None) -> list[float] | None:
    """The instruction difficulty of each judged row, or None unless every row has one."""
    if known is None or any(key is None or key not in known for key in keys):
        return None
    return [known[key] for key in keys if key is not None]


def finalize_evaluation(
    database_url: str, evaluation_id: int, difficulties: dict[int, float] | None = None
) -> dict[str, Any]:
    """Compute and store the metrics of an evaluation from its verdicts; returns them.

    The final status is `succeeded` when every judgment has a verdict, `partial` when some failed (the
    metrics use the others), `failed` when none has one.
    """
    with session_scope(database_url) as session:
        counts = evaluations.judgment_counts(session, evaluation_id)
        rows = evaluations.evaluation_rows(session, evaluation_id)
        preferences = [float(j.preference or 0.0) for j, _, _ in rows]
        summary: dict[str, Any] = {"judgments": counts}
        if not rows:
            status = EvaluationStatus.FAILED
        else:
            status = EvaluationStatus.PARTIAL if counts["failed"] else EvaluationStatus.SUCCEEDED
            summary.update(win_rate(preferences).as_dict())
            model_lengths = [len(o.text) for _, _, o in rows]
            reference_lengths = [len(j.reference_output) for j, _, _ in rows]
            difficulty = _difficulties([j.reference_index for j, _, _ in rows], difficulties)
            if len(rows) >= 2:
                fit = fit_length_controlled(preferences, model_lengths, reference_lengths, difficulty)
                summary.update(fit.as_dict())
            by_dataset: dict[str, list[float]] = defaultdict(list)
            by_length: dict[str, list[float]] = defaultdict(list)
            for (_, item, output), preference in zip(rows, preferences, strict=True):
                by_dataset[item.dataset or "(none)"].append(preference)
                by_length[_length_bucket(len(output.text))].append(preference)
            summary["by_dataset"] = _breakdown(by_dataset, sorted(by_dataset))
            lengths = [_length_bucket(limit - 1) for limit in LENGTH_BUCKETS] + [
                _length_bucket(LENGTH_BUCKETS[-1])
            ]
            summary["by_output_length"] = _breakdown(by_length, lengths)
        evaluations.finish_evaluation(session, evaluation_id, status=status, summary=summary)
    summary["status"] = str(status)
    return summary
