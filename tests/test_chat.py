"""A recipe served as a model, through the official `openai` client: completions, streams, usage, the
record of each request, errors in OpenAI's shape, and a client that goes away."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import yaml
from fastapi.testclient import TestClient
from openai import OpenAI

from db.models import Candidate, Item, Job, Output
from db.session import session_scope
from orchestrator.api.app import create_app
from orchestrator.celery_app import app as celery_app
from orchestrator.contracts import InputRecord
from orchestrator.recipes import Recipe, parse_recipe
from orchestrator.settings import get_settings
from tests.conftest import stored
from tests.test_conversations import CONVERSATION, digest

SAMPLING = {"temperature": 0.3, "seed": 7, "max_tokens": 9}


def api_recipe(api_recipes: Path, name: str) -> Recipe:
    return parse_recipe(yaml.safe_load((api_recipes / f"{name}.yaml").read_text()))


@pytest.fixture()
def client(api_url: str, worker: Any) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def request_rows(database_url: str, job_id: str) -> tuple[Job, list[Candidate], Output]:
    with session_scope(database_url) as session:
        job = session.get_one(Job, job_id)
        item = session.query(Item).filter(Item.job_id == job_id).one()
        assert item.output is not None
        return job, list(item.candidates), item.output


def test_the_recipes_are_the_models(client: OpenAI) -> None:
    names = [model.id for model in client.models.list()]
    assert {"api-synthetic", "embedded", "synthetic"} <= set(names)


def test_a_completion_is_the_recipes_answer_to_the_whole_conversation(
    client: OpenAI, api_recipes: Path, database_url: str, api_url: str
) -> None:
    completion = client.chat.completions.create(
        model="api-synthetic",
        messages=cast(Any, CONVERSATION),
        temperature=SAMPLING["temperature"],
        seed=int(SAMPLING["seed"]),
        max_tokens=int(SAMPLING["max_tokens"]),
    )
    assert completion.object == "chat.completion" and completion.model == "api-synthetic"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    job_id = completion.id.removeprefix("chatcmpl-")
    job, candidates, output = request_rows(database_url, job_id)
    assert (job.kind, job.status) == ("chat", "succeeded")
    assert choice.message.content == output.text

    # Every proposer saw the whole conversation; the aggregator too, with the request's sampling.
    recipe = api_recipe(api_recipes, "api-synthetic")
    record = InputRecord.model_validate({"messages": CONVERSATION})
    for candidate in candidates:
        assert (candidate.text or "").startswith(
            f"{candidate.model}:{digest(recipe, candidate.model, record, [])} "
        )
    sampling = recipe.aggregator.sampling.model_copy(update=SAMPLING)
    requested = recipe.model_copy(
        update={"aggregator": recipe.aggregator.model_copy(update={"sampling": sampling})}
    )
    pool = [c.text or "" for c in candidates]
    assert output.text.startswith(f"api-synth-agg:{digest(requested, 'api-synth-agg', record, pool)} ")
    assert output.output_tokens == 9, "max_tokens caps the answer"

    usage = completion.usage
    assert usage is not None
    proposer_prompt = sum(c.prompt_tokens or 0 for c in candidates)
    proposer_completion = sum(c.output_tokens or 0 for c in candidates)
    assert usage.prompt_tokens == proposer_prompt + (output.prompt_tokens or 0)
    assert usage.completion_tokens == proposer_completion + 9
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra == {
        "proposer_prompt_tokens": proposer_prompt,
        "proposer_completion_tokens": proposer_completion,
    }
    listed = httpx.get(f"{api_url}/v1/jobs", params={"kind": "chat", "limit": 100}).json()["data"]
    assert job_id in {j["id"] for j in listed} and {j["kind"] for j in listed} == {"chat"}


def test_a_sequential_aggregators_steps_count_as_the_aggregators_tokens(
    client: OpenAI, database_url: str
) -> None:
    completion = client.chat.completions.create(
        model="api-sequential", messages=[{"role": "user", "content": "Name three colours."}]
    )
    _, candidates, output = request_rows(database_url, completion.id.removeprefix("chatcmpl-"))
    proposals = [c for c in candidates if c.layer == 0]
    steps = [c for c in candidates if c.layer == 1]
    assert (len(proposals), len(steps)) == (3, 1), "three candidates, read two, then the rest"
    usage = completion.usage
    assert usage is not None
    assert usage.model_extra == {
        "proposer_prompt_tokens": sum(c.prompt_tokens or 0 for c in proposals),
        "proposer_completion_tokens": sum(c.output_tokens or 0 for c in proposals),
    }
    assert usage.prompt_tokens == sum(c.prompt_tokens or 0 for c in candidates) + (output.prompt_tokens or 0)
    assert usage.completion_tokens == sum(c.output_tokens or 0 for c in candidates) + (
        output.output_tokens or 0
    )
    assert (steps[0].output_tokens or 0) > 0, "the step generated tokens, and they are the aggregator's"


def test_a_stream_is_the_stored_answer(client: OpenAI, database_url: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model="api-synthetic",
            messages=[{"role": "user", "content": "Count to three."}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for t in texts if t) > 3, "the answer arrives in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    _, _, output = request_rows(database_url, chunks[0].id.removeprefix("chatcmpl-"))
    assert "".join(texts) == output.text
    assert usage.completion_tokens > (output.output_tokens or 0) > 0


@pytest.fixture()
def in_process(services: dict[str, str]) -> Iterator[OpenAI]:
    """The SDK on the app in this process: errors are answered before anything is enqueued."""
    app = create_app(get_settings().model_copy(update={"api_token": "chat-token"}))
    with TestClient(app) as http:
        yield OpenAI(base_url="http://testserver/v1", api_key="chat-token", http_client=http, max_retries=0)


USER = [{"role": "user", "content": "hi"}]
ASSISTANT = {"role": "assistant", "content": "x"}


@pytest.mark.parametrize(
    ("request_fields", "status", "param", "message"),
    [
        ({"model": "nope", "messages": USER}, 404, "model", "does not exist"),
        (
            {"model": "synthetic", "messages": USER, "temperature": 5},
            400,
            "temperature",
            "less than or equal",
        ),
        ({"model": "synthetic", "messages": USER, "n": 2}, 400, "n", "Input should be 1"),
        ({"model": "synthetic", "messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than"),
        ({"model": "synthetic", "messages": []}, 400, "messages", "at least 1"),
        ({"model": "synthetic", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", ""),
        (
            {"model": "synthetic", "messages": [{"role": "assistant", "content": "x"}]},
            400,
            "messages",
            "last",
        ),
    ],
)
def test_bad_requests_get_openais_error_shape(
    in_process: OpenAI,
    database_url: str,
    request_fields: dict[str, Any],
    status: int,
    param: str,
    message: str,
) -> None:
    before = stored(database_url)
    with pytest.raises(openai.APIStatusError) as raised:
        in_process.chat.completions.create(**request_fields)
    error = raised.value
    assert error.status_code == status
    assert error.body is not None and isinstance(error.body, dict), error.response.text
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["param"] == param and message in error.body["message"]
    assert error.body["type"] == "invalid_request_error"
    if status == 404:
        assert isinstance(error, openai.NotFoundError) and error.body["code"] == "model_not_found"
    assert stored(database_url) == before, "a refused request stores nothing"


def test_no_token_is_an_authentication_error(in_process: OpenAI) -> None:
    anonymous = in_process.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as raised:
        anonymous.models.list()
    assert raised.value.body == {
        "message": "a valid bearer token is required",
        "type": "authentication_error",
        "param": None,
        "code": None,
    }


SLOW = """
name: chat-slow
models:
  slow-a: {engine: synthetic, output_tokens: 4}
  slow-agg: {engine: synthetic, latency_ms: 30000, output_tokens: 300}
