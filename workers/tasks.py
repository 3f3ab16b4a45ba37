"""The proposer and aggregator stage tasks.

Both take ids, re-read their rows and return early when their work is already stored, so a
redelivered or duplicated task changes nothing. The aggregator reads the pool from the database,
not from the chord's result list: the database is the system of record.

A multi-turn item runs these per user turn: a turn's stages see the conversation so far (the earlier
turns with their aggregated answers), and the aggregator of a turn before the last stores its answer
and sends the next turn's canvas instead of finishing the item.

A sequential aggregator runs its steps in a loop within the one task, storing each step before the
next starts (a candidate row of the steps' layer, slot = step), so a redelivered or re-sent aggregator
resumes at the first missing step; the last step's generation is the turn's answer.

Every attempt ends as exactly one of: a generation (recorded), a transient failure (retried, the
attempt counted on the row), a permanent failure (recorded at once) — see `workers.stage_runner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from celery import Task

from db import stages
from db.models import ItemStatus, JobKind, utcnow
from db.rows import GenerationRecord
from db.session import statement_scope
from orchestrator.canvas import next_turn, turn_label
from orchestrator.celery_app import TASK_AGGREGATOR, TASK_PROPOSER, app
from orchestrator.contracts import ChatMessage
from orchestrator.errors import PromptTooLong
from orchestrator.job_recipes import job_recipe
from orchestrator.prompts import StagePrompt, build_stage_prompt, step_references, step_windows
from orchestrator.recipes import AggregationMode, Recipe, SamplingSpec
from orchestrator.routing import BULK_PRIORITY, stage_priority
from orchestrator.settings import get_settings
from workers.chat_stream import ChatStream
from workers.engine_sizing import planned_spec
from workers.engines import ChatRequest, Engine
from workers.metrics import STAGES
from workers.outcomes import Failure
from workers.stage_runner import STAGE_RETRY, attempt_stage, attempts, engine_host, ride_out_database

__all__ = ["run_aggregator", "run_proposer"]

log = logging.getLogger(__name__)

# Labelled once: every stage counts itself.
_STAGE_COUNTS = {
    (stage, str(outcome)): STAGES.labels(stage, outcome)
    for stage, outcomes in (
        ("proposer", ("ok", "failed")),
        ("aggregator", (ItemStatus.SUCCEEDED, ItemStatus.DEGRADED, ItemStatus.FAILED)),
    )
    for outcome in outcomes
}


@dataclass
class _Steps:
    """Where an aggregation is: its mode (`auto` until the engine's tokenizer decides), the step due
    and the running synthesis it reads."""

    mode: AggregationMode
    window: int
    count: int
    step: int = 0
    synthesis: str | None = None

    def prompt(self, pool: list[str], build: Callable[[list[str]], StagePrompt]) -> StagePrompt:
        """The due step's prompt: the whole pool at once, or the step's window. `auto` reads the pool
        at once when its prompt needs no cut, else steps."""
        if self.mode == "auto":
            try:
                whole = build(pool)
            except PromptTooLong:
                whole = None
            self.mode = "single" if whole is not None and whole.truncation is None else "sequential"
            if whole is not None and self.mode == "single":
                return whole
        if self.mode == "single":
            return build(pool)
        return build(step_references(pool, self.window, self.step, self.synthesis))

    @property
    def last(self) -> bool:
        return self.mode == "single" or self.step >= len(step_windows(self.count, self.window)) - 1

    def label(self) -> str:
        if self.mode != "sequential":
            return "aggregator"
        return f"aggregator (step {self.step + 1} of {len(step_windows(self.count, self.window))})"


@dataclass
class _Stage:
    """What a stage knows about its item after the first read, and the prompt's truncation record."""

    job_id: str
    instruction: str
    system: str | None
    references: list[str]
    # A conversation's turns before the instruction (empty for a one-turn prompt).
    history: list[ChatMessage] = field(default_factory=list)
    truncation: dict[str, Any] | None = None
    # When the request went to the engine (the timeline's generation intervals start there).
    started_at: datetime | None = None
    # The aggregator's: which of the pool its prompt reads.
    steps: _Steps | None = None
    # The engine's scheduling priority of its requests (a chat request's stages go first).
    priority: int = BULK_PRIORITY

    @classmethod
    def of(cls, item: stages.StageRead, references: list[str], turn: int = 0) -> _Stage:
        instruction = item.instruction
        if item.turns is not None:
            answers = {answer.turn: answer.text for answer in item.answers}
            instruction = item.turns[turn]
            history = [
                ChatMessage(role=role, content=text)
                for earlier in range(turn)
                for role, text in (("user", item.turns[earlier]), ("assistant", answers[earlier]))
            ]
        else:
            messages = [ChatMessage.model_validate(m) for m in (item.messages or [])[:-1]]
            history = [message for message in messages if message.role != "system"]
        priority = stage_priority(item.job_kind, item.job_priority)
        return cls(item.job_id, instruction, item.system, references, history, priority=priority)


# What a record keeps of a generation.
_RECORDED = {"text", "prompt_tokens", "output_tokens", "latency_ms", "finish_reason"}


def _attempt(
    task: Task,
    stage: _Stage,
    recipe: Recipe,
    model: str,
    sampling: SamplingSpec,
    layer: int,
    request_id: str,
    stream: ChatStream | None = None,
) -> GenerationRecord:
    """One attempt on `model` with the prompt built for its engine (streamed into `stream`, if any),
    as the record to store."""
    spec = planned_spec(recipe, model, engine_host().settings.worker_memory_gb)

    def prepare(engine: Engine) -> ChatRequest:
        def build(references: list[str]) -> StagePrompt:
            return build_stage_prompt(
                stage.instruction,
                system=stage.system,
                history=stage.history,
                references=references,
                system_supported=engine.system_supported,
                context_length=spec.context_length,
                max_tokens=sampling.max_tokens,
                tokenizer=engine.tokenizer,
                layer=layer,
            )

        prompt = (
            build(stage.references) if stage.steps is None else stage.steps.prompt(stage.references, build)
        )
        if prompt.truncation and stage.steps is not None and stage.steps.mode == "sequential":
            prompt.truncation.step = stage.steps.step
        stage.truncation = prompt.truncation.model_dump(exclude_none=True) if prompt.truncation else None
        stage.started_at = utcnow()
        return ChatRequest.build(request_id, prompt.messages, sampling, priority=stage.priority)

    outcome = attempt_stage(task, model, spec, prepare, stage.job_id, stream)
    ran = {"model": model, "attempt": attempts(task), "worker": task.request.hostname}
    ran["started_at"] = stage.started_at
    if isinstance(outcome, Failure):
        return GenerationRecord(**ran, text=None, error=outcome.message)
    return GenerationRecord(**ran, **outcome.model_dump(include=_RECORDED))


# Results are not stored: nothing reads them (the database is the record), and the Redis result
# backend counts a chord's header tasks without them.
@app.task(name=TASK_PROPOSER, bind=True, acks_late=True, ignore_result=True, **STAGE_RETRY)
def run_proposer(self: Task, item_id: int, layer: int, slot: int, turn: int = 0) -> int | None:
    """Generate one slot of one layer of a turn and store it; returns the candidate row id (None: the
    item is gone or finished)."""
    url = get_settings().database_url

    def read() -> tuple[stages.StageRead | None, Recipe | None]:
        with statement_scope(url) as db:
            item = stages.read_proposer(db, item_id, layer, slot, turn)
            runnable = item is not None and item.runnable
            return item, job_recipe(db, item.job_id) if item is not None and runnable else None

    item, recipe = ride_out_database(read)
    if item is None or recipe is None:
        return None
    existing = next((c for c in item.pool(layer) if c.slot == slot), None)
    if existing is not None and existing.ok:
        return existing.id
    if len(item.answers) < turn:
        # A turn sent before the answers it follows were stored (or since dropped by a retry).
        log.warning("proposer item=%s turn=%s: earlier turns are not answered", item_id, turn)
        return None
    references = [c.text for c in item.pool(layer - 1) if c.ok and c.text]
    stage = _Stage.of(item, references, turn)
    spec = recipe.slots(layer)[slot]
    request_id = f"{item_id}_{turn}_{layer}_{slot}_{attempts(self)}"
    record = _attempt(self, stage, recipe, spec.model, spec.sampling, layer, request_id)
    if record.error is not None:
        log.warning("proposer item=%s layer=%s slot=%s failed: %s", item_id, layer, slot, record.error)

    def write() -> int:
        with statement_scope(url) as db:
            return stages.record_candidate(db, item_id, layer, slot, record, turn)

    candidate_id = ride_out_database(write)
    _STAGE_COUNTS["proposer", "failed" if record.error else "ok"].inc()
    return candidate_id


@app.task(name=TASK_AGGREGATOR, bind=True, acks_late=True, ignore_result=True, **STAGE_RETRY)
def run_aggregator(self: Task, item_id: int, turn: int = 0) -> str | None:
    """Aggregate the last layer's pool of a turn into its answer; returns the item's final status (or,
    for a turn before the last, the turn's)."""
    url = get_settings().database_url

    def read() -> tuple[stages.StageRead | None, Recipe | None]:
        with statement_scope(url) as db:
            item = stages.read_pools(db, item_id, turn=turn)
            runnable = item is not None and item.runnable
            return item, job_recipe(db, item.job_id) if item is not None and runnable else None

    item, recipe = ride_out_database(read)
    if item is None or recipe is None or item.answered(turn):
        return item.status if item else None
    last = len(recipe.layers) - 1
    pool = item.pool(last)
    expected = len(recipe.slots(last))
    if len(pool) < expected or len(item.answers) < turn:
        # Fired before every slot was stored (a lost or duplicated chord message): aggregating
        # now would make a degraded answer from a pool that is still filling. The recovery sweep
        # sends the aggregator again once the pool is complete.
        log.warning("aggregator item=%s turn=%s: %s of %s slots stored", item_id, turn, len(pool), expected)
        return None
    where = turn_label(turn, item.last_turn)
    # A chat request's answer streams to the client waiting for it.
    stream = ChatStream(item.job_id) if item.job_kind == JobKind.CHAT else None
    references = [c.text for c in pool if c.ok and c.text]
    failures = "; ".join(f"slot {c.slot}: {c.error}" for c in pool if not c.ok)
    if len(references) < recipe.min_pool:
        reason = f"pool has {len(references)} of {expected} candidates, fewer than min_pool={recipe.min_pool}"
        return _finish(
            url, item_id, ItemStatus.FAILED, where + reason + (f"; {failures}" if failures else "")
        )
    stage = _Stage.of(item, references, turn)
    record, truncation = _aggregate(self, url, stage, recipe, item, item_id, turn, stream)
    if record.error is not None:
        log.warning("aggregator item=%s turn=%s failed: %s", item_id, turn, record.error)
        return _finish(url, item_id, ItemStatus.FAILED, f"{where}{record.error}", stream=stream)
    notes = [
        f"{turn_label(answer.turn, item.last_turn)}pool had {answer.pool_size} of {expected} candidates"
        for answer in item.answers
        if answer.pool_size < expected
    ]
    if len(references) < expected:
        notes.append(f"{where}pool has {len(references)} of {expected} candidates; {failures}")
    status = ItemStatus.DEGRADED if notes else ItemStatus.SUCCEEDED
    if turn < item.last_turn:
        return _answer_turn(url, item, item_id, turn, record, len(references), recipe, status)
    note = "; ".join(notes) or None
    return _finish(url, item_id, status, note, truncation, record, len(references), turn, stream)


def _aggregate(
    task: Task,
    url: str,
    stage: _Stage,
    recipe: Recipe,
    item: stages.StageRead,
    item_id: int,
    turn: int,
    stream: ChatStream | None = None,
) -> tuple[GenerationRecord, list[dict[str, Any]] | None]:
    """The turn's answer and the truncation of its prompts: one generation over the whole pool, or a
    sequential aggregation's steps from the first one not stored, each stored before the next starts.
    A failed step fails the answer (its error names the step); the steps stored stay for a retry.
    A chat request's `stream` carries the last step's text only: the steps before it are drafts."""
    aggregator = recipe.aggregator
    layer = len(recipe.layers)
    stored = [c.text or "" for c in item.pool(layer)]
    # Stored steps mean the mode was decided sequential already.
    mode = "sequential" if stored else aggregator.mode
    steps = _Steps(
        mode, aggregator.window, len(stage.references), len(stored), stored[-1] if stored else None
    )
    stage.steps = steps
    if stream is not None:
        stream.streaming = lambda: steps.last
    truncation: list[dict[str, Any]] = []
    while True:
        request_id = f"{item_id}_{turn}_agg_{steps.step}_{attempts(task)}"
        sampling = aggregator.sampling
        record = _attempt(task, stage, recipe, aggregator.model, sampling, layer, request_id, stream)
        truncation += [stage.truncation] if stage.truncation else []
        if record.error is not None:
            return replace(record, error=f"{steps.label()} {record.error}"), truncation or None
        if steps.last:
            return record, truncation or None

        def write(step: int = steps.step, done: GenerationRecord = record) -> str:
            with statement_scope(url) as db:
                return stages.record_step(db, item_id, turn, layer, step, done)

        steps.synthesis = ride_out_database(write)
        steps.step += 1


def _answer_turn(
    url: str,
    item: stages.StageRead,
    item_id: int,
    turn: int,
    output: GenerationRecord,
    pool_size: int,
    recipe: Recipe,
    status: ItemStatus,
) -> str:
    """Store a turn's answer (not the last turn's) and send the next turn's canvas, once."""

    def write() -> bool:
        with statement_scope(url) as db:
            stored = stages.record_turn_output(db, item_id, turn, output, pool_size)
            if stored:
                stages.mark_item_dispatched(db, item_id)
            return stored

    if ride_out_database(write):
        priority = stage_priority(item.job_kind, item.job_priority)
        next_turn(item_id, recipe, job_id=item.job_id, turn=turn, priority=priority)
    _STAGE_COUNTS["aggregator", status].inc()
    return status


def _finish(
    url: str,
    item_id: int,
    status: ItemStatus,
    note: str | None,
    truncation: list[dict[str, Any]] | None = None,
    output: GenerationRecord | None = None,
    pool_size: int = 0,
    turn: int = 0,
    stream: ChatStream | None = None,
) -> str:
    """Move the item to its final status (with the aggregated output of its last turn, if any), once;
    a chat request's stream then says how it ended (its answer is stored before the client is told)."""

    def write() -> None:
        with statement_scope(url) as db:
            stages.finish_item(
                db,
                item_id,
                status,
                error=note,
                truncation=truncation,
                output=output,
                pool_size=pool_size,
                turn=turn,
            )

    ride_out_database(write)
    _STAGE_COUNTS["aggregator", status].inc()
    if stream is not None and output is not None:
        stream.finish(output)
    elif stream is not None:
        stream.fail(note or "the request failed")
    return status
