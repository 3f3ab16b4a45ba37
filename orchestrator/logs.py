"""Log lines as text (the default) or as one JSON object a line (`LOG_FORMAT=json`), each line of stage
work carrying its job, item, layer, slot and model.

Those fields live in a context variable: a task's start binds them from the `slimmoa_stage` header the
canvas puts on its message (`orchestrator.stage_info`), its end clears them, and a logging filter
copies them onto every record. Worker threads each have their own context; coroutines that a task
hands to the engine's event loop run in a copy of the task's, so engine lines carry the ids too.
No call site builds ids into its message for this.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun

from orchestrator.celery_app import TASK_DISPATCH
from orchestrator.stage_info import stage_of

__all__ = [
    "STAGE_FIELDS",
    "JsonFormatter",
    "StageFilter",
    "bind_stage",
    "configure_logging",
    "current_stage",
    "stage_context",
    "use_for_celery",
]

STAGE_FIELDS = ("job", "item", "layer", "slot", "model")
# Task fields bound beside the stage's: which Celery task a line belongs to.
TASK_FIELDS = ("task", "task_id")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_stage: ContextVar[Mapping[str, Any]] = ContextVar("slimmoa_stage", default=_EMPTY)


def current_stage() -> Mapping[str, Any]:
    """The fields bound in this thread's (or coroutine's) context."""
    return _stage.get()


def bind_stage(**fields: Any) -> None:
    """Add fields to the current context (None values are left out)."""
    merged = {**_stage.get(), **{key: value for key, value in fields.items() if value is not None}}
    _stage.set(MappingProxyType(merged))


def clear_stage() -> None:
    _stage.set(_EMPTY)


@contextmanager
def stage_context(**fields: Any) -> Iterator[None]:
    """Bind fields for the duration of a block, then restore what was bound before."""
    token = _stage.set(MappingProxyType({**_stage.get(), **fields}))
    try:
        yield
    finally:
        _stage.reset(token)


class StageFilter(logging.Filter):
    """Copies the bound fields onto each record (as attributes), so any formatter can use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _stage.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the stage's fields, and
    the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*STAGE_FIELDS, *TASK_FIELDS):
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def configure_logging(log_format: str, level: int | str = logging.INFO) -> None:
    """Send every logger's records to stderr through one handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(StageFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(name)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def use_for_celery(log_format: str, level: str = "INFO") -> None:
    """JSON logs for a worker about to start: configured now, so that warnings Celery gives before its
    own logging setup come out as JSON too, and kept (Celery skips its setup while a `setup_logging`
    receiver is connected). Text keeps Celery's own format."""
    if log_format != "json":
        return
    configure_logging(log_format, level.upper())

    def _setup(loglevel: int | str | None = None, **_: Any) -> None:
        configure_logging(log_format, loglevel or level.upper())

    setup_logging.connect(_setup, weak=False)


@task_prerun.connect
def _bind_task(
    task_id: str | None = None, task: Any = None, args: Sequence[Any] | None = None, **_: Any
) -> None:
    """Bind the task and, for stage tasks, its job, item, layer, slot and model (a dispatch: its job)."""
    clear_stage()
    name = getattr(task, "name", None)
    info = stage_of(getattr(task, "request", None))
    fields: dict[str, Any] = dict(info.fields()) if info else {}
    if info is None and name == TASK_DISPATCH and args:
        fields["job"] = args[0]
    bind_stage(task=name, task_id=task_id, **fields)


@task_postrun.connect
def _unbind_task(**_: Any) -> None:
    clear_stage()
