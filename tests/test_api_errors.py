"""Every refusal of the API: its status code, its message with the field path, and nothing stored.

The app runs in-process (ASGI) against the session's Postgres and Redis; no worker is needed, since
nothing refused is ever enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import Settings, get_settings
from tests.conftest import stored

RECIPE: dict[str, Any] = {
    "models": {"a": {"engine": "synthetic"}},
    "layers": [{"proposers": [{"model": "a"}]}],
    "aggregator": {"model": "a"},
}
GOOD = [{"instruction": f"prompt {i}"} for i in range(40)]


def settings(**changes: Any) -> Settings:
    return get_settings().model_copy(update=changes)


@pytest.fixture()
def client(services: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings(api_token=""))) as test_client:
        yield test_client


def with_item(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    return [*GOOD[:index], item, *GOOD[index + 1 :]]


JSON_ERRORS = [
    (
        {"recipe": "synthetic", "items": with_item(37, {"instruction": "  "})},
        "items[37].instruction: must not be empty",
    ),
    ({"recipe": "synthetic", "items": with_item(2, {"id": "x"})}, "items[2].instruction: is required"),
    (
        {"recipe": "synthetic", "items": with_item(5, {"instruction": 5})},
        "items[5].instruction: Input should be a valid string",
    ),
    (
        {"recipe": "synthetic", "items": with_item(1, {"instruction": "a\u0000b"})},
        "items[1].instruction: must not contain NUL characters",
    ),
    (
        {"recipe": "synthetic", "items": with_item(0, {"instruction": "a", "dataset": "d" * 201})},
        "items[0].dataset: String should have at most 200 characters",
    ),
    ({"recipe": "synthetic", "items": []}, "items: List should have at least 1 item after validation, not 0"),
    ({"recipe": "synthetic"}, "items: is required"),
    ({"items": GOOD}, "recipe: is required"),
    (
        {"recipe": "synthetic", "items": GOOD, "priority": 12},
        "priority: Input should be less than or equal to 9",
    ),
    ({"recipe": "synthetic", "items": GOOD, "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"recipe": "synthetic", "items": GOOD, "name": "a\u0000"}, "name: must not contain NUL characters"),
    (
        {"recipe": {**RECIPE, "description": "x\u0000", "name": "n" * 201}, "items": GOOD},
        "recipe: names of the recipe and its models: at most 200 characters, no NUL",
    ),
    (
        {"recipe": "nope", "items": GOOD},
        "recipe: unknown recipe 'nope' (known recipes: embedded, slimmoa-a100, synthetic)",
    ),
    (
        {"recipe": "../recipes/synthetic.yaml", "items": GOOD},
        "recipe: unknown recipe '../recipes/synthetic.yaml'",
    ),
    (
        {
            "recipe": {**RECIPE, "layers": [{"proposers": [{"model": "a"}, {"model": "ghost"}]}]},
            "items": GOOD,
        },
        "recipe: layers[0].proposers[1].model: unknown model 'ghost' (recipe models: a)",
    ),
    (
        {"recipe": {**RECIPE, "aggregator": {"model": "ghost"}}, "items": GOOD},
        "recipe: aggregator.model: unknown model 'ghost' (recipe models: a)",
    ),
    (
        {"recipe": {**RECIPE, "models": {"a": {"engine": "tpu"}}}, "items": GOOD},
        "recipe: models.a: Input tag 'tpu' found using 'engine' does not match any of the expected tags",
    ),
]


@pytest.mark.parametrize(("body", "message"), JSON_ERRORS, ids=[m[:40] for _, m in JSON_ERRORS])
def test_json_submit_errors_are_422_with_the_field_path(
    client: TestClient, database_url: str, body: dict[str, Any], message: str
) -> None:
    before = stored(database_url)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Entity"
    assert problem["detail"].startswith(message), problem
    assert problem["errors"][0] == problem["detail"]
    assert stored(database_url) == before, "nothing stored"


def test_every_bad_item_is_listed(client: TestClient) -> None:
    body = {"recipe": "synthetic", "items": [{"instruction": ""}, {"instruction": "ok"}, {}]}
    problem = client.post("/v1/jobs", json=body).json()
    assert problem["errors"] == [
        "items[0].instruction: must not be empty",
        "items[2].instruction: is required",
    ]


def test_invalid_json_and_unsupported_media_type(client: TestClient, database_url: str) -> None:
    before = stored(database_url)
    broken = client.post("/v1/jobs", content=b'{"recipe": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"].startswith("Invalid JSON")
    text = client.post("/v1/jobs", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    assert text.json()["detail"] == "send application/json or a multipart/form-data upload"
    assert stored(database_url) == before


UPLOAD_ERRORS = [
    (b'{"instruction": "a"}\n{"id": 3}\n', "prompts.jsonl:2: field 'instruction' is required"),
    (b'{"instruction": "a"}\n{"instruction": \n', "prompts.jsonl:2: invalid JSON"),
    (
        b'[\n  {"instruction": "a"},\n  {"instruction": ""}\n]',
        "prompts.jsonl:3: record [1]: field 'instruction' must not be empty",
    ),
    (b"", "prompts.jsonl: the file is empty"),
    (b"\xff\xfe", "prompts.jsonl: not UTF-8 text"),
]


@pytest.mark.parametrize(("content", "message"), UPLOAD_ERRORS, ids=[m[:40] for _, m in UPLOAD_ERRORS])
def test_upload_errors_name_the_line(
    client: TestClient, database_url: str, content: bytes, message: str
) -> None:
    before = stored(database_url)
    response = client.post(
        "/v1/jobs", files={"file": ("prompts.jsonl", content)}, data={"recipe": "synthetic"}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message), response.json()
    assert stored(database_url) == before


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        ({"recipe": "synthetic"}, None, "file: a JSONL or AlpacaEval-JSON prompt file is required"),
        ({}, {"file": ("p.jsonl", b'{"instruction": "a"}')}, "recipe: a recipe name is required"),
        (
            {"recipe": "ghost"},
            {"file": ("p.jsonl", b'{"instruction": "a"}')},
            "recipe: unknown recipe 'ghost'",
        ),
        (
            {"recipe": "synthetic", "priority": "high"},
            {"file": ("p.jsonl", b'{"instruction": "a"}')},
            "priority: an integer from 0 to 9",
        ),
    ],
)
def test_upload_form_errors(client: TestClient, data: dict[str, str], files: Any, message: str) -> None:
    response = client.post("/v1/jobs", data=data, files=files or {"other": ("x", b"")})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message)


def test_a_body_over_the_limit_is_413(services: dict[str, str], database_url: str) -> None:
    before = stored(database_url)
    body = json.dumps({"recipe": "synthetic", "items": GOOD}).encode()
    with TestClient(create_app(settings(max_request_bytes=len(body) - 1))) as small:
        response = small.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["detail"] == f"the request body exceeds {len(body) - 1} bytes"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what streams in
            yield body[:100]
            yield body[100:]

        streamed = small.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
    assert stored(database_url) == before


def test_too_many_items_is_422(services: dict[str, str]) -> None:
    with TestClient(create_app(settings(max_items_per_job=39))) as small:
        response = small.post("/v1/jobs", json={"recipe": "synthetic", "items": GOOD})
    assert response.status_code == 422 and response.json()["detail"] == "items: at most 39 a job, got 40"


UNKNOWN = "0" * 32


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/v1/jobs/{UNKNOWN}"),
        ("GET", f"/v1/jobs/{UNKNOWN}/items"),
        ("GET", f"/v1/jobs/{UNKNOWN}/items/1"),
        ("GET", f"/v1/jobs/{UNKNOWN}/results"),
        ("POST", f"/v1/jobs/{UNKNOWN}/cancel"),
        ("POST", f"/v1/jobs/{UNKNOWN}/retry"),
        ("GET", "/v1/jobs/not-a-job-id"),
    ],
)
def test_unknown_job_is_404(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert response.json()["detail"].startswith("job '") and response.json()["detail"].endswith("' not found")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": 5000}, "limit: at most 1000"),
        ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
        ({"offset": -1}, "query.offset: Input should be greater than or equal to 0"),
        ({"status": "done"}, "query.status: Input should be"),
    ],
)
def test_bad_query_parameters_are_422(client: TestClient, params: dict[str, Any], message: str) -> None:
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 422 and response.json()["detail"].startswith(message)


def test_bad_retry_body_is_422(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"recipe": RECIPE, "items": GOOD[:1]}).json()
    response = client.post(f"/v1/jobs/{job['id']}/retry", json={"stage": "everything"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("stage: Input should be 'all', 'proposers' or 'aggregator'")


def test_auth_on_needs_the_bearer_token(services: dict[str, str], database_url: str) -> None:
    token = "s3cret-token-for-tests"
    before = stored(database_url)
    with TestClient(create_app(settings(api_token=token))) as secured:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = secured.get("/v1/recipes", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["detail"] == "a valid bearer token is required"
        refused = secured.post("/v1/jobs", json={"recipe": "synthetic", "items": GOOD})
        assert refused.status_code == 401
        assert secured.get(f"/v1/jobs/{UNKNOWN}").status_code == 401, "no job lookups without the token"
        ok = secured.get("/v1/recipes", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert secured.get("/healthz").status_code == 200, "health probes need no token"
    assert stored(database_url) == before


def test_auth_off_needs_no_token(client: TestClient) -> None:
    assert client.get("/v1/recipes").status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_health_is_503_when_the_broker_is_unreachable(services: dict[str, str]) -> None:
    with TestClient(create_app(settings(redis_url="redis://127.0.0.1:1/0"))) as broken:
        response = broken.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["database"]) == ("unavailable", "ok")
    assert body["broker"].startswith("unreachable")


def test_recipe_must_be_a_name_or_an_object(client: TestClient) -> None:
    problem = client.post("/v1/jobs", json={"recipe": 5, "items": GOOD}).json()
    assert problem["errors"] == ["recipe: must be a recipe name or a recipe object"]


def test_metrics_count_requests_by_route_and_jobs_by_status(client: TestClient) -> None:
    client.get(f"/v1/jobs/{UNKNOWN}")
    client.get("/v1/recipes")
    text = client.get("/metrics").text
    assert 'slimmoa_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'slimmoa_http_requests_total{method="GET",route="/v1/recipes",status="200"} 1.0' in text
    assert 'slimmoa_http_request_seconds_count{method="GET",route="/v1/recipes"} 1.0' in text
    assert 'slimmoa_jobs{status="cancelled"}' in text and 'slimmoa_jobs{status="running"}' in text
