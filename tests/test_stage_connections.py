"""Stage statements share a few connections per process, whatever the number of threads: a worker
sized to its engine's batch runs a hundred stage threads or more against a Postgres that allows 100
connections in all."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text

from db.session import STAGE_CONNECTIONS, statement_scope

THREADS = 48
QUERY = text("SELECT pg_backend_pid()")


def _backends(database_url: str, hold_s: float) -> list[int]:
    """Each thread's backend pid, every thread inside a statement scope at about the same time."""
    ready = threading.Barrier(THREADS)

    def stage(_: int) -> int:
        ready.wait()
        with statement_scope(database_url) as db:
            [(pid,)] = db.rows(QUERY, {})
            time.sleep(hold_s)  # a stage's statements, stretched so that every thread wants one at once
            return int(pid)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(stage, range(THREADS)))


def test_threads_share_at_most_stage_connections(database_url: str) -> None:
    first = _backends(database_url, hold_s=0.05)
    assert len(first) == THREADS, "every thread ran its statement"
    assert 1 < len(set(first)) <= STAGE_CONNECTIONS, "threads waited for a shared connection"
    again = _backends(database_url, hold_s=0.0)
    assert set(again) <= set(first), "the connections are kept and reused, none opened anew"
