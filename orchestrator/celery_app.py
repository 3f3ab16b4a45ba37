"""The Celery application, configured from settings. Stage tasks are addressed by registered name."""

from __future__ import annotations

from typing import Any

from celery import Celery
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.routing import BULK_PRIORITY, PRIORITY_STEPS
from orchestrator.settings import Settings, get_settings

__all__ = [
    "DATABASE_RETRY",
    "TASK_AGGREGATOR",
    "TASK_DISPATCH",
    "TASK_JUDGE",
    "TASK_LAYER_DONE",
    "TASK_PROPOSER",
    "TASK_RECOVER",
    "app",
    "configure",
]

TASK_DISPATCH = "slimmoa.dispatch"
TASK_PROPOSER = "slimmoa.proposer"
TASK_AGGREGATOR = "slimmoa.aggregator"
TASK_LAYER_DONE = "slimmoa.layer_done"
TASK_JUDGE = "slimmoa.judge"
TASK_RECOVER = "slimmoa.recover"

# A database restart or failover surfaces as OperationalError / InterfaceError: retried with
# backoff until the database is back. Every stage write is idempotent, so a retry is harmless.
DATABASE_RETRY: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 20,
}


def configure(celery: Celery, settings: Settings) -> None:
    """Apply settings; each line below guards against a way Celery over Redis loses or hangs work."""
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    # A list per priority step (orchestrator.routing): chat stages are served before bulk ones.
    broker = transport | {"priority_steps": PRIORITY_STEPS}
    celery.conf.update(
        broker_url=settings.redis_url or None,
        result_backend=settings.redis_url or None,
        # Redis redelivers unacked tasks after visibility_timeout: keep it above the longest stage,
        # in the broker and in the result backend, or long generations run twice.
        broker_transport_options=broker,
        result_backend_transport_options=transport,
        # Anything sent without a priority waits behind every chat stage and bulk job.
        task_default_priority=BULK_PRIORITY,
        # Chord counters expire with results: a backlog older than this would never fire its body.
        result_expires=settings.result_expires_s,
        # Ack after the stage wrote its row, so a worker that dies mid-generation loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task reserved per thread: long GPU tasks are not hoarded by one worker.
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_control,
        task_routes={
            TASK_DISPATCH: {"queue": settings.queue_control},
            TASK_LAYER_DONE: {"queue": settings.queue_control},
            # A judge is a model like the stages' ones: it runs where the engines live.
            TASK_JUDGE: {"queue": settings.queue_inference},
            TASK_RECOVER: {"queue": settings.queue_control},
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # What Flower shows: every worker sends task events from its start, not only once Flower
        # has asked for them.
        worker_send_task_events=settings.task_events,
        # The models this process serves as a worker, as its command chose them (read by the
        # `slimmoa_models` inspect command, orchestrator.fleet).
        slimmoa_worker_models=settings.worker_models,
        include=["orchestrator.canvas", "orchestrator.recovery"],
        # The recovery sweep, when a worker runs with --beat: the database is enough to finish a job.
        beat_schedule={
            "recovery-sweep": {"task": TASK_RECOVER, "schedule": settings.recovery_interval_s},
        },
    )


app = Celery("slimmoa")
configure(app, get_settings())

# Registers the `slimmoa_models` inspect command in every process that loads the app: workers answer
# it, and `celery -A orchestrator.celery_app inspect slimmoa_models` can ask it.
import orchestrator.fleet  # noqa: E402, F401
