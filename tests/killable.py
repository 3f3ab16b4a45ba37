"""Workers a test can kill: real `slimmoa worker` processes on a private broker, and the recovery
sweep run until a job ends (what beat does in production)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db import progress
from db.models import FINAL_JOB_STATUSES, Item
from db.session import session_scope
from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.contracts import InputRecord
from orchestrator.recipes import Recipe
from orchestrator.recovery import retry_job, sweep
from orchestrator.settings import get_settings
from orchestrator.submission import Submission, enqueue_job, store_job

__all__ = [
    "Worker",
    "fault_env",
    "finish_with_sweeps",
    "job_state",
    "point_app_at",
    "retry_aggregators",
    "run_with_flaky_model",
]


def point_app_at(env: dict[str, str]) -> None:
    """Send this process's tasks to other services: new settings, fresh broker and backend pools."""
    os.environ.update(env)
    get_settings.cache_clear()
    configure(celery_app, get_settings())
    celery_app._pool = None
    celery_app.amqp._producer_pool = None
    celery_app._local = threading.local()


class Worker:
    """A real `slimmoa worker` process that a test can kill and start again."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> None:
        command = [sys.executable, "-m", "orchestrator.cli", "worker", "--concurrency", "8", *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env={**os.environ, **self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while not celery_app.control.ping(timeout=1.0):
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker did not answer a ping in 60 s"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        # The broker still lists the dead worker for a moment; inspect must not count on it.
        time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def fault_env(faults: dict[str, dict[str, float]], retries: int) -> dict[str, str]:
    """Worker environment with injected engine faults and quick retries."""
    return {
        "SLIMMOA_FAULTS": json.dumps(faults),
        "STAGE_MAX_RETRIES": str(retries),
        "STAGE_RETRY_BACKOFF_S": "0.02",
    }


def job_state(database_url: str, job_id: str) -> Any:
    with session_scope(database_url) as session:
        return progress.get_job(session, job_id)


def finish_with_sweeps(database_url: str, job_id: str, timeout: float = 180.0) -> tuple[Any, int]:
    """Run the recovery sweep until the job ends (what beat does in production); returns the job and
    how many stages the sweeps re-sent."""
    deadline = time.monotonic() + timeout
    resent = 0
    while True:
        job = job_state(database_url, job_id)
        if job.status in FINAL_JOB_STATUSES:
            return job, resent
        assert time.monotonic() < deadline, (
            f"job {job_id} still {job.status} ({job.items_done}/{job.total_items})"
        )
        result = sweep(database_url, grace_s=1.0)
        resent += result.proposer_chords + result.layer_checks + result.aggregators
        time.sleep(1.0)


def run_with_flaky_model(
    database_url: str, worker_factory: Any, recipe: Recipe, records: list[InputRecord], model: str
) -> tuple[str, dict[int, str | None]]:
    """Run a job to its end on a worker whose `model` fails 30% of its requests, without retries;
    returns the job id and the errors of its failed items (some must have failed)."""
    flaky = worker_factory(fault_env({model: {"error_rate": 0.3}}, retries=0))
    flaky.start()
    with session_scope(database_url) as session:
        job_id = store_job(session, Submission(recipe, records, None)).id
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    flaky.stop()
    assert job.status in {"partial", "failed"} and job.items_failed > 0
    with session_scope(database_url) as session:
        failed = select(Item).where(Item.job_id == job_id, Item.status == "failed")
        return job_id, {item.id: item.error for item in session.scalars(failed)}


def retry_aggregators(database_url: str, worker_factory: Any, job_id: str, failed: dict[int, Any]) -> None:
    """Retry a job whose failed items failed at their aggregator, on a healthy worker, to success: they
    get their aggregator alone (their pools are complete)."""
    worker_factory().start()
    with session_scope(database_url) as session:
        result = retry_job(session, job_id)
    assert sorted(result.aggregator_items) == sorted(failed) and result.proposer_items == []
    job, _ = finish_with_sweeps(database_url, job_id)
    assert job.status == "succeeded" and job.items_failed == 0 and job.items_succeeded == job.total_items
