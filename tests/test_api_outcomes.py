"""The API says what is wrong: an unmigrated schema, a broker down at submit (the job is kept and
finishes once the broker is back and the sweep runs), an Idempotency-Key reused for another request.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from db.migrate import private_schema
from orchestrator.api.app import create_app
from orchestrator.api.bodies import NOTICE_HEADER
from orchestrator.embedded import free_port
from orchestrator.settings import get_settings
from tests.conftest import api_server, stop_process, wait_for_job

RECIPE: dict[str, Any] = {
    "models": {"apio-a": {"engine": "synthetic"}},
    "layers": [{"proposers": [{"model": "apio-a"}, {"model": "apio-a", "sampling": {"seed": 2}}]}],
    "aggregator": {"model": "apio-a"},
}


def body(count: int, prefix: str = "prompt") -> dict[str, Any]:
    return {"recipe": RECIPE, "items": [{"instruction": f"{prefix} {i}"} for i in range(count)]}


@pytest.fixture()
def empty_schema(services: dict[str, str]) -> Iterator[str]:
    """A database URL whose schema exists but was never migrated."""
    with private_schema(os.environ["DATABASE_URL"], "slimmoa_bare", migrated=False) as url:
        yield url


def test_an_unmigrated_schema_is_503_naming_the_command(empty_schema: str) -> None:
    settings = get_settings().model_copy(update={"database_url": empty_schema, "api_token": ""})
    with TestClient(create_app(settings)) as client:
        for response in (client.post("/v1/jobs", json=body(2)), client.get("/v1/jobs")):
            assert response.status_code == 503, response.text
            assert (
                response.json()["detail"] == "the database schema is not migrated: run `slimmoa db upgrade`"
            )
        assert "schema not migrated" in client.get("/readyz").json()["database"]


def test_an_idempotency_key_reused_for_another_request_is_422(api: httpx.Client) -> None:
    key = {"Idempotency-Key": f"key-{uuid.uuid4().hex}"}
    first = api.post("/v1/jobs", json=body(2), headers=key)
    assert first.status_code == 201, first.text
    again = api.post("/v1/jobs", json=body(2), headers=key)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    other = api.post("/v1/jobs", json=body(3, "other"), headers=key)
    assert other.status_code == 422, other.text
    detail = other.json()["detail"]
    assert key["Idempotency-Key"] in detail and first.json()["id"] in detail and "different request" in detail


@contextmanager
def redis_server(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of this test's own on a fixed port (so that it can be stopped and started again)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield process
    finally:
        stop_process(process, timeout=10)


@pytest.fixture()
def own_schema(services: dict[str, str]) -> Iterator[str]:
    """A migrated schema of the test's own: the recovery sweep it runs sees no other test's jobs."""
    with private_schema(os.environ["DATABASE_URL"], "slimmoa_own") as url:
        yield url


def test_a_submit_while_the_broker_is_down_is_kept_and_finishes_after_the_sweep(
    services: dict[str, str], own_schema: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **services,
        "DATABASE_URL": own_schema,
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "SLIMMOA_API_TOKEN": "",
    }
    with redis_server(port, tmp_path) as broker:
        worker_log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--concurrency", "4"],
            env={**os.environ, **env},
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        try:
            with api_server(env, tmp_path / "api.log") as url:
                stop_process(broker, timeout=10)
                response = httpx.post(f"{url}/v1/jobs", json=body(3), timeout=60)
                assert response.status_code == 202, response.text
                assert "recovery sweep" in response.headers[NOTICE_HEADER]
                job = response.json()
                assert (job["status"], job["total_items"]) == ("queued", 3)

                with redis_server(port, tmp_path):
                    recovered = subprocess.run(
                        [sys.executable, "-m", "orchestrator.cli", "recover", "--grace", "0"],
                        env={**os.environ, **env},
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
                    assert "re-sent 3 proposer chords" in recovered.stdout
                    finished = wait_for_job(own_schema, job["id"], timeout=120)
                    assert (finished.status, finished.items_succeeded) == ("succeeded", 3)
        finally:
            stop_process(worker, timeout=30)
            worker_log.close()


def test_status_watch_with_no_worker_for_the_job_exits_1_saying_so(
    services: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**services, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "SLIMMOA_API_TOKEN": ""}
    with redis_server(port, tmp_path), api_server(env, tmp_path / "api.log") as url:
        job = httpx.post(f"{url}/v1/jobs", json=body(2), timeout=60).json()
        started = time.monotonic()
        watched = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "status", job["id"], "--watch", "--api", url],
            env={**os.environ, **env, "STALL_TIMEOUT_S": "3", "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert watched.returncode == 1, watched.stdout + watched.stderr
    said = " ".join((watched.stdout + watched.stderr).split())
    assert "no live worker serves: apio-a" in said
    assert f"job {job['id']}: nothing moved for 3 s and no live worker takes the work" in said
    assert time.monotonic() - started < 60
