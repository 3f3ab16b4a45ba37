"""Engine adapters through the real interface: synthetic determinism, the OpenAI-compatible client
against an in-process transport, and injected faults."""

from __future__ import annotations

import asyncio
import json
from typing import cast

import httpx
import pytest

from orchestrator.contracts import ChatMessage
from orchestrator.recipes import OpenAIModel, SamplingSpec, SyntheticModel
from orchestrator.settings import FaultSpec, Settings
from workers.engines import (
    ChatRequest,
    Engine,
    EngineUnavailable,
    FaultyEngine,
    Generation,
    RequestRejected,
    create_engine,
)
from workers.engines.openai_engine import OpenAIEngine
from workers.engines.synthetic import SyntheticEngine

MESSAGES = [ChatMessage(role="user", content="Name a colour.")]


def request(seed: int | None = 1, max_tokens: int = 64) -> ChatRequest:
    return ChatRequest.build("r1", MESSAGES, SamplingSpec(seed=seed, max_tokens=max_tokens))


def test_synthetic_text_depends_on_prompt_and_seed_only() -> None:
    engine = SyntheticEngine("s", SyntheticModel(engine="synthetic", output_tokens=10))
    first = asyncio.run(engine.generate(request(seed=1)))
    again = asyncio.run(engine.generate(request(seed=1)))
    other = asyncio.run(engine.generate(request(seed=2)))
    assert first.text == again.text != other.text
    assert first.output_tokens == 10 and len(first.text.split()) == 10
    capped = asyncio.run(engine.generate(request(max_tokens=4)))
    assert (capped.output_tokens, capped.finish_reason) == (4, "length")


def test_the_engine_kind_comes_from_the_recipe() -> None:
    settings = Settings()
    assert isinstance(create_engine("s", SyntheticModel(engine="synthetic"), settings), SyntheticEngine)
    spec = OpenAIModel(engine="openai", base_url="http://127.0.0.1:9/v1", model="m")
    assert isinstance(create_engine("o", spec, settings), OpenAIEngine)
    faulty = Settings(slimmoa_faults={"s": FaultSpec(error_rate=1.0)})
    engine = create_engine("s", SyntheticModel(engine="synthetic"), faulty)
    assert isinstance(engine, FaultyEngine)
    with pytest.raises(EngineUnavailable, match="injected fault in s"):
        asyncio.run(engine.generate(request()))


def fault_pattern(spec: FaultSpec, requests: int) -> list[bool]:
    """Which of `requests` successive requests a fresh faulty engine fails."""
    engine = FaultyEngine(SyntheticEngine("s", SyntheticModel(engine="synthetic")), spec)

    async def outcomes() -> list[bool]:
        failed = []
        for _ in range(requests):
            try:
                await engine.generate(request())
                failed.append(False)
            except EngineUnavailable:
                failed.append(True)
        return failed

    return asyncio.run(outcomes())


def test_injected_faults_repeat_run_to_run_and_follow_the_seed() -> None:
    spec = FaultSpec(error_rate=0.3)
    first = fault_pattern(spec, 40)
    assert first == fault_pattern(spec, 40), "the same spec fails the same requests"
    assert 0 < sum(first) < 40
    assert first != fault_pattern(FaultSpec(error_rate=0.3, seed=1), 40)


def openai_engine(handler: httpx.MockTransport, **spec: object) -> OpenAIEngine:
    model = OpenAIModel.model_validate(
        {"engine": "openai", "base_url": "http://judge.test/v1", "model": "m", **spec}
    )
    engine = OpenAIEngine("remote", model, transport=handler)
    asyncio.run(engine.start())
    return engine


