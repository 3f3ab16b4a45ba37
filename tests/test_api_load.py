"""A 10,000-item job submitted in one request; the API keeps answering while it is stored and dispatched."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import sample_records

ITEMS = 10_000
RECIPE: dict[str, Any] = {
    "name": "api-load",
    "models": {"a": {"engine": "synthetic"}, "agg": {"engine": "synthetic"}},
    "layers": [{"proposers": [{"model": "a", "samples": 2, "sampling": {"seed": 1}}]}],
    "aggregator": {"model": "agg"},
}


def probe(api: httpx.Client) -> int:
    return api.get("/healthz", timeout=10).status_code


def test_ten_thousand_items_in_one_request(
    api: httpx.Client,
    services: dict[str, str],
    worker: subprocess.Popen[bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = [r.model_dump(exclude_none=True) for r in sample_records(20)]
    body = {"recipe": RECIPE, "items": [{**prompts[i % 20], "id": f"q{i}"} for i in range(ITEMS)]}
    answer: dict[str, Any] = {}

    def send() -> None:
        started = time.perf_counter()
        with httpx.Client(base_url=str(api.base_url), timeout=300) as own:
            answer["response"] = own.post("/v1/jobs", json=body)
        answer["seconds"] = time.perf_counter() - started

    sender = threading.Thread(target=send)
    sender.start()
    during_submit = []
    while sender.is_alive():
        during_submit.append(probe(api))
    sender.join()
    response = answer["response"]
    assert response.status_code == 201, response.text
    job = response.json()
    with capsys.disabled():
        print(f"\n10,000-item submit accepted in {answer['seconds']:.2f} s")
    assert job["total_items"] == ITEMS
    assert during_submit and set(during_submit) == {200}, "/healthz answered while the submit was processed"

    # The worker dispatches the job: the API keeps answering health probes and progress reads meanwhile.
    while (detail := api.get(f"/v1/jobs/{job['id']}").json())["status"] == "queued":
        assert probe(api) == 200
    assert detail["status"] == "running"
    for _ in range(5):
        assert probe(api) == 200
        assert api.get(f"/v1/jobs/{job['id']}/items", params={"limit": 1}).json()["count"] == ITEMS

    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] in {"cancelled", "succeeded"}
    # Let the worker drain what was dispatched before the cancel (those stages return early), so the
    # next tests do not queue behind it.
    broker = redis.Redis.from_url(services["REDIS_URL"])
    deadline = time.monotonic() + 300
    while any(broker.llen(services[q]) for q in ("QUEUE_CONTROL", "QUEUE_INFERENCE")):
        assert time.monotonic() < deadline, "the queues did not drain after the cancel"
        time.sleep(0.5)
