"""Job dispatch: each item becomes a canvas of per-layer proposer chords ending in its aggregator.

A multi-turn item runs one such canvas per user turn: the aggregator of a turn sends the next turn's
canvas once it has stored its answer (`next_turn`). Tasks carry ids only (item, layer, slot, turn).
The canvas names stage tasks by their registered names, so this module does not import `workers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import chord, group
from celery.canvas import Signature

from db import recovery, stages
from db.models import ItemStatus, JobStatus
from db.progress import get_job
from db.session import session_scope, statement_scope
from orchestrator.celery_app import (
    DATABASE_RETRY,
    TASK_AGGREGATOR,
    TASK_DISPATCH,
    TASK_LAYER_DONE,
    TASK_PROPOSER,
    app,
)
from orchestrator.job_recipes import job_recipe
from orchestrator.recipes import Recipe
from orchestrator.routing import (
    BULK_PRIORITY,
    INTERACTIVE_PRIORITY,
    aggregator_queue,
    chat_queue,
    proposer_queue,
    stage_priority,
)
from orchestrator.settings import get_settings
from orchestrator.stage_info import StageInfo

__all__ = [
    "aggregator_signature",
    "dispatch",
    "item_canvas",
    "layer_done",
    "layer_done_signature",
    "next_turn",
    "turn_info",
    "turn_label",
]

log = logging.getLogger(__name__)

# Items sent between two checks for a cancelled job: a large job stops dispatching soon after a cancel.
DISPATCH_BATCH = 200


def turn_info(
    job_id: str,
    item_id: int,
    turn: int,
    *,
    layer: int | None = None,
    slot: int | None = None,
    model: str | None = None,
) -> StageInfo:
    """A stage's readable information; the turn is shown only past the first."""
    return StageInfo(job_id, item_id, layer, slot, model, turn or None)


def item_canvas(
    item_id: int,
    recipe: Recipe,
    layer: int = 0,
    slots: Sequence[int] | None = None,
    *,
    job_id: str,
    turn: int = 0,
    priority: int = BULK_PRIORITY,
) -> Signature:
    """chord(proposers of `layer` of `turn`, body): the body is the aggregator after the last layer,
    else `layer_done`, which checks the pool and sends the next layer's chord. Every stage is sent at
    the job's broker `priority` step (`orchestrator.routing.stage_priority`).

    Every signature is immutable: bodies ignore the header results and read the pool from the
    database. Layers are linked by `layer_done` sending the next chord, not by chaining or nesting
    chords, whose bodies Celery passes results into or may start before the inner header has finished.
    """
    specs = recipe.slots(layer)
    chosen = [s.slot for s in specs] if slots is None else list(slots)
    header = group(
        app.signature(
            TASK_PROPOSER,
            args=(item_id, layer, slot, turn),
            immutable=True,
            queue=_queue(proposer_queue(specs[slot].model), specs[slot].model, priority),
            priority=priority,
            **turn_info(job_id, item_id, turn, layer=layer, slot=slot, model=specs[slot].model).options(),
        )
        for slot in chosen
    )
    if layer == len(recipe.layers) - 1:
        body = aggregator_signature(item_id, recipe, job_id=job_id, turn=turn, priority=priority)
    else:
        body = layer_done_signature(item_id, layer, job_id=job_id, turn=turn, priority=priority)
    return chord(header, body)


def _queue(bulk: str, model: str, priority: int) -> str:
    """A chat request's stages go to the model's chat queue, a bulk job's to `bulk`."""
    return chat_queue(model) if priority == INTERACTIVE_PRIORITY else bulk


def layer_done_signature(
    item_id: int, layer: int, *, job_id: str, turn: int = 0, priority: int = BULK_PRIORITY
) -> Signature:
    """The check between two layers of one item's turn."""
    return app.signature(
        TASK_LAYER_DONE,
        args=(item_id, layer, turn),
        immutable=True,
        priority=priority,
        **turn_info(job_id, item_id, turn, layer=layer).options(),
    )


def aggregator_signature(
    item_id: int, recipe: Recipe, *, job_id: str, turn: int = 0, priority: int = BULK_PRIORITY
) -> Signature:
    """The aggregator of one item's turn, on its model's aggregation queue."""
    model = recipe.aggregator.model
    return app.signature(
        TASK_AGGREGATOR,
        args=(item_id, turn),
        immutable=True,
        queue=_queue(aggregator_queue(model), model, priority),
        priority=priority,
        **turn_info(job_id, item_id, turn, model=model).options(),
    )


