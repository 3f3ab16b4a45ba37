"""The `/v1` API on a live uvicorn, the session worker, Postgres and Redis (synthetic engine)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from db import submission as db_submission
from db.session import session_scope
from orchestrator.recipes import parse_recipe
from orchestrator.submission import Submission, store_job, submit_job
from tests.conftest import sample_records, wait_for_job

SLOW_AGGREGATOR: dict[str, Any] = {
    "name": "api-slow",
    "models": {
        "a": {"engine": "synthetic", "latency_ms": 50, "output_tokens": 8},
        "b": {"engine": "synthetic", "latency_ms": 50, "output_tokens": 8},
        "agg": {"engine": "synthetic", "latency_ms": 1200, "output_tokens": 12},
    },
    "layers": [{"proposers": [{"model": "a", "samples": 2, "sampling": {"seed": 1}}, {"model": "b"}]}],
    "aggregator": {"model": "agg", "sampling": {"seed": 0}},
}
FAST: dict[str, Any] = {
    "name": "api-fast",
    "models": {"a": {"engine": "synthetic"}, "agg": {"engine": "synthetic"}},
    "layers": [{"proposers": [{"model": "a", "samples": 2, "sampling": {"seed": 1}}]}],
    "aggregator": {"model": "agg"},
}


def items(count: int) -> list[dict[str, Any]]:
    return [r.model_dump(exclude_none=True) for r in sample_records(count)]


def submit_json(api: httpx.Client, recipe: Any, count: int, **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/jobs", json={"recipe": recipe, "items": items(count), **extra})
    assert response.status_code == 201, response.text
    return response.json()


def wait_until_final(api: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "partial", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, (
            f"job still {job['status']}: {job['items_done']}/{job['total_items']}"
        )
        time.sleep(0.2)


def results(api: httpx.Client, job_id: str, fmt: str) -> list[Any]:
    response = api.get(f"/v1/jobs/{job_id}/results", params={"format": fmt})
    assert response.status_code == 200, response.text
    if fmt == "alpaca_eval":
        assert response.headers["content-type"].startswith("application/json")
        return list(json.loads(response.text))
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def test_submit_progress_results_while_running_then_succeeded(
    api: httpx.Client, worker: subprocess.Popen[bytes]
) -> None:
    total = 40
    job = submit_json(api, SLOW_AGGREGATOR, total, name="slow")
    assert (job["total_items"], job["items_done"], job["name"]) == (total, 0, "slow")
    assert job["status"] in {"queued", "running"}, "dispatch may start before the answer is read"

    seen: list[tuple[int, int]] = []
    while True:
        detail = api.get(f"/v1/jobs/{job['id']}").json()
        proposers = detail["progress"]["stages"][0]
        seen.append((proposers["finished"], detail["items_done"]))
        if 0 < detail["items_done"] < total:
            break
        assert detail["status"] in {"queued", "running"}, detail
        time.sleep(0.05)
    for column in (0, 1):
        assert [row[column] for row in seen] == sorted(row[column] for row in seen), "progress only grows"
    assert len(set(seen)) > 1, "progress moved while we watched"
    assert detail["status"] == "running" and detail["started_at"] is not None
    stages = detail["progress"]["stages"]
    assert [(s["stage"], s["layer"], s["expected"]) for s in stages] == [
        ("proposers", 0, 3 * total),
        ("aggregator", None, total),
    ]
    assert detail["progress"]["eta_seconds"] > 0 and detail["progress"]["items_per_second"] > 0
    assert detail["progress"]["output_tokens"] > 0
    done_before = detail["items_done"]

    partial = results(api, job["id"], "jsonl")
    after = api.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "running", "the export was taken while the job ran"
    assert done_before <= len(partial) <= after["items_done"] < total
    assert all(line["output"].startswith("agg:") for line in partial)

    final = wait_until_final(api, job["id"])
    assert (final["status"], final["items_succeeded"], final["finished_at"] is not None) == (
        "succeeded",
        total,
        True,
    )
    assert final["progress"]["eta_seconds"] is None
    assert final["progress"]["items"] == {"pending": 0, "succeeded": total, "degraded": 0, "failed": 0}
    assert [(s["finished"], s["failed"]) for s in final["progress"]["stages"]] == [(3 * total, 0), (total, 0)]

    lines = results(api, job["id"], "jsonl")
    records = sample_records(total)
    assert [line["id"] for line in lines] == [r.id for r in records]
    by_id = {line["id"]: line for line in lines}
    assert [by_id[line["id"]] for line in partial] == partial, "finished results do not change"
    alpaca = results(api, job["id"], "alpaca_eval")
    assert [set(a) for a in alpaca] == [{"id", "instruction", "output", "generator", "dataset"}] * total
    assert {a["generator"] for a in alpaca} == {"slimmoa-api-slow"}
    assert [a["output"] for a in alpaca] == [line["output"] for line in lines]
    pools = results(api, job["id"], "pools")
    assert [[c["model"] for c in p["candidates"]] for p in pools] == [["a", "a", "b"]] * total
    assert [p["status"] for p in pools] == ["succeeded"] * total


def test_item_with_its_pool_per_layer(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    two_layers = {**FAST, "layers": FAST["layers"] * 2}
    job = submit_json(api, two_layers, 2)
    wait_until_final(api, job["id"])
    page = api.get(f"/v1/jobs/{job['id']}/items").json()
    item_id = page["data"][1]["id"]
    item = api.get(f"/v1/jobs/{job['id']}/items/{item_id}").json()
    assert (item["position"], item["status"], item["external_id"]) == (1, "succeeded", "p1")
    assert [(layer["layer"], [c["slot"] for c in layer["candidates"]]) for layer in item["layers"]] == [
        (0, [0, 1]),
        (1, [0, 1]),
    ]
    assert all(c["text"] and c["error"] is None for layer in item["layers"] for c in layer["candidates"])
    assert item["output"]["model"] == "agg" and item["output"]["pool_size"] == 2

    other = submit_json(api, FAST, 1)
    response = api.get(f"/v1/jobs/{other['id']}/items/{item_id}")
    assert response.status_code == 404
    assert response.json()["detail"] == f"item {item_id} not found in job {other['id']}"


def test_pagination_of_jobs_and_items(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    job = submit_json(api, FAST, 23)
    wait_until_final(api, job["id"])
    positions, offset = [], 0
    while True:
        page = api.get(f"/v1/jobs/{job['id']}/items", params={"offset": offset, "limit": 10}).json()
        assert page["count"] == 23
        positions += [item["position"] for item in page["data"]]
        if len(page["data"]) < 10:
            break
        offset += 10
    assert positions == list(range(23))
    succeeded = api.get(f"/v1/jobs/{job['id']}/items", params={"status": "succeeded", "limit": 5}).json()
    assert (succeeded["count"], len(succeeded["data"])) == (23, 5)
    assert api.get(f"/v1/jobs/{job['id']}/items", params={"status": "pending"}).json() == {
        "data": [],
        "count": 0,
    }

    newer = submit_json(api, FAST, 1)
    first = api.get("/v1/jobs", params={"limit": 1}).json()
    assert first["count"] >= 2 and [j["id"] for j in first["data"]] == [newer["id"]], "newest first"
    second = api.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert second["data"][0]["id"] != newer["id"]
    wait_until_final(api, newer["id"])
    by_status = api.get("/v1/jobs", params={"status": "succeeded", "limit": 1000}).json()
    assert {job["id"], newer["id"]} <= {j["id"] for j in by_status["data"]}
    assert {j["status"] for j in by_status["data"]} == {"succeeded"}


def test_cancel_mid_job_stops_new_outputs(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    slow = {**SLOW_AGGREGATOR, "models": {**SLOW_AGGREGATOR["models"]}}
    slow["models"]["agg"] = {"engine": "synthetic", "latency_ms": 400}
    total = 80
    job = submit_json(api, slow, total)
    while api.get(f"/v1/jobs/{job['id']}").json()["items_done"] == 0:
        time.sleep(0.05)
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled", "cancel is idempotent"

    time.sleep(2.0)  # stages already running when the job was cancelled finish (400 ms each)
    outputs = len(results(api, job["id"], "jsonl"))
    time.sleep(2.0)
    after = api.get(f"/v1/jobs/{job['id']}").json()
    assert len(results(api, job["id"], "jsonl")) == outputs < total, "no queued stage ran after the cancel"
    assert after["status"] == "cancelled" and after["finished_at"] is not None
    assert after["progress"]["items"]["pending"] == total - outputs

    retry = api.post(f"/v1/jobs/{job['id']}/retry")
    assert retry.status_code == 409 and retry.json()["detail"] == f"job {job['id']} was cancelled"


def test_cancel_or_retry_of_a_finished_job(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    job = submit_json(api, FAST, 2)
    wait_until_final(api, job["id"])
    response = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {job['id']} already ended succeeded"
    retried = api.post(f"/v1/jobs/{job['id']}/retry", json={"stage": "all"})
    assert retried.status_code == 200
    assert retried.json() == {
        "job_id": job["id"],
        "items_reopened": 0,
        "proposer_items": [],
        "aggregator_items": [],
    }
    unknown = api.post(f"/v1/jobs/{job['id']}/retry", json={"items": [2**62]})
    assert unknown.status_code == 409 and "are not items of job" in unknown.json()["detail"]


def test_retry_reruns_the_failed_aggregator(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    broken = {**FAST, "models": {"a": {"engine": "synthetic"}, "broken-agg": {"engine": "synthetic"}}}
    broken["aggregator"] = {"model": "broken-agg"}
    job = submit_json(api, broken, 2)
    assert wait_until_final(api, job["id"])["status"] == "failed"
    response = api.post(f"/v1/jobs/{job['id']}/retry", json={"stage": "aggregator"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["items_reopened"], body["proposer_items"], len(body["aggregator_items"])) == (2, [], 2)
    assert wait_until_final(api, job["id"])["status"] == "failed", "the fault is still injected"


def test_idempotent_submit_returns_the_first_job(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"recipe": FAST, "items": items(3)}
    first = api.post("/v1/jobs", json=body, headers=key)
    again = api.post("/v1/jobs", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    unkeyed = api.post("/v1/jobs", json=body)
    assert unkeyed.status_code == 201 and unkeyed.json()["id"] not in {first.json()["id"], other.json()["id"]}
    wait_until_final(api, first.json()["id"])
    assert api.get(f"/v1/jobs/{first.json()['id']}/items").json()["count"] == 3


def test_upload_jsonl_and_alpaca_eval_json(api: httpx.Client, worker: subprocess.Popen[bytes]) -> None:
    records = items(3)
    jsonl = "".join(json.dumps(r) + "\n" for r in records).encode()
    listed = json.dumps(records, indent=2).encode()
    for filename, content in (("prompts.jsonl", jsonl), ("alpaca_eval.json", listed)):
        response = api.post(
            "/v1/jobs",
            files={"file": (filename, content)},
            data={"recipe": "api-synthetic", "name": filename, "priority": "3"},
        )
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["total_items"], job["recipe_name"], job["priority"], job["name"]) == (
            3,
            "api-synthetic",
            3,
            filename,
        )
        wait_until_final(api, job["id"])
        assert [line["id"] for line in results(api, job["id"], "jsonl")] == ["p0", "p1", "p2"]


def test_recipes_and_health(api: httpx.Client) -> None:
    recipes = api.get("/v1/recipes").json()
    by_name = {r["name"]: r for r in recipes["data"]}
    assert recipes["count"] == len(by_name) and {"embedded", "synthetic", "slimmoa-a100"} <= set(by_name)
    assert by_name["synthetic"]["layers"] == [["synth-a", "synth-b", "synth-c"]]
    assert by_name["synthetic"]["models"]["synth-agg"] == "synthetic"
    assert by_name["api-synthetic"]["layers"] == [["api-synth-a", "api-synth-b", "api-synth-c"]]
    assert api.get("/healthz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert api.get("/readyz").status_code == 200
    assert api.get("/docs").status_code == 200
    spec = api.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/results", "/v1/jobs/{job_id}/cancel", "/healthz"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert {"JobCreate", "JobUpload", "InputRecord"} <= set(spec["components"]["schemas"])


def test_concurrent_submits_with_one_key_make_one_job(api_url: str, worker: subprocess.Popen[bytes]) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"recipe": FAST, "items": items(50)}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=api_url, timeout=60) as own:
            return own.post("/v1/jobs", json=body, headers=key)

    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(send, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1


def test_a_submit_that_loses_the_race_for_its_key_still_sends_the_dispatch(
    database_url: str, worker: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit that committed first may have died before its dispatch: the one whose insert then
    conflicts answers with that job and sends the dispatch again while the job is queued."""
    recipe = parse_recipe(FAST)
    records = sample_records(3)
    key = uuid.uuid4().hex
    with session_scope(database_url) as session:
        first = store_job(session, Submission(recipe, records), key)
        session.commit()
        first_id = first.id
    lookups: list[str] = []
    found = db_submission.job_by_idempotency_key

    def racing(session: Any, looked_up: str) -> Any:
        """The first lookup runs before the other submit's commit: it finds nothing."""
        lookups.append(looked_up)
        return None if len(lookups) == 1 else found(session, looked_up)

    monkeypatch.setattr(db_submission, "job_by_idempotency_key", racing)
    with session_scope(database_url) as session:
        answer = submit_job(session, Submission(recipe, records), key)
        assert (answer.job.id, answer.created, answer.dispatched) == (first_id, False, True)
    assert lookups == [key, key], "the insert conflicted and the key's job was looked up again"
    assert wait_for_job(database_url, first_id).status == "succeeded"
