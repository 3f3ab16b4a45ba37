"""Priorities on one worker: a chat request is answered while a bulk backlog of the same models waits,
also when bulk stages hold every stage thread, and a high-priority bulk job overtakes a low-priority one
submitted before it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from sqlalchemy import func, select

from db.models import Candidate, Item
from db.session import session_scope
from orchestrator.celery_app import TASK_PROPOSER
from orchestrator.celery_app import app as celery_app
from tests.conftest import WORKER_ENV, sample_records

BUSY = """
name: NAME
models:
  NAME-a: {engine: synthetic, latency_ms: 100, output_tokens: 8}
  NAME-b: {engine: synthetic, latency_ms: 100, output_tokens: 8}
  NAME-agg: {engine: synthetic, latency_ms: 100, output_tokens: 8}
layers: [{proposers: [{model: NAME-a}, {model: NAME-b}, {model: NAME-a, sampling: {seed: 3}}]}]
aggregator: {model: NAME-agg}
"""


# Each stage holds its thread for 20 s: a chat request that waited for one would wait that long.
SLOW = """
name: NAME
models:
  NAME-slow: {engine: synthetic, latency_ms: 20000, output_tokens: 8}
layers: [{proposers: [{model: NAME-slow, samples: 3}]}]
aggregator: {model: NAME-slow}
"""


def busy_recipe(api_recipes: Path, name: str, source: str = BUSY) -> str:
    (api_recipes / f"{name}.yaml").write_text(source.replace("NAME", name))
    return name


def submit_bulk(api: httpx.Client, recipe: str, count: int, priority: int) -> str:
    items = [{"id": r.id, "instruction": r.instruction} for r in sample_records(count)]
    response = api.post("/v1/jobs", json={"recipe": recipe, "items": items, "priority": priority})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/jobs/{job_id}").json())


def wait_started(api: httpx.Client, job_id: str) -> None:
    """Until the job's first items are done: its whole backlog is queued and being worked through."""
    deadline = time.monotonic() + 60
    while job(api, job_id)["items_done"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def wait_done(api: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (state := job(api, job_id))["status"] in {"queued", "running"}:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    return state


def test_a_chat_request_is_answered_before_the_bulk_backlog_drains(
    api: httpx.Client, api_url: str, api_recipes: Path, worker: Any
) -> None:
    recipe = busy_recipe(api_recipes, "prio-chat")
    bulk = submit_bulk(api, recipe, 200, priority=9)
    wait_started(api, bulk)
    sdk = OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)
    completion = sdk.chat.completions.create(model=recipe, messages=[{"role": "user", "content": "Quick?"}])
    assert (completion.choices[0].message.content or "").startswith(f"{recipe}-agg:")
    during = job(api, bulk)
    assert during["status"] == "running" and during["items_done"] < 150, (
        f"the chat request waited for the bulk backlog: {during['items_done']} of 200 items done"
    )
    assert wait_done(api, bulk)["status"] == "succeeded"


def test_a_high_priority_bulk_job_overtakes_a_low_priority_one(
    api: httpx.Client, api_recipes: Path, worker: Any
) -> None:
    recipe = busy_recipe(api_recipes, "prio-bulk")
    low = submit_bulk(api, recipe, 150, priority=0)
    wait_started(api, low)
    high = submit_bulk(api, recipe, 30, priority=9)
    high_done = wait_done(api, high)
    low_then = job(api, low)
    assert high_done["status"] == "succeeded"
    assert low_then["status"] == "running" and low_then["items_done"] < 50, (
        f"submitted first, the low-priority job had {low_then['items_done']} of 150 items done"
    )
    assert wait_done(api, low)["status"] == "succeeded"


def running_proposers() -> int:
    active = celery_app.control.inspect(timeout=1.0).active() or {}
    return sum(task["name"] == TASK_PROPOSER for tasks in active.values() for task in tasks)


def stored_candidates(database_url: str, job_id: str) -> int:
    with session_scope(database_url) as session:
        query = select(func.count()).select_from(Candidate).join(Item).where(Item.job_id == job_id)
        return int(session.scalar(query) or 0)


def test_a_chat_request_runs_on_the_reserve_while_bulk_stages_hold_every_thread(
    api: httpx.Client, api_url: str, api_recipes: Path, database_url: str, worker: Any
) -> None:
    threads = int(WORKER_ENV["INFERENCE_CONCURRENCY"])
    slow = busy_recipe(api_recipes, "prio-slow", SLOW)
    bulk = submit_bulk(api, slow, threads // 3 + 2, priority=9)  # more proposer stages than threads
    deadline = time.monotonic() + 30
    while running_proposers() < threads:
        assert time.monotonic() < deadline, "the bulk stages did not fill the stage threads"
        time.sleep(0.2)
    fast = busy_recipe(api_recipes, "prio-reserve")
    sdk = OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        completion = sdk.chat.completions.create(model=fast, messages=[{"role": "user", "content": "Now?"}])
        assert (completion.choices[0].message.content or "").startswith(f"{fast}-agg:")
        # Answered while every bulk stage it found running still ran: it never waited for their threads.
        assert stored_candidates(database_url, bulk) == 0
    finally:
        assert api.post(f"/v1/jobs/{bulk}/cancel").status_code == 200
    assert wait_done(api, bulk, timeout=120)["status"] == "cancelled"