# Results are not stored (here and for the stages): nothing reads them, the database is the record.
@app.task(name=TASK_DISPATCH, acks_late=True, ignore_result=True, **DATABASE_RETRY)
def dispatch(job_id: str) -> int:
    """Enqueue the canvases of a job's pending items; returns how many were sent."""
    url = get_settings().database_url
    with session_scope(url) as session:
        job = get_job(session, job_id)
        if job is None:
            log.warning("dispatch: no job %s", job_id)
            return 0
        # Only the dispatch that starts the job sends its items: a second one (a submit repeated with
        # its Idempotency-Key) or one redelivered after a crash would send them again. What a crashed
        # dispatch did not send, the recovery sweep does.
        if not recovery.mark_job_running(session, job_id):
            log.info("dispatch: job %s is %s, not queued: nothing to send", job_id, job.status)
            return 0
        recipe = Recipe.model_validate(job.recipe)
        priority = stage_priority(job.kind, job.priority)
        item_ids = recovery.item_ids(session, job_id, pending_only=True)
        recovery.mark_items_dispatched(session, job_id=job_id)
    for start in range(0, len(item_ids), DISPATCH_BATCH):
        if start and _cancelled(url, job_id):
            return start
        for item_id in item_ids[start : start + DISPATCH_BATCH]:
            # Not in this task's trail: Celery would keep every chord's results (and their result
            # subscriptions) until the whole job is dispatched, memory growing with the job.
            item_canvas(item_id, recipe, job_id=job_id, priority=priority).apply_async(add_to_parent=False)
    return len(item_ids)


def turn_label(turn: int, last_turn: int) -> str:
    """`turn 2 of 3: ` before a multi-turn item's stage failure; nothing for a one-turn item."""
    return f"turn {turn + 1} of {last_turn + 1}: " if last_turn else ""


def next_turn(item_id: int, recipe: Recipe, *, job_id: str, turn: int, priority: int) -> None:
    """Send the canvas of the turn after `turn` (its aggregator has stored its answer)."""
    canvas = item_canvas(item_id, recipe, job_id=job_id, turn=turn + 1, priority=priority)
    canvas.apply_async(add_to_parent=False)


def _cancelled(url: str, job_id: str) -> bool:
    with session_scope(url) as session:
        job = get_job(session, job_id)
        return job is None or job.status == JobStatus.CANCELLED


@app.task(name=TASK_LAYER_DONE, acks_late=True, ignore_result=True, **DATABASE_RETRY)
def layer_done(item_id: int, layer: int, turn: int = 0) -> bool:
    """Between layers: send the next layer's chord, or fail the item if this pool is below `min_pool`.

    A redelivered call may send the next chord twice; its stages find their rows and return early.
    """
    url = get_settings().database_url
    with statement_scope(url) as db:
        item = stages.read_pools(db, item_id, from_layer=layer, turn=turn)
        if item is None or not item.runnable:
            return False
        recipe = job_recipe(db, item.job_id)
        pool = item.pool(layer)
        survivors = [c for c in pool if c.ok]
        if len(pool) < len(recipe.slots(layer)):
            # Fired before its whole header finished (a lost or duplicated chord message): the
            # missing slots are still due, and the recovery sweep completes the layer.
            log.warning(
                "layer_done item=%s layer=%s: %s of %s slots stored",
                item_id,
                layer,
                len(pool),
                len(recipe.slots(layer)),
            )
            return False
        if len(survivors) >= recipe.min_pool:
            priority = stage_priority(item.job_kind, item.job_priority)
            canvas = item_canvas(item_id, recipe, layer + 1, job_id=item.job_id, turn=turn, priority=priority)
            canvas.apply_async()
            stages.mark_item_dispatched(db, item_id)
            return True
        failures = "; ".join(f"slot {c.slot}: {c.error}" for c in pool if not c.ok)
        reason = (
            turn_label(turn, item.last_turn)
            + f"layer {layer} pool has {len(survivors)} of {len(recipe.slots(layer))} candidates, "
            f"fewer than min_pool={recipe.min_pool}" + (f"; {failures}" if failures else "")
        )
        stages.finish_item(db, item_id, ItemStatus.FAILED, error=reason)
        return False
