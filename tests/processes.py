"""Real processes for deployment tests: a private Postgres schema and queue names, `slimmoa` commands
started as they would run on a host, and what the record says about where each stage ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from db.migrate import private_schema
from db.models import Candidate, Item, Output
from db.session import session_scope
from tests.conftest import stop_process

__all__ = [
    "StageRow",
    "Started",
    "private_deployment",
    "slimmoa_process",
    "stage_rows",
    "wait_for_log",
]


@contextmanager
def private_deployment(session_url: str, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A migrated schema and queue names of its own: its workers see no other test's jobs or tasks, and
    its recovery sweep re-sends none of theirs."""
    prefix = f"slimmoa.test.{uuid.uuid4().hex[:8]}"
    with private_schema(session_url, "slimmoa_deploy") as url:
        yield {
            **env,
            "DATABASE_URL": url,
            "QUEUE_CONTROL": f"{prefix}.control",
            "QUEUE_INFERENCE": f"{prefix}.inference",
        }


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    log: Path
    stderr: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for_log(started: Started, needle: str, timeout: float = 90.0) -> None:
    """Wait until the process logged `needle`; fail with its last lines if it died or took too long."""
    deadline = time.monotonic() + timeout
    while needle not in started.text() + (
        started.stderr.read_text(errors="replace") if started.stderr else ""
    ):
        if started.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"{started.log.name}: no {needle!r} within {timeout:.0f} s:\n{started.text()[-3000:]}"
            )
        time.sleep(0.2)


@contextmanager
def slimmoa_process(
    args: Sequence[str],
    env: dict[str, str],
    log: Path,
    *,
    split_stderr: bool = False,
    stop_timeout: float = 60,
) -> Iterator[Started]:
    """`slimmoa ARGS` as a child process (SIGTERM, then SIGKILL after `stop_timeout`, at the end)."""
    stderr_path = log.with_suffix(".stderr") if split_stderr else None
    with log.open("wb") as out:
        errors = stderr_path.open("wb") if stderr_path else None
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=errors or subprocess.STDOUT,
        )
        if errors:
            errors.close()
    started = Started(process, log, stderr_path)
    try:
        yield started
    finally:
        if process.poll() is None:
            stop_process(process, timeout=stop_timeout)
        sys.stderr.write(f"{args[0]} log: {log}\n")


@dataclass(frozen=True)
class StageRow:
    """One stored stage: a candidate (layer, slot) or the output (layer and slot None)."""

    item_id: int
    layer: int | None
    slot: int | None
    model: str
    worker: str | None
    ok: bool
    created_at: float


def stage_rows(database_url: str, job_id: str) -> list[StageRow]:
    """Every candidate and output of a job, with the worker node that stored it."""
    with session_scope(database_url) as session:
        candidates = session.execute(
            select(
                Candidate.item_id,
                Candidate.layer,
                Candidate.slot,
                Candidate.model,
                Candidate.worker,
                Candidate.error,
                Candidate.created_at,
            )
            .join(Item)
            .where(Item.job_id == job_id)
        ).all()
        outputs = session.execute(
            select(Output.item_id, Output.model, Output.worker, Output.created_at)
            .join(Item)
            .where(Item.job_id == job_id)
        ).all()
    rows = [
        StageRow(item, layer, slot, model, worker, error is None, created.timestamp())
        for item, layer, slot, model, worker, error, created in candidates
    ]
    rows += [
        StageRow(item, None, None, model, worker, True, created.timestamp())
        for item, model, worker, created in outputs
    ]
    return rows
