"""Nothing lost: worker kills, a broker flush, a database restart, injected faults, retries, sweeps.

These tests own their services: a private Redis (flushed on purpose) and, for the restart test, a
private Postgres cluster, so they never disturb the shared ones. Workers are real `slimmoa worker`
processes, killed with SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from db import progress, results
from db.migrate import upgrade
from db.models import FINAL_JOB_STATUSES
from db.session import session_scope
from orchestrator.contracts import RetryStage
from orchestrator.errors import NotRetryable
from orchestrator.recovery import retry_job, sweep
from orchestrator.submission import enqueue_job
from tests.conftest import recipe_from_yaml, sample_records, store
from tests.killable import fault_env, finish_with_sweeps, job_state

RECIPE = """
name: reliability
models:
  synth-a: {engine: synthetic, latency_ms: LATENCY, output_tokens: 12}
  flaky: {engine: synthetic, latency_ms: LATENCY, output_tokens: 16}
  synth-c: {engine: synthetic, latency_ms: LATENCY, output_tokens: 20}
  synth-agg: {engine: synthetic, latency_ms: LATENCY, output_tokens: 24}
layers:
  - proposers:
      - {model: synth-a, sampling: {seed: 1}}
      - {model: flaky, sampling: {seed: 2}}
      - {model: synth-c, sampling: {seed: 3}}
aggregator: {model: synth-agg, sampling: {seed: 0}}
min_pool: 2
"""


def recipe(latency_ms: int) -> Any:
    return recipe_from_yaml(RECIPE.replace("LATENCY", str(latency_ms)))


def done_items(database_url: str, job_id: str) -> int:
    job = job_state(database_url, job_id)
    return int(job.items_done)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def assert_complete_and_unique(database_url: str, job_id: str, items: int, slots: int = 3) -> None:
    """Every item has exactly its slots, each once and finished, and exactly one output."""
    with session_scope(database_url) as session:
        assert progress.count_rows(session, job_id) == {
            "items": items,
            "candidates": items * slots,
            "outputs": items,
        }
        for item, output in results.job_outputs(session, job_id):
            assert sorted((c.layer, c.slot) for c in item.candidates) == [(0, s) for s in range(slots)]
            assert all(c.ok for c in item.candidates), [c.error for c in item.candidates]
            assert output is not None and item.status == "succeeded"


def test_killing_the_worker_repeatedly_loses_nothing(database_url: str, worker_factory: Any) -> None:
    worker = worker_factory()
    worker.start()
    job_id = store(database_url, recipe(150), sample_records(40))
    enqueue_job(job_id)
    for kill_at in (5, 15, 25):
        wait_until(lambda n=kill_at: done_items(database_url, job_id) >= n, 120, f"{kill_at} items done")
        worker.kill()
        assert job_state(database_url, job_id).status == "running"
        worker.start()
    job, resent = finish_with_sweeps(database_url, job_id)
    assert resent > 0, "stages lost with the killed worker were re-sent by the sweep"
    assert (job.status, job.items_succeeded) == ("succeeded", 40)
    assert_complete_and_unique(database_url, job_id, 40)


def test_a_flushed_broker_is_recovered_by_the_sweep(
    database_url: str, private_broker: dict[str, str], worker_factory: Any
) -> None:
    worker = worker_factory()
    worker.start()
    job_id = store(database_url, recipe(150), sample_records(30))
    enqueue_job(job_id)
    wait_until(lambda: done_items(database_url, job_id) >= 5, 120, "5 items done")
    redis.Redis.from_url(private_broker["REDIS_URL"]).flushall()
    job, resent = finish_with_sweeps(database_url, job_id)
    assert resent > 0, "stages lost with the broker's queues were re-sent by the sweep"
    assert (job.status, job.items_succeeded) == ("succeeded", 30)
    assert_complete_and_unique(database_url, job_id, 30)


def test_concurrent_sweeps_with_a_live_worker_create_no_duplicates(
    database_url: str, worker_factory: Any
) -> None:
    worker = worker_factory()
    worker.start()
    # Stored but never enqueued: as if the dispatch message was lost with the broker.
    job_id = store(database_url, recipe(50), sample_records(25))
    time.sleep(1.1)
    results: list[Any] = []

    def sweeper() -> None:
        for _ in range(4):
            results.append(sweep(database_url, grace_s=1.0))
            time.sleep(0.3)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.proposer_chords for r in results) >= 25, "every item was picked up by a sweep"
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_succeeded) == ("succeeded", 25)
    assert_complete_and_unique(database_url, job_id, 25)


def candidates_by_slot(
    database_url: str, job_id: str
) -> dict[tuple[int, int, int], tuple[int, str | None, Any]]:
    with session_scope(database_url) as session:
        return {
            (c.item_id, c.layer, c.slot): (c.id, c.text, c.created_at)
            for item, _ in results.job_outputs(session, job_id)
            for c in item.candidates
            if c.ok
        }


def test_injected_faults_are_retried_and_a_retry_reuses_finished_candidates(
    database_url: str, worker_factory: Any
) -> None:
    flaky = worker_factory(fault_env({"flaky": {"error_rate": 0.2}}, retries=8))
    flaky.start()
    job_id = store(database_url, recipe(0), sample_records(30))
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_succeeded) == ("succeeded", 30), "20 % faults are absorbed by retries"
    with session_scope(database_url) as session:
        attempts = [
            c.attempt
            for item, _ in results.job_outputs(session, job_id)
            for c in item.candidates
            if c.model == "flaky"
        ]
    assert max(attempts) > 1, "some flaky generations needed a retry"
    flaky.stop()

    broken = worker_factory(fault_env({"flaky": {"error_rate": 1.0}}, retries=1))
    broken.start()
    job_id = store(database_url, recipe(0), sample_records(12))
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_degraded) == ("succeeded", 12)
    before = candidates_by_slot(database_url, job_id)
    assert len(before) == 24 and all(slot != 1 for _, _, slot in before)
    broken.stop()

    healthy = worker_factory()
    healthy.start()
    with session_scope(database_url) as session:
        result = retry_job(session, job_id)
    assert result.items_reopened == 12 and len(result.proposer_items) == 12
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_succeeded, job.items_degraded) == ("succeeded", 12, 0)
    after = candidates_by_slot(database_url, job_id)
    assert {k: v for k, v in after.items() if k in before} == before, (
        "finished candidates are not regenerated"
    )
    assert len(after) == 36
    assert_complete_and_unique(database_url, job_id, 12)


PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str:
    versions = sorted(PG_BIN.glob(f"*/bin/{name}"))
    if not versions:
        pytest.skip(f"no {name} under {PG_BIN}: a private Postgres cluster cannot be made")
    return str(versions[-1])


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A throw-away Postgres cluster on a free port, and a function that restarts it."""
    from orchestrator.embedded import free_port

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("a private Postgres cluster needs root (to run it as the postgres user)")
    base = Path(f"/tmp/slimmoa-pg-{uuid.uuid4().hex[:8]}")
    base.mkdir()
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, _pg_tool("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    ctl = [
        *as_postgres,
        _pg_tool("pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(base / "log"),
        "-o",
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1",
        "-w",
    ]
    subprocess.run([*ctl, "start"], check=True, capture_output=True)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def restart() -> None:
        subprocess.run([*ctl, "-m", "fast", "restart"], check=True, capture_output=True)

    try:
        upgrade(url)
        yield url, restart
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_workers_reconnect_after_a_database_restart(
    private_postgres: tuple[str, Any], private_broker: dict[str, str], worker_factory: Any
) -> None:
    url, restart = private_postgres
    worker = worker_factory({"DATABASE_URL": url})
    worker.start()
    job_id = store(url, recipe(150), sample_records(30))
    enqueue_job(job_id)

    def progressed(n: int) -> bool:
        try:
            return done_items(url, job_id) >= n
        except OperationalError:
            return False

    wait_until(lambda: progressed(5), 120, "5 items done")
    assert job_state(url, job_id).status == "running"
    restart()
    # The test's own pooled connections died too; the engines' pre-ping replaces them.
    deadline = time.monotonic() + 180
    while True:
        try:
            job = job_state(url, job_id)
            if job.status in FINAL_JOB_STATUSES:
                break
            sweep(url, grace_s=5.0)
        except OperationalError:
            pass
        assert time.monotonic() < deadline, "job did not finish after the database restart"
        time.sleep(1.0)
    assert (job.status, job.items_succeeded) == ("succeeded", 30)
    assert_complete_and_unique(url, job_id, 30)
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from candidates")).scalar() == 90
    engine.dispose()


def test_hung_requests_time_out_and_are_retried(database_url: str, worker_factory: Any) -> None:
    faults = {"flaky": {"hang_rate": 0.3, "hang_seconds": 30}}
    worker = worker_factory({**fault_env(faults, retries=8), "ENGINE_REQUEST_TIMEOUT_S": "0.5"})
    worker.start()
    job_id = store(database_url, recipe(0), sample_records(12))
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_succeeded) == ("succeeded", 12)
    with session_scope(database_url) as session:
        flaky = [
            c
            for item, _ in results.job_outputs(session, job_id)
            for c in item.candidates
            if c.model == "flaky"
        ]
    assert len(flaky) == 12 and max(c.attempt for c in flaky) > 1, "some requests hung and were retried"
    assert_complete_and_unique(database_url, job_id, 12)


