"""The proposer and aggregator stage tasks.

Both take ids, re-read their rows and return early when their work is already stored, so a
redelivered or duplicated task changes nothing. The aggregator reads the pool from the database,
not from the chord's result list: the database is the system of record.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from dataclasses import asdict
from typing import Any

from celery import Task
from celery.signals import worker_shutdown

from db import residency, stages
from db.models import ItemStatus
from db.queries import GenerationRecord
from db.session import session_scope, statement_scope
from orchestrator.celery_app import DATABASE_RETRY, TASK_AGGREGATOR, TASK_PROPOSER, app
from orchestrator.jobs import job_recipe
from orchestrator.prompts import PromptTooLong, build_stage_prompt
from orchestrator.recipes import Recipe, SamplingSpec
from orchestrator.settings import get_settings
from workers.engine_host import EngineHost, LoadEvent
from workers.engines import ChatRequest, EngineError, EngineUnavailable, Generation
from workers.metrics import STAGES

__all__ = ["run_aggregator", "run_proposer"]

log = logging.getLogger(__name__)

_host: EngineHost | None = None
_host_lock = threading.Lock()


def engine_host() -> EngineHost:
    """The process's engine host, created by the first task that needs an engine."""
    global _host
    with _host_lock:
        if _host is None:
            settings = get_settings()
            _host = EngineHost(settings, budget_gb=settings.worker_memory_gb, on_load=_record_load)
        return _host


def _record_load(event: LoadEvent) -> None:
    """Loads and swaps are job statistics: a job whose models do not fit pays for them."""
    with session_scope(get_settings().database_url) as session:
        record = residency.EngineLoadRecord(**asdict(event), worker=socket.gethostname())
        residency.record_engine_load(session, record)


# Labelled once: every stage counts itself.
_STAGE_COUNTS = {
    (stage, str(outcome)): STAGES.labels(stage, outcome)
    for stage, outcomes in (
        ("proposer", ("ok", "failed")),
        ("aggregator", (ItemStatus.SUCCEEDED, ItemStatus.DEGRADED, ItemStatus.FAILED)),
    )
    for outcome in outcomes
}


@worker_shutdown.connect
def _close_engines(**_: Any) -> None:
    if _host is not None:
        _host.shutdown()


class _Stage:
    """What a stage knows about its item after the first read."""

    def __init__(self, job_id: str, instruction: str, system: str | None, references: list[str]) -> None:
        self.job_id = job_id
        self.instruction = instruction
        self.system = system
        self.references = references


def _generate(
    *,
    stage: _Stage,
    recipe: Recipe,
    model: str,
    sampling: SamplingSpec,
    request_id: str,
    layer: int,
) -> tuple[Generation, dict[str, Any] | None]:
    """Build the prompt for `model`, generate, and return the text with any truncation record."""
    host = engine_host()
    spec = recipe.model(model)
    with host.lease(model, spec, job_id=stage.job_id) as engine:
        prompt = build_stage_prompt(
            stage.instruction,
            system=stage.system,
            references=stage.references,
            system_supported=engine.system_supported,
            context_length=spec.context_length,
            max_tokens=sampling.max_tokens,
            tokenizer=engine.tokenizer,
            layer=layer,
        )
        generation = host.generate(engine, ChatRequest.build(request_id, prompt.messages, sampling))
    truncation = prompt.truncation.model_dump() if prompt.truncation else None
    return generation, truncation


def _record(model: str, generation: Generation, attempt: int, worker: str | None) -> GenerationRecord:
    return GenerationRecord(
        model=model,
        text=generation.text,
        prompt_tokens=generation.prompt_tokens,
        output_tokens=generation.output_tokens,
        latency_ms=generation.latency_ms,
        finish_reason=generation.finish_reason,
        attempt=attempt,
        worker=worker,
    )


def _retry_or_give_up(task: Task, exc: EngineUnavailable) -> None:
    """Retry a transient error with exponential backoff and jitter; return when retries are spent."""
    settings = get_settings()
    if task.request.retries >= settings.stage_max_retries:
        return
    countdown = settings.stage_retry_backoff_s * (2**task.request.retries) * (0.5 + random.random())
    raise task.retry(exc=exc, countdown=countdown, max_retries=settings.stage_max_retries)


