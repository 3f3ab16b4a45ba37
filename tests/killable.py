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

from db import progress
from db.models import FINAL_JOB_STATUSES
from db.session import session_scope
from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.recovery import sweep
from orchestrator.settings import get_settings

__all__ = ["Worker", "fault_env", "finish_with_sweeps", "job_state", "point_app_at"]


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
