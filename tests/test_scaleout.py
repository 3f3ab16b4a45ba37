"""Scale-out on Celery itself: inference workers that own models (standing for GPU hosts on one Redis
and Postgres) share a job, each stage on a worker that serves its model; a worker stopped mid-job
(drained, SIGTERM, SIGKILL) hands its work to the other; a model no worker serves is reported."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from db import progress
from db.session import session_scope
from orchestrator.celery_app import TASK_DISPATCH
from orchestrator.celery_app import app as celery_app
from orchestrator.cli import cli
from orchestrator.fleet import live_workers
from orchestrator.recipes import Recipe
from orchestrator.settings import Settings
from tests.conftest import api_server, recipe_from_yaml, sample_records, store, wait_for_job
from tests.processes import Started, private_deployment, slimmoa_process, stage_rows, wait_for_log

# The control worker's recovery sweep: items quiet this long are re-sent unless queued or running.
SWEEP = {"RECOVERY_GRACE_S": "4", "RECOVERY_INTERVAL_S": "3"}


@pytest.fixture(scope="module")
def deployment(
    database_url: str, services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    recipes = tmp_path_factory.mktemp("fleet-recipes")
    with private_deployment(database_url, {**services, "RECIPES_DIR": str(recipes)}) as env:
        yield env


@pytest.fixture(scope="module")
def control(deployment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """Dispatch, layer checks and the recovery sweep (beat), as the compose file's control worker."""
    log = tmp_path_factory.mktemp("control") / "control.log"
    args = [
        "worker",
        "--role",
        "control",
        "--beat",
        "--concurrency",
        "4",
        "--hostname",
        f"ctl-{uuid.uuid4().hex[:6]}@%h",
    ]
    with slimmoa_process(args, {**deployment, **SWEEP}, log) as started:
        wait_for_log(started, "ready.")
        yield started


@contextmanager
def inference_worker(
    env: dict[str, str], tmp_path: Path, name: str, *args: str, **extra: str
) -> Iterator[tuple[Started, str]]:
    """`slimmoa worker --role inference -n NAME@%h ARGS`; yields it and its node name (before the @)."""
    node = f"{name}-{uuid.uuid4().hex[:6]}"
    command = ["worker", "--role", "inference", "--concurrency", "4", "--hostname", f"{node}@%h", *args]
    with slimmoa_process(command, {**env, **extra}, tmp_path / f"{name}.log") as started:
        wait_for_log(started, "ready.")
        yield started, node


def start_job(env: dict[str, str], recipe: Recipe, items: int) -> str:
    job_id = store(env["DATABASE_URL"], recipe, sample_records(items), name="scale-out")
    celery_app.send_task(TASK_DISPATCH, args=(job_id,), queue=env["QUEUE_CONTROL"])
    return job_id


def node_of(worker: str | None) -> str:
    assert worker, "every stored stage names its worker"
    return worker.split("@")[0]


def test_two_workers_with_their_own_models_share_a_job(
    deployment: dict[str, str], control: Started, tmp_path: Path
) -> None:
    p = f"own{uuid.uuid4().hex[:6]}"
    recipe = recipe_from_yaml(
        f"""
name: two-hosts
models:
  {p}-alpha: {{engine: synthetic, latency_ms: 20, memory_gb: 2}}
  {p}-beta: {{engine: synthetic, latency_ms: 20, memory_gb: 2}}
  {p}-agg: {{engine: synthetic, latency_ms: 20, memory_gb: 1}}
layers: [{{proposers: [{{model: {p}-alpha, samples: 2}}, {{model: {p}-beta, samples: 2}}]}}]
aggregator: {{model: {p}-agg}}
"""
    )
    with ExitStack() as stack:
        # Two hosts, each with its own budget; the aggregator's model is on both.
        a = stack.enter_context(
            inference_worker(deployment, tmp_path, "a", "--memory-gb", "4", "--models", f"{p}-alpha,{p}-agg")
        )[1]
        b = stack.enter_context(
            inference_worker(deployment, tmp_path, "b", "--memory-gb", "3", WORKER_MODELS=f"{p}-b*, {p}-agg")
        )[1]
        job_id = start_job(deployment, recipe, 24)
        job = wait_for_job(deployment["DATABASE_URL"], job_id, timeout=120)
    assert (job.status, job.items_succeeded) == ("succeeded", 24)
    serves = {a: {f"{p}-alpha", f"{p}-agg"}, b: {f"{p}-beta", f"{p}-agg"}}
    rows = stage_rows(deployment["DATABASE_URL"], job_id)
    assert len(rows) == 24 * 5
    wrong = [(r.model, r.worker) for r in rows if r.model not in serves.get(node_of(r.worker), set())]
    assert wrong == [], "a stage ran on a worker that does not serve its model"
    proposers = {(r.model, node_of(r.worker)) for r in rows if r.layer is not None}
    assert proposers == {(f"{p}-alpha", a), (f"{p}-beta", b)}


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def node_names(node: str) -> list[str]:
    """The full node name (NAME@HOST) of a live worker, as a control command's destination."""
    replies = celery_app.control.ping(timeout=1.0) or []
    return [name for reply in replies for name in reply if name.startswith(f"{node}@")]


def holds_nothing(node: str) -> bool:
    """The worker consumes none of the stage queues and runs or holds no task."""
    full = node_names(node)
    inspector = celery_app.control.inspect(destination=full, timeout=1.0)
    queues = [q["name"] for qs in (inspector.active_queues() or {}).values() for q in qs]
    busy = [t for ts in (inspector.active() or {}).values() for t in ts]
    held = [t for ts in (inspector.reserved() or {}).values() for t in ts]
    return bool(full) and not [q for q in queues if ".inference." in q] and not busy and not held


