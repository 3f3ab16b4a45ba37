"""Re-running what failed or was lost: retry of failed stages, and the recovery sweep.

A retry reopens only items with a failed stage and reuses every finished candidate: proposer tasks
find their rows and return, so only failed slots generate again. An item whose aggregator failed on
a complete pool gets the aggregator alone (a sequential one resumes at its first missing step).
"""

from __future__ import annotations

import ast
import base64
import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import redis
from pydantic import BaseModel
from sqlalchemy.orm import Session

from db import evaluations, recovery
from db.models import Job, JobStatus, utcnow
from db.progress import get_job
from db.rows import StalledItem
from db.session import session_scope
from orchestrator.canvas import aggregator_signature, item_canvas, layer_done_signature
from orchestrator.celery_app import (
    TASK_AGGREGATOR,
    TASK_JUDGE,
    TASK_LAYER_DONE,
    TASK_PROPOSER,
    TASK_RECOVER,
    app,
)
from orchestrator.contracts import RetryResult, RetryStage
from orchestrator.errors import JobNotFound, NotRetryable
from orchestrator.recipes import Recipe
from orchestrator.routing import BULK_PRIORITY, stage_priority
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)

__all__ = [
    "SweepResult",
    "recover",
    "retry_job",
    "sweep",
]


def retry_job(
    session: Session,
    job_id: str,
    *,
    stage: RetryStage = RetryStage.ALL,
    item_ids: Sequence[int] | None = None,
) -> RetryResult:
    """Reopen the items with failed stages, commit, and enqueue exactly those stages."""
    job = get_job(session, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id!r} not found")
    if job.status == JobStatus.CANCELLED:
        raise NotRetryable(f"job {job_id} was cancelled")
    if item_ids is not None:
        known = set(recovery.item_ids(session, job_id))
        unknown = sorted(set(item_ids) - known)
        if unknown:
            raise NotRetryable(f"items {unknown} are not items of job {job_id}")
    plan = recovery.failed_stage_items(session, job_id, item_ids)
    canvas = plan.canvas if stage != RetryStage.AGGREGATOR else {}
    aggregator = plan.aggregator_only if stage != RetryStage.PROPOSERS else {}
    reopened = recovery.reopen_items(session, job_id, canvas, pool_reruns=True)
    reopened += recovery.reopen_items(session, job_id, aggregator)
    recovery.mark_items_dispatched(session, [*canvas, *aggregator])
    recipe = Recipe.model_validate(job.recipe)
    priority = stage_priority(job.kind, job.priority)
    session.commit()
    for item_id, turn in canvas.items():
        item_canvas(item_id, recipe, job_id=job_id, turn=turn, priority=priority).apply_async()
    for item_id, turn in aggregator.items():
        aggregator_signature(item_id, recipe, job_id=job_id, turn=turn, priority=priority).apply_async()
    return RetryResult(
        job_id=job_id,
        items_reopened=reopened,
        proposer_items=list(canvas),
        aggregator_items=list(aggregator),
    )


# What a stage task is, for matching the database against the broker:
# (task name, item, turn, layer, slot), -1 where the task has no such argument.
StageKey = tuple[str, int, int, int, int]
# How many arguments each stage task takes: with its turn, and as sent before items had turns.
_ARITY = {TASK_JUDGE: (1, 1), TASK_PROPOSER: (4, 3), TASK_LAYER_DONE: (3, 2), TASK_AGGREGATOR: (2, 1)}


def _stage_key(name: str, args: Sequence[Any]) -> StageKey | None:
    if name not in _ARITY or len(args) not in _ARITY[name]:
        return None
    numbers = [int(arg) for arg in args]
    turn = numbers[-1] if name != TASK_JUDGE and len(args) == _ARITY[name][0] else 0
    if name == TASK_JUDGE:
        return (name, numbers[0], -1, -1, -1)
    if name == TASK_AGGREGATOR:
        return (name, numbers[0], turn, -1, -1)
    if name == TASK_LAYER_DONE:
        return (name, numbers[0], turn, numbers[1], -1)
    return (name, numbers[0], turn, numbers[1], numbers[2])


def _queued_stages(redis_url: str, queues: Sequence[str]) -> set[StageKey]:
    """Stage tasks waiting in the broker's queues (every priority list of each queue)."""
    client = redis.Redis.from_url(redis_url)
    found: set[StageKey] = set()
    for queue in queues:
        for key in client.scan_iter(match=f"{queue}*"):
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                body = message.get("body", "")
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                args = json.loads(body)[0]
                stage = _stage_key(message.get("headers", {}).get("task", ""), args)
                if stage is not None:
                    found.add(stage)
    return found