def test_openai_engine_sends_the_request_and_reads_the_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"role": "assistant", "content": "Blue."}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 2},
            },
        )

    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    engine = openai_engine(httpx.MockTransport(handler), api_key_env="JUDGE_KEY")
    generation = asyncio.run(engine.generate(request(seed=5, max_tokens=16)))
    assert (generation.text, generation.prompt_tokens, generation.output_tokens) == ("Blue.", 11, 2)
    sent = seen[0]
    assert sent.url == "http://judge.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sekrit"
    body = json.loads(sent.content)
    assert body["messages"] == [{"role": "user", "content": "Name a colour."}]
    assert (body["model"], body["seed"], body["max_tokens"]) == ("m", 5, 16)


def test_openai_engine_stores_what_the_server_did_not_say_as_unknown() -> None:
    answer = {"choices": [{"message": {"role": "assistant", "content": "Blue."}}]}
    engine = openai_engine(httpx.MockTransport(lambda _: httpx.Response(200, json=answer)))
    generation = asyncio.run(engine.generate(request()))
    assert (generation.text, generation.prompt_tokens, generation.output_tokens) == ("Blue.", None, None)
    assert generation.finish_reason is None, "no finish reason is not 'stop'"


@pytest.mark.parametrize("content", ["", None])
def test_openai_engine_refuses_an_empty_answer(content: str | None) -> None:
    answer = {
        "choices": [
            {"message": {"role": "assistant", "content": content}, "finish_reason": "content_filter"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 0},
    }
    engine = openai_engine(httpx.MockTransport(lambda _: httpx.Response(200, json=answer)))
    with pytest.raises(RequestRejected, match="empty answer \\(finish_reason=content_filter\\)"):
        asyncio.run(engine.generate(request()))


@pytest.mark.parametrize(
    ("status", "error"), [(500, EngineUnavailable), (429, EngineUnavailable), (400, RequestRejected)]
)
def test_openai_engine_classifies_http_errors(status: int, error: type[Exception]) -> None:
    engine = openai_engine(httpx.MockTransport(lambda _: httpx.Response(status, text="no")))
    with pytest.raises(error, match=f"HTTP {status}"):
        asyncio.run(engine.generate(request()))


def test_openai_engine_connection_errors_are_transient() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    engine = openai_engine(httpx.MockTransport(refuse))
    with pytest.raises(EngineUnavailable, match="ConnectError"):
        asyncio.run(engine.generate(request()))


def test_openai_engine_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    spec = OpenAIModel(engine="openai", base_url="http://judge.test/v1", model="m", api_key_env="ABSENT_KEY")
    with pytest.raises(RequestRejected, match="ABSENT_KEY is not set"):
        asyncio.run(OpenAIEngine("remote", spec).start())


def test_a_dead_engine_is_replaced_on_the_next_request() -> None:
    from workers import engine_host

    started: list[Engine] = []

    class CrashOnce(SyntheticEngine):
        """Its first instance dies on its first request, as a vLLM engine whose process was killed.
        It holds a model like vLLM does (the Residency protocol), without a sleep mode."""

        memory_gb = None
        supports_sleep = False

        async def sleep(self) -> None:
            raise NotImplementedError

        async def wake(self) -> None:
            raise NotImplementedError

        async def start(self) -> None:
            started.append(self)
            self.dead = False

        async def generate(self, request: ChatRequest) -> Generation:
            if len(started) == 1:
                self.dead = True
                raise EngineUnavailable("EngineDeadError: engine core process died")
            return await super().generate(request)

        @property
        def alive(self) -> bool:
            return not self.dead

    spec = SyntheticModel(engine="synthetic")
    host = engine_host.EngineHost(
        Settings(),
        factory=lambda name, model, settings: CrashOnce(name, cast(SyntheticModel, model)),
    )
    try:
        with host.lease("m", spec) as first, pytest.raises(EngineUnavailable, match="died"):
            host.generate(first, request())
        with host.lease("m", spec) as second:
            assert second is not first and len(started) == 2
            assert host.generate(second, request()).text.startswith("m:")
        with host.lease("m", spec) as third:
            assert third is second, "a live engine is kept"
    finally:
        host.shutdown()