@pytest.mark.parametrize("stop", ["drain", "SIGTERM", "SIGKILL"])
def test_a_worker_stopped_mid_job_hands_its_work_to_the_other(
    stop: str, deployment: dict[str, str], control: Started, tmp_path: Path
) -> None:
    p = f"ho{uuid.uuid4().hex[:6]}"
    (Path(deployment["RECIPES_DIR"]) / f"handover-{p}.yaml").write_text(
        f"""
name: handover-{p}
models:
  {p}-x: {{engine: synthetic, latency_ms: 250}}
  {p}-y: {{engine: synthetic, latency_ms: 250}}
  {p}-agg: {{engine: synthetic, latency_ms: 50}}
layers: [{{proposers: [{{model: {p}-x, samples: 2}}, {{model: {p}-y}}]}}]
aggregator: {{model: {p}-agg}}
"""
    )
    recipe = recipe_from_yaml((Path(deployment["RECIPES_DIR"]) / f"handover-{p}.yaml").read_text())
    items, url = 40, deployment["DATABASE_URL"]
    with ExitStack() as stack:
        # Overlapping lists: a recipe's name on one host, a glob on the other.
        started_a, a = stack.enter_context(
            inference_worker(deployment, tmp_path, "a", "--models", f"handover-{p}")
        )
        b = stack.enter_context(inference_worker(deployment, tmp_path, "b", WORKER_MODELS=f"{p}-*"))[1]
        job_id = start_job(deployment, recipe, items)
        wait_until(
            lambda: sum(node_of(r.worker) == a for r in stage_rows(url, job_id)) >= 10,
            60,
            "worker a did not start on the job",
        )
        if stop == "drain":
            # As the runbook drains a host: cancel its consumer of the shared inference queue.
            celery_app.control.cancel_consumer(deployment["QUEUE_INFERENCE"], destination=node_names(a))
            wait_until(lambda: holds_nothing(a), 30, "worker a did not drain")
        else:
            os.kill(started_a.process.pid, getattr(signal, stop))
            started_a.process.wait(timeout=60)
        stopped_at = time.time()
        stored_then = len(stage_rows(url, job_id))
        job = wait_for_job(url, job_id, timeout=150)
        after = stage_rows(url, job_id)
        if stop == "drain":
            assert started_a.process.poll() is None, "a drained worker keeps running until it is stopped"
            view = live_workers(celery_app, Settings(queue_inference=deployment["QUEUE_INFERENCE"]))
            assert {node_of(name) for name in view} == {b}, "a draining worker serves nothing"
    assert stored_then < items * 4, "the stop came before the job was done"
    assert (job.status, job.items_succeeded) == ("succeeded", items)
    keys = [(r.item_id, r.layer, r.slot) for r in after]
    assert len(keys) == len(set(keys)) == items * 4, "every slot and every output stored once"
    assert all(r.ok for r in after)
    late = {node_of(r.worker) for r in after if r.created_at > stopped_at + 0.5}
    assert late == {b}, f"after the stop only b stores stages, got {late}"
    if stop == "SIGTERM":
        assert "Warm shutdown" in started_a.text() or "warm shutdown" in started_a.text().lower()


def test_a_job_whose_model_no_worker_serves_is_reported(
    deployment: dict[str, str], control: Started, tmp_path: Path
) -> None:
    p = f"un{uuid.uuid4().hex[:6]}"
    recipe = {
        "name": "half-served",
        "models": {f"{p}-alpha": {"engine": "synthetic"}, f"{p}-nobody": {"engine": "synthetic"}},
        "layers": [{"proposers": [{"model": f"{p}-alpha"}]}],
        "aggregator": {"model": f"{p}-nobody"},
    }
    items = [{"instruction": f"prompt {i}"} for i in range(3)]
    with (
        inference_worker(deployment, tmp_path, "a", "--models", f"{p}-alpha") as (worker, _),
        api_server(deployment, tmp_path / "api.log") as url,
        httpx.Client(base_url=url, timeout=30) as api,
    ):
        submitted = time.monotonic()
        job_id = api.post("/v1/jobs", json={"recipe": recipe, "items": items}).json()["id"]
        while (reported := api.get(f"/v1/jobs/{job_id}").json())["unserved_models"] != [f"{p}-nobody"]:
            assert time.monotonic() - submitted < 60, f"not reported within a minute: {reported}"
            time.sleep(1)
        took = time.monotonic() - submitted
        shown = CliRunner().invoke(cli, ["status", job_id, "--api", url], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert f"no live worker serves: {p}-nobody" in shown.stdout
        # The served model's stages run meanwhile (they may still be queued when the report comes).
        deadline = time.monotonic() + 60
        while True:
            with session_scope(deployment["DATABASE_URL"]) as session:
                stored = progress.count_rows(session, job_id)["candidates"]
            if stored == 3:
                break
            assert time.monotonic() < deadline, f"served stages still run: {stored} of 3 candidates"
            time.sleep(0.5)

        worker.process.terminate()
        worker.process.wait(timeout=60)
        deadline = time.monotonic() + 60
        while api.get(f"/v1/jobs/{job_id}").json()["unserved_models"] != [f"{p}-alpha", f"{p}-nobody"]:
            assert time.monotonic() < deadline, "a stopped worker's models are not reported"
            time.sleep(1)
        assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        assert api.get(f"/v1/jobs/{job_id}").json()["unserved_models"] == [], "an ended job waits for nothing"
    print(f"unserved model reported {took:.1f} s after submit")