layers: [{proposers: [{model: slow-a}, {model: slow-a, sampling: {seed: 2}}]}]
aggregator: {model: slow-agg}
"""


def running_stages(job_id: str) -> list[str]:
    active = celery_app.control.inspect(timeout=2.0).active() or {}
    return [task["name"] for tasks in active.values() for task in tasks if job_id in str(task.get("args"))]


def test_a_client_that_goes_away_leaves_no_stage_running(
    api_url: str, api_recipes: Path, worker: Any, database_url: str
) -> None:
    (api_recipes / "chat-slow.yaml").write_text(SLOW)
    body = {"model": "chat-slow", "messages": USER, "stream": True}
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        job_id = first.split('"id":"chatcmpl-')[1].split('"')[0]
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        # The aggregator is streaming: the connection closes here.
    deadline = time.monotonic() + 20
    while running_stages(job_id) or request_state(database_url, job_id) != "cancelled":
        assert time.monotonic() < deadline, (running_stages(job_id), request_state(database_url, job_id))
        time.sleep(0.5)
    with session_scope(database_url) as session:
        item = session.query(Item).filter(Item.job_id == job_id).one()
        assert item.output is None and item.status == "failed", "the aggregator stopped before its answer"


def request_state(database_url: str, job_id: str) -> str:
    with session_scope(database_url) as session:
        return session.get_one(Job, job_id).status


@pytest.mark.vllm
def test_the_embedded_recipe_answers_and_streams(
    client: OpenAI, api_recipes: Path, database_url: str
) -> None:
    data = yaml.safe_load((api_recipes / "embedded.yaml").read_text())
    data["name"] = "embedded-chat"
    for proposer in data["layers"][0]["proposers"]:
        proposer["sampling"]["max_tokens"] = 16
    (api_recipes / "embedded-chat.yaml").write_text(yaml.safe_dump(data))
    messages: Any = [{"role": "user", "content": "Name a color of the sky."}]

    completion = client.chat.completions.create(model="embedded-chat", messages=messages, max_tokens=16)
    text = completion.choices[0].message.content or ""
    _, candidates, output = request_rows(database_url, completion.id.removeprefix("chatcmpl-"))
    assert text.strip() and text == output.text and 0 < (output.output_tokens or 0) <= 16
    assert completion.usage is not None
    assert completion.usage.completion_tokens == sum(c.output_tokens or 0 for c in candidates) + (
        output.output_tokens or 0
    )

    chunks = list(
        client.chat.completions.create(model="embedded-chat", messages=messages, max_tokens=16, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _, _, output = request_rows(database_url, chunks[0].id.removeprefix("chatcmpl-"))
    assert streamed.strip() and streamed == output.text
