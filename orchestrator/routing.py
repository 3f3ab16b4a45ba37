"""Where stage tasks go: per model, one queue for its proposals, one for its aggregations, one for the
stages of chat requests.

An inference worker consumes the queues of the models it holds and swaps a model in only when those
are drained (`workers.affinity`), so a job whose models do not all fit costs about one load per model
per layer instead of one per item. Aggregations have queues of their own: the broker serves a worker's
queues in turn, so items whose pools are complete finish while proposals of later items still wait.

Priorities: Celery's Redis transport keeps one list per priority step of every queue and serves a
LOWER step first, across all the queues a worker consumes. Chat requests' stages are sent at step 0,
bulk jobs' at steps 1 to 9 by their `priority` (9, the highest, at step 1; 8 shares it; 0 at step 9),
so a person waiting for an answer never queues behind a bulk backlog, and bulk jobs are ordered among
themselves. A message sent without a priority gets `task_default_priority`, the lowest bulk step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from orchestrator.recipes import Recipe
from orchestrator.settings import get_settings

__all__ = [
    "BULK_PRIORITY",
    "INTERACTIVE_PRIORITY",
    "PRIORITY_STEPS",
    "ModelQueues",
    "aggregator_queue",
    "chat_queue",
    "model_queues",
    "priority_lists",
    "proposer_queue",
    "queue_depths",
    "stage_priority",
]

# Must be the same in every process that sends or consumes (orchestrator.celery_app sets it).
PRIORITY_STEPS = list(range(10))
# kombu's Redis transport names step n's list `queue + SEP + n` (step 0: the queue's own name).
_STEP_SEPARATOR = "\x06\x16"
INTERACTIVE_PRIORITY = 0
BULK_PRIORITY = PRIORITY_STEPS[-1]


def stage_priority(kind: str, job_priority: int) -> int:
    """The broker step of a job's stages: 0 for a chat request, 9 - priority (at least 1) for bulk."""
    if kind == "chat":
        return INTERACTIVE_PRIORITY
    return max(INTERACTIVE_PRIORITY + 1, BULK_PRIORITY - job_priority)


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, one per priority step, served first to last."""
    return [queue if step == 0 else f"{queue}{_STEP_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, list[int]]:
    """Messages waiting in each queue, per priority step (index 0: interactive), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in priority_lists(queue):
            pipe.llen(key)
    lengths = [int(n) for n in pipe.execute()]
    steps = len(PRIORITY_STEPS)
    return {queue: lengths[i * steps : (i + 1) * steps] for i, queue in enumerate(queues)}


def proposer_queue(model: str) -> str:
    return f"{get_settings().queue_inference}.{model}"


def aggregator_queue(model: str) -> str:
    return f"{get_settings().queue_inference}.{model}.aggregate"


def chat_queue(model: str) -> str:
    """Every stage of chat requests on `model`: a queue apart, so that a worker can stop taking bulk
    stages while a person waits (workers.affinity) without stopping chat ones."""
    return f"{get_settings().queue_inference}.{model}.chat"


@dataclass(frozen=True)
class ModelQueues:
    """A model's queues and the device memory it needs (0 when unknown or not on this device)."""

    model: str
    memory_gb: float
    proposals: str
    aggregations: str
    chat: str

    @property
    def queues(self) -> tuple[str, str, str]:
        return (self.proposals, self.aggregations, self.chat)


def model_queues(recipes: list[Recipe]) -> dict[str, ModelQueues]:
    """The queues of every model the recipes use; a name defined twice counts its larger estimate."""
    found: dict[str, ModelQueues] = {}
    for recipe in recipes:
        used = {s.model for layer in range(len(recipe.layers)) for s in recipe.slots(layer)}
        used.add(recipe.aggregator.model)
        for name in used:
            memory = float(recipe.model(name).memory_gb or 0.0)
            known = found.get(name)
            if known is None or memory > known.memory_gb:
                queues = (proposer_queue(name), aggregator_queue(name), chat_queue(name))
                found[name] = ModelQueues(name, memory, *queues)
    return found
