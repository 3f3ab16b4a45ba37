"""Shared fixtures: a migrated Postgres schema per test session, the machine's Redis, a real worker.

Each test session gets its own Postgres schema and its own queue names, so runs never see each
other's rows or tasks. Tests isolate by job: every test submits its own job and reads only its rows.
"""

from __future__ import annotations

import json
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
import yaml
from sqlalchemy import func, select

from db.migrate import private_schema
from db.models import Item, Job
from db.session import session_scope
from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.contracts import InputRecord
from orchestrator.embedded import free_port, private_redis
from orchestrator.recipes import Recipe, parse_recipe
from orchestrator.settings import PROJECT_ROOT, get_settings
from orchestrator.submission import Submission, enqueue_job, store_job
from tests.killable import Worker, point_app_at

SAMPLE = PROJECT_ROOT / "examples" / "alpaca_eval_sample.jsonl"
# Models the session worker fails on purpose (fault injection is a worker setting, never a recipe field).
FAULTS = {
    "always-fails": {"error_rate": 1.0},
    "broken-agg": {"error_rate": 1.0},
    # Exceptions of a kind no part of the service expects, at load and at every request.
    "odd-load": {"load_exception": "LookupError"},
    "odd-generate": {"generate_exception": "AttributeError"},
}
WORKER_ENV = {
    "SLIMMOA_FAULTS": json.dumps(FAULTS),
    "STAGE_MAX_RETRIES": "2",
    "STAGE_RETRY_BACKOFF_S": "0.05",
    "INFERENCE_CONCURRENCY": "16",
    "WORKER_METRICS_PORT": str(free_port()),
}


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: run the tests with `make test` (it points at the machine's services)"
        )
    return value


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, migrated schema in the test database; dropped at the end of the session."""
    with private_schema(_require("DATABASE_URL"), "slimmoa_test") as url:
        yield url


@pytest.fixture(scope="session")
def services(database_url: str) -> dict[str, str]:
    """Environment that points this process and its workers at the test database, Redis and queues."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": _require("REDIS_URL"),
        "QUEUE_CONTROL": f"slimmoa.test.{suffix}.control",
        "QUEUE_INFERENCE": f"slimmoa.test.{suffix}.inference",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    configure(celery_app, get_settings())
    return env


@pytest.fixture(scope="session")
def worker(
    services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    """One real `slimmoa worker` for the session (threads pool, all queues, fault injection on)."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "info"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env={**os.environ, **services, **WORKER_ENV}, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while not celery_app.control.ping(timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"worker did not start:\n{log_path.read_text()[-3000:]}")
    yield process
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    sys.stderr.write(f"worker log: {log_path}\n")


class Switch:
    """The affinity scheduler's hold on Celery's consumer, remembering only what it was told."""

    def __init__(self) -> None:
        self.consumed: set[str] = set()
        self.reserve_open = False

    def add(self, queue: str) -> None:
        self.consumed.add(queue)

    def cancel(self, queue: str) -> None:
        self.consumed.discard(queue)

    def reserve(self, open_: bool) -> None:
        self.reserve_open = open_


def sample_records(count: int) -> list[InputRecord]:
    lines = SAMPLE.read_text().splitlines()
    records = [InputRecord.model_validate(json.loads(line)) for line in lines]
    return [r.model_copy(update={"id": f"p{i}"}) for i, r in enumerate((records * 10)[:count])]


def recipe_from_yaml(source: str) -> Recipe:
    return parse_recipe(yaml.safe_load(source))


def store(database_url: str, recipe: Recipe, records: list[InputRecord], name: str | None = None) -> str:
    """Store a job and its items (committed); nothing is enqueued."""
    with session_scope(database_url) as session:
        return store_job(session, Submission(recipe, records, name)).id


def submit(database_url: str, recipe: Recipe, records: list[InputRecord]) -> str:
    job_id = store(database_url, recipe, records, name="test")
    enqueue_job(job_id)
    return job_id


def wait_for_job(database_url: str, job_id: str, timeout: float = 300.0) -> Any:
    """Poll the record until the job reaches a final status; returns the job row."""
    from db import progress
    from db.models import FINAL_JOB_STATUSES

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(database_url) as session:
            job = progress.get_job(session, job_id)
            assert job is not None
            if job.status in FINAL_JOB_STATUSES:
                return job
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} still {job.status} after {timeout:.0f} s ({job.items_done}/{job.total_items})"
            )
        time.sleep(0.25)


def stored(database_url: str) -> tuple[int, int]:
    """How many jobs and items the session's schema holds: a refused input must store none."""
    with session_scope(database_url) as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        items = session.scalar(select(func.count()).select_from(Item)) or 0
        return jobs, items


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`slimmoa run` in `cwd` with no service URLs: a private Redis and ./slimmoa.db."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def project_path(*parts: str) -> Path:
    return PROJECT_ROOT.joinpath(*parts)


@contextmanager
def api_server(services: dict[str, str], log_path: Path, **env: str) -> Iterator[str]:
    """A live `slimmoa api` (uvicorn) on a free loopback port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "orchestrator.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env={**os.environ, **services, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the API did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        stop_process(process, timeout=30)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a worker's warm shutdown), then SIGKILL if it has not ended after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def api_recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipes plus `api-synthetic`: the synthetic recipe with model names of its own, and
    `api-sequential`: the same with a sequential aggregator.

    The session worker keeps one engine per model definition; jobs through the API use their own
    names, so they never add a second definition of a model other tests count engines of.
    """
    folder = tmp_path_factory.mktemp("recipes")
    for recipe in project_path("recipes").glob("*.yaml"):
        shutil.copy(recipe, folder / recipe.name)
    synthetic = project_path("recipes", "synthetic.yaml").read_text()
    renamed = synthetic.replace("name: synthetic", "name: api-synthetic").replace("synth-", "api-synth-")
    (folder / "api-synthetic.yaml").write_text(renamed)
    # The same models, the aggregator reading its pool of three two at a time (one step, then the answer).
    sequential = yaml.safe_load(renamed)
    sequential["name"] = "api-sequential"
    sequential["aggregator"] |= {"mode": "sequential", "window": 2}
    (folder / "api-sequential.yaml").write_text(yaml.safe_dump(sequential))
    return folder


@pytest.fixture(scope="session")
def api_url(
    services: dict[str, str], api_recipes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session's live API, without a token."""
    env = {"SLIMMOA_API_TOKEN": "", "RECIPES_DIR": str(api_recipes)}
    with api_server(services, tmp_path_factory.mktemp("api") / "api.log", **env) as url:
        yield url


@pytest.fixture()
def api(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def private_broker(database_url: str, services: dict[str, str]) -> Iterator[dict[str, str]]:
    """A private Redis for this module; the app points back at the shared one afterwards."""
    with private_redis() as url:
        env = {**services, "REDIS_URL": url, "DATABASE_URL": database_url}
        point_app_at(env)
        yield env
    point_app_at(services)


@pytest.fixture
def worker_factory(private_broker: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    workers: list[Worker] = []

    def make(env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Worker:
        worker = Worker({**private_broker, **(env or {})}, tmp_path / f"worker{len(workers)}.log", args)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()