# Retried: EngineUnavailable (timeouts, lost connections, OOM at generation).
# Not retried: RequestRejected and PromptTooLong, which would fail the same way again.
# Results are not stored: nothing reads them (the database is the record), and the Redis result
# backend counts a chord's header tasks without them.
@app.task(name=TASK_PROPOSER, bind=True, acks_late=True, ignore_result=True, **DATABASE_RETRY)
def run_proposer(self: Task, item_id: int, layer: int, slot: int) -> int | None:
    """Generate one slot of one layer and store it; returns the candidate row id (None: item gone)."""
    url = get_settings().database_url
    with statement_scope(url) as db:
        item = stages.read_proposer(db, item_id, layer, slot)
        if item is None or not item.runnable:
            return None
        existing = next((c for c in item.pool(layer) if c.slot == slot), None)
        if existing is not None and existing.ok:
            return existing.id
        recipe = job_recipe(db, item.job_id)
    references = [c.text for c in item.pool(layer - 1) if c.ok and c.text]
    stage = _Stage(item.job_id, item.instruction, item.system, references)
    spec = recipe.slots(layer)[slot]
    attempt = self.request.retries + 1
    error: str | None = None
    generation: Generation | None = None
    try:
        generation, _ = _generate(
            stage=stage,
            recipe=recipe,
            model=spec.model,
            sampling=spec.sampling,
            request_id=f"{item_id}_{layer}_{slot}_{attempt}",
            layer=layer,
        )
    except EngineUnavailable as exc:
        _retry_or_give_up(self, exc)
        error = f"{spec.model}: {exc} (after {attempt} attempts)"
    except (EngineError, PromptTooLong) as exc:
        error = f"{spec.model}: {exc}"
    if generation is None:
        log.warning("proposer item=%s layer=%s slot=%s failed: %s", item_id, layer, slot, error)
        record = GenerationRecord(
            model=spec.model, text=None, error=error, attempt=attempt, worker=self.request.hostname
        )
    else:
        record = _record(spec.model, generation, attempt, self.request.hostname)
    with statement_scope(url) as db:
        candidate_id = stages.record_candidate(db, item_id, layer, slot, record)
    _STAGE_COUNTS["proposer", "failed" if generation is None else "ok"].inc()
    return candidate_id


@app.task(name=TASK_AGGREGATOR, bind=True, acks_late=True, ignore_result=True, **DATABASE_RETRY)
def run_aggregator(self: Task, item_id: int) -> str | None:
    """Aggregate the last layer's pool into the item's output; returns the item's final status."""
    url = get_settings().database_url
    with statement_scope(url) as db:
        item = stages.read_pools(db, item_id)
        if item is None or not item.runnable:
            return item.status if item else None
        recipe = job_recipe(db, item.job_id)
    last = len(recipe.layers) - 1
    pool = item.pool(last)
    expected = len(recipe.slots(last))
    if len(pool) < expected:
        # Fired before every slot was stored (a lost or duplicated chord message): aggregating
        # now would make a degraded answer from a pool that is still filling. The recovery sweep
        # sends the aggregator again once the pool is complete.
        log.warning("aggregator item=%s: %s of %s slots stored", item_id, len(pool), expected)
        return None
    references = [c.text for c in pool if c.ok and c.text]
    failures = [f"slot {c.slot}: {c.error}" for c in pool if not c.ok]
    stage = _Stage(item.job_id, item.instruction, item.system, references)
    if len(references) < recipe.min_pool:
        reason = (
            f"pool has {len(references)} of {expected} candidates, fewer than min_pool={recipe.min_pool}"
            + (f"; {'; '.join(failures)}" if failures else "")
        )
        with statement_scope(url) as db:
            stages.finish_item(db, item_id, ItemStatus.FAILED, error=reason)
        return ItemStatus.FAILED
    aggregator = recipe.aggregator
    attempt = self.request.retries + 1
    try:
        generation, truncation = _generate(
            stage=stage,
            recipe=recipe,
            model=aggregator.model,
            sampling=aggregator.sampling,
            request_id=f"{item_id}_agg_{attempt}",
            layer=last + 1,
        )
    except EngineUnavailable as exc:
        _retry_or_give_up(self, exc)
        return _fail(url, item_id, f"aggregator {aggregator.model}: {exc} (after {attempt} attempts)")
    except (EngineError, PromptTooLong) as exc:
        return _fail(url, item_id, f"aggregator {aggregator.model}: {exc}")
    degraded = len(references) < expected
    status = ItemStatus.DEGRADED if degraded else ItemStatus.SUCCEEDED
    note = f"pool has {len(references)} of {expected} candidates; {'; '.join(failures)}" if degraded else None
    record = _record(aggregator.model, generation, attempt, self.request.hostname)
    with statement_scope(url) as db:
        stages.finish_item(
            db,
            item_id,
            status,
            error=note,
            truncation=[truncation] if truncation else None,
            output=record,
            pool_size=len(references),
        )
    _STAGE_COUNTS["aggregator", status].inc()
    return status


def _fail(url: str, item_id: int, error: str) -> str:
    log.warning("aggregator item=%s failed: %s", item_id, error)
    _STAGE_COUNTS["aggregator", ItemStatus.FAILED].inc()
    with statement_scope(url) as db:
        stages.finish_item(db, item_id, ItemStatus.FAILED, error=error)
    return ItemStatus.FAILED
