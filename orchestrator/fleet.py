"""Which live workers serve which models, asked through Celery's remote control.

Every worker answers the `slimmoa_models` inspect command (registered here, imported with the app) with
the models it serves (`orchestrator.ownership`) and whether it takes inference work from this
deployment's queues at all: a worker that is draining (its `QUEUE_INFERENCE` consumer cancelled) or a
control worker does not count. The API asks with one broadcast, cached a few seconds, and reports the
models of a job that no live worker serves instead of letting the job wait silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker.control import inspect_command
from kombu.exceptions import OperationalError

from orchestrator.ownership import ModelSelection
from orchestrator.recipes import Recipe
from orchestrator.routing import model_queues
from orchestrator.settings import Settings, get_settings

__all__ = [
    "COMMAND",
    "Fleet",
    "get_fleet",
    "live_workers",
    "unserved",
    "unserved_models",
    "worker_selection",
]

log = logging.getLogger(__name__)

COMMAND = "slimmoa_models"
# A broadcast waits this long for the replies of every worker, however many answer.
REPLY_TIMEOUT_S = 1.0
# How long one answer is used: a job is reported within this plus the reply timeout.
CACHE_S = 10.0


@lru_cache(maxsize=8)
def _selection(spec: str, recipes_dir: Path) -> ModelSelection:
    return ModelSelection.parse(spec, recipes_dir)


def worker_selection(settings: Settings) -> ModelSelection:
    """The models this process serves as a worker (WORKER_MODELS; empty: every model)."""
    return _selection(settings.worker_models, settings.recipes_dir)


@inspect_command(name=COMMAND)
def _served_models(state: Any, **_: Any) -> dict[str, Any]:
    """The models this worker serves, and whether it consumes the inference queues."""
    settings = get_settings()
    consumer = state.consumer.task_consumer
    queue = settings.queue_inference
    serving = consumer is not None and consumer.consuming_from(queue)
    selection = _selection(state.app.conf.get("slimmoa_worker_models", ""), settings.recipes_dir)
    return {"queue": queue, "serving": bool(serving), "models": list(selection.patterns)}


def live_workers(
    app: Celery, settings: Settings, timeout: float = REPLY_TIMEOUT_S
) -> dict[str, ModelSelection]:
    """Node name -> models served, of the live workers that take this deployment's inference work."""
    replies = app.control.broadcast(COMMAND, reply=True, timeout=timeout) or []
    found: dict[str, ModelSelection] = {}
    for reply in replies:
        for worker, answer in reply.items():
            # Workers of other deployments on the same Redis answer too (or say they know no such
            # command): only this deployment's queue prefix counts.
            ours = isinstance(answer, dict) and answer.get("queue") == settings.queue_inference
            if ours and answer.get("serving"):
                found[worker] = ModelSelection(tuple(answer.get("models") or ()))
    return found


def unserved(models: Iterable[str], workers: Mapping[str, ModelSelection]) -> list[str]:
    """The models that no worker serves, sorted."""
    return sorted(m for m in set(models) if not any(s.serves(m) for s in workers.values()))


@dataclass
class Fleet:
    """The live workers' model lists, asked at most once every `ttl` seconds."""

    app: Celery
    ttl: float = CACHE_S
    timeout: float = REPLY_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # (queue asked about, when) of the last answer, and the answer.
    _asked: tuple[str, float] | None = field(default=None, init=False)
    _workers: dict[str, ModelSelection] = field(default_factory=dict, init=False)

    def workers(self, settings: Settings) -> dict[str, ModelSelection]:
        with self._lock:
            asked = self._asked
            queue = settings.queue_inference
            if asked is None or asked[0] != queue or self.clock() - asked[1] >= self.ttl:
                self._workers = live_workers(self.app, settings, self.timeout)
                self._asked = (queue, self.clock())
            return dict(self._workers)

    def unserved_models(self, recipe: Recipe, settings: Settings) -> list[str]:
        """The models of `recipe` (proposers and aggregator) that no live worker serves."""
        return unserved(model_queues([recipe]), self.workers(settings))


@lru_cache
def get_fleet() -> Fleet:
    """The process's view of the workers (the API's)."""
    from orchestrator.celery_app import app

    return Fleet(app)


def unserved_models(recipe: Mapping[str, Any], settings: Settings) -> list[str]:
    """The models of a stored job recipe that no live worker serves; empty when the broker does not
    answer (the job's progress is still reported, and the health probe says what is down)."""
    try:
        return get_fleet().unserved_models(Recipe.model_validate(recipe), settings)
    except (OSError, OperationalError) as exc:
        log.warning("could not ask the workers which models they serve: %s", exc)
        return []
