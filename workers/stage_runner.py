"""The one stage runner of the proposer, aggregator and judge tasks: it turns an attempt's outcome into
"record" or "retry", and keeps the process's engine host.

- A `Generation` or a permanent `Failure` is returned for the task to record on its row at once.
- A transient `Failure` raises `StageRetry` while retries remain: the tasks declare
  `autoretry_for=(StageRetry,)` with backoff and a cap (`STAGE_RETRY`); with the last retry spent it is
  returned as permanent, saying how many attempts it took.
- Database errors are ridden out inside the task (`ride_out_database`), never by Celery's retries, so
  `task.request.retries` counts engine attempts only and `attempt` on a row means exactly that.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from celery import Task
from celery.signals import worker_shutdown

from db import residency
from db.session import DATABASE_UNAVAILABLE, session_scope
from orchestrator.settings import Settings, get_settings
from workers.chat_stream import ChatStream
from workers.engine_host import EngineHost, LoadEvent, Spec
from workers.engines import ChatRequest, Engine, Generation
from workers.outcomes import Failure

__all__ = [
    "STAGE_RETRY",
    "StageRetry",
    "attempt_stage",
    "attempts",
    "engine_host",
    "ride_out_database",
    "start_engine_host",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Longest wait between two tries of a database statement while the database is away.
DATABASE_RETRY_MAX_DELAY_S = 15.0


class StageRetry(Exception):
    """The one transient outcome: Celery sends the stage again after a backoff."""


def _stage_retry(settings: Settings) -> dict[str, Any]:
    # Retried: transient failures only (timeouts, a dead engine, no room, HTTP 429/5xx). Not retried:
    # permanent ones (a model that cannot load, a rejected request, a prompt too long, a bug), which
    # would fail the same way again. Backoff: up to STAGE_RETRY_BACKOFF_S x 2^retry seconds (whole
    # seconds, at least 1), with full jitter.
    return {
        "autoretry_for": (StageRetry,),
        "retry_backoff": settings.stage_retry_backoff_s,
        "retry_backoff_max": 600,
        "retry_jitter": True,
        "max_retries": settings.stage_max_retries,
    }


STAGE_RETRY = _stage_retry(get_settings())

_host: EngineHost | None = None
_host_lock = threading.Lock()


def start_engine_host(settings: Settings) -> EngineHost:
    """Create the process's engine host with these settings (the worker command's, budget included)."""
    global _host
    with _host_lock:
        if _host is None:
            _host = EngineHost(settings, budget_gb=settings.worker_memory_gb, on_load=_record_load)
        return _host


def engine_host() -> EngineHost:
    """The process's engine host; created from the environment's settings if no command started it."""
    return _host if _host is not None else start_engine_host(get_settings())


def _record_load(event: LoadEvent) -> None:
    """Loads, swaps and failed loads are job statistics: the job that needed the model sees them."""

    def record() -> None:
        with session_scope(engine_host().settings.database_url) as session:
            load = residency.EngineLoadRecord(**asdict(event), worker=socket.gethostname())
            residency.record_engine_load(session, load)

    ride_out_database(record)


@worker_shutdown.connect
def _close_engines(**_: Any) -> None:
    if _host is not None:
        _host.shutdown()


def attempts(task: Task) -> int:
    """Engine attempts of this stage so far, this one included."""
    return int(task.request.retries) + 1


def attempt_stage(
    task: Task,
    model: str,
    spec: Spec,
    prepare: Callable[[Engine], ChatRequest],
    job_id: str | None,
    stream: ChatStream | None = None,
) -> Generation | Failure:
    """Run one attempt (streamed into `stream`, for a chat request's aggregator); returns what to
    record, or raises StageRetry while retries remain and nothing has been streamed."""
    host = engine_host()
    if stream is None:
        outcome = host.attempt(model, spec, prepare, job_id)
    else:
        outcome = host.attempt_stream(
            model, spec, prepare, stream.delta, cancelled=stream.cancelled, job_id=job_id
        )
    if isinstance(outcome, Failure) and outcome.transient:
        if stream is not None and stream.started:
            return Failure(kind="permanent", message=f"{outcome.message} (after the answer began streaming)")
        if task.request.retries < task.max_retries:
            log.info("%s (attempt %s): %s; retrying", task.name, attempts(task), outcome.message)
            raise StageRetry(outcome.message)
        return Failure(kind="permanent", message=f"{outcome.message} (after {attempts(task)} attempts)")
    return outcome


def ride_out_database(work: Callable[[], T]) -> T:
    """Run `work` (which opens its own session or statement scope), trying again while the database
    is unreachable, for up to DATABASE_RETRY_S; every stage write is idempotent, so a repeat is harmless."""
    deadline = time.monotonic() + engine_host().settings.database_retry_s
    delay = 0.5
    while True:
        try:
            return work()
        except DATABASE_UNAVAILABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (%s); trying again in %.1f s", type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, DATABASE_RETRY_MAX_DELAY_S)