def _running_stages() -> set[StageKey]:
    """Stage tasks that live workers are running or hold reserved."""
    inspector = app.control.inspect(timeout=2.0)
    found: set[StageKey] = set()
    for report in (inspector.active() or {}, inspector.reserved() or {}):
        for tasks in report.values():
            for task in tasks:
                args = task.get("args") or []
                if isinstance(args, str):  # older workers report a repr
                    args = ast.literal_eval(args)
                stage = _stage_key(task.get("name", ""), args)
                if stage is not None:
                    found.add(stage)
    return found


class SweepResult(BaseModel):
    items_checked: int
    proposer_chords: int
    layer_checks: int
    aggregators: int
    skipped_in_flight: int
    judgments: int = 0


def _next_stage(item: StalledItem, recipe: Recipe) -> list[StageKey]:
    """The stage tasks an item waits for, from its rows: at the first turn without an output, the
    missing slots, or the body."""
    last = len(recipe.layers) - 1
    turn = item.turn
    rows = {(layer, slot) for row_turn, layer, slot in item.rows if row_turn == turn}
    for layer in range(last + 1):
        missing = [s.slot for s in recipe.slots(layer) if (layer, s.slot) not in rows]
        if missing:
            return [(TASK_PROPOSER, item.item_id, turn, layer, slot) for slot in missing]
        next_layer_started = any(row_layer == layer + 1 for row_layer, _ in rows)
        if layer < last and not next_layer_started:
            return [(TASK_LAYER_DONE, item.item_id, turn, layer, -1)]
    return [(TASK_AGGREGATOR, item.item_id, turn, -1, -1)]


def sweep(database_url: str, *, grace_s: float | None = None) -> SweepResult:
    """Re-enqueue the stages of stalled items that are neither done nor queued nor running.

    Safe at any time, any number of times, concurrently: stage writes are idempotent, so a stage
    sent twice stores one row. Items with activity in the last `grace_s` seconds are left alone.
    """
    settings = get_settings()
    grace = settings.recovery_grace_s if grace_s is None else grace_s
    quiet_since = utcnow() - timedelta(seconds=grace)
    with session_scope(database_url) as session:
        stalled = recovery.stalled_items(session, quiet_since)
        jobs = {job_id: session.get_one(Job, job_id) for job_id in {item.job_id for item in stalled}}
        recipes = {job_id: Recipe.model_validate(job.recipe) for job_id, job in jobs.items()}
        priorities = {job_id: stage_priority(job.kind, job.priority) for job_id, job in jobs.items()}
        judgments = evaluations.stalled_judgments(session, quiet_since)
    result = SweepResult(
        items_checked=len(stalled), proposer_chords=0, layer_checks=0, aggregators=0, skipped_in_flight=0
    )
    if not stalled and not judgments:
        return result
    in_flight = _queued_stages(settings.redis_url, [settings.queue_control, settings.queue_inference])
    in_flight |= _running_stages()
    result.judgments = _resend_judgments(database_url, judgments, in_flight)
    sent: list[int] = []
    for item in stalled:
        recipe = recipes[item.job_id]
        due = _next_stage(item, recipe)
        if all(stage in in_flight for stage in due):
            result.skipped_in_flight += 1
            continue
        name, item_id, turn, layer, _ = due[0]
        job_id, priority = item.job_id, priorities[item.job_id]
        if name == TASK_PROPOSER:
            # Every missing slot goes into the new chord, even one still queued: the body must not
            # fire before all of them are stored. A duplicate finds its row and returns.
            slots = [slot for *_, slot in due]
            canvas = item_canvas(item_id, recipe, layer, slots, job_id=job_id, turn=turn, priority=priority)
            canvas.apply_async(add_to_parent=False)  # as in dispatch: no trail of a sweep's chords
            result.proposer_chords += 1
        elif name == TASK_LAYER_DONE:
            layer_done_signature(item_id, layer, job_id=job_id, turn=turn, priority=priority).apply_async()
            result.layer_checks += 1
        else:
            aggregator_signature(item_id, recipe, job_id=job_id, turn=turn, priority=priority).apply_async()
            result.aggregators += 1
        sent.append(item_id)
    with session_scope(database_url) as session:
        recovery.mark_items_dispatched(session, sent)
        for job_id in {item.job_id for item in stalled}:
            recovery.mark_job_running(session, job_id)
    log.info("recovery sweep: %s", result)
    return result


def _resend_judgments(database_url: str, judgments: list[int], in_flight: set[StageKey]) -> int:
    """Send again the judge tasks of pending judgments that are neither queued nor running."""
    lost = [j for j in judgments if (TASK_JUDGE, j, -1, -1, -1) not in in_flight]
    for judgment_id in lost:
        app.send_task(TASK_JUDGE, args=(judgment_id,), priority=BULK_PRIORITY)
    with session_scope(database_url) as session:
        evaluations.mark_judgments_dispatched(session, lost)
    return len(lost)


@app.task(name=TASK_RECOVER, acks_late=True)
def recover() -> dict[str, int]:
    """The periodic sweep (celery beat); the same as `slimmoa recover`."""
    return sweep(get_settings().database_url).model_dump()