def test_a_worker_with_beat_sweeps_by_itself(database_url: str, worker_factory: Any) -> None:
    worker = worker_factory({"RECOVERY_INTERVAL_S": "1", "RECOVERY_GRACE_S": "1"}, args=("--beat",))
    worker.start()
    # Stored but never enqueued: only the periodic sweep can start it.
    job_id = store(database_url, recipe(0), sample_records(5))
    wait_until(
        lambda: job_state(database_url, job_id).status == "succeeded", 120, "the beat sweep to finish the job"
    )
    assert_complete_and_unique(database_url, job_id, 5)


def test_retrying_a_failed_aggregator_keeps_the_pool(database_url: str, worker_factory: Any) -> None:
    broken = worker_factory(fault_env({"synth-agg": {"error_rate": 1.0}}, retries=1))
    broken.start()
    job_id = store(database_url, recipe(0), sample_records(6))
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_failed) == ("failed", 6)
    before = candidates_by_slot(database_url, job_id)
    assert len(before) == 18
    broken.stop()

    healthy = worker_factory()
    healthy.start()
    with session_scope(database_url) as session:
        result = retry_job(session, job_id, stage=RetryStage.AGGREGATOR)
    assert (result.items_reopened, result.proposer_items, len(result.aggregator_items)) == (6, [], 6)
    assert job_state(database_url, job_id).status == "running"
    job, _ = finish_with_sweeps(database_url, job_id)
    assert (job.status, job.items_succeeded, job.items_failed) == ("succeeded", 6, 0)
    assert candidates_by_slot(database_url, job_id) == before, "the pool was not regenerated"
    assert_complete_and_unique(database_url, job_id, 6)
    with pytest.raises(NotRetryable, match="are not items of job"), session_scope(database_url) as session:
        retry_job(session, job_id, item_ids=[-1])
