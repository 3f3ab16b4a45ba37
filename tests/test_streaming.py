"""Streaming generation: every engine streams, the deltas add up to the final text, and the engine host
relays them to the task thread, cancels on request and turns every failure into an outcome."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import cast

import httpx
import pytest

from orchestrator.prompts import Tokenizer
from orchestrator.recipes import OpenAIModel, SyntheticModel
from orchestrator.settings import FaultSpec, Settings
from tests.test_engines import request
from workers.engine_host import EngineHost
from workers.engines import (
    ChatRequest,
    Delta,
    Engine,
    EngineUnavailable,
    FaultyEngine,
    Generation,
    RequestRejected,
)
from workers.engines.openai_engine import OpenAIEngine, sse_data
from workers.engines.synthetic import SyntheticEngine, WordTokenizer
from workers.outcomes import Failure


def synthetic(latency_ms: float = 0.0, output_tokens: int = 10) -> SyntheticModel:
    return SyntheticModel(engine="synthetic", latency_ms=latency_ms, output_tokens=output_tokens)


async def collect(stream: AsyncIterator[Delta | Generation]) -> tuple[list[str], Generation]:
    deltas: list[str] = []
    final = None
    async for item in stream:
        assert final is None, "the final record comes last"
        if isinstance(item, Delta):
            deltas.append(item.text)
        else:
            final = item
    assert final is not None
    return deltas, final


def test_synthetic_streams_its_words_and_the_text_generate_returns() -> None:
    engine = SyntheticEngine("s", synthetic(output_tokens=10))
    deltas, final = asyncio.run(collect(engine.generate_stream(request())))
    whole = asyncio.run(engine.generate(request()))
    assert len(deltas) == 10 and "".join(deltas) == final.text == whole.text
    assert (final.prompt_tokens, final.output_tokens, final.finish_reason) == (
        whole.prompt_tokens,
        whole.output_tokens,
        whole.finish_reason,
    )
    capped_deltas, capped = asyncio.run(collect(engine.generate_stream(request(max_tokens=4))))
    assert len(capped_deltas) == 4 and capped.finish_reason == "length"


def test_synthetic_spreads_its_latency_over_the_words() -> None:
    engine = SyntheticEngine("s", synthetic(latency_ms=400, output_tokens=8))

    async def arrivals() -> list[float]:
        started = time.perf_counter()
        return [time.perf_counter() - started async for _ in engine.generate_stream(request())]

    times = asyncio.run(arrivals())
    assert times[0] < 0.2, "the first word comes after its share of the latency, not all of it"
    assert times[-1] >= 0.4


class WholeAnswer(Engine):
    """An engine that only implements `generate`: it streams through the interface's default."""

    def __init__(self, text: str) -> None:
        super().__init__("whole")
        self.text = text

    async def start(self) -> None:
        return None

    async def generate(self, request: ChatRequest) -> Generation:
        return Generation(
            text=self.text, prompt_tokens=3, output_tokens=2, finish_reason="stop", latency_ms=1
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return WordTokenizer()

    @property
    def system_supported(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def test_every_engine_streams_at_least_its_whole_answer() -> None:
    deltas, final = asyncio.run(collect(WholeAnswer("Blue.").generate_stream(request())))
    assert deltas == ["Blue."] and final.text == "Blue."
    deltas, final = asyncio.run(collect(WholeAnswer("").generate_stream(request())))
    assert deltas == [] and final.text == ""


def sse(*events: object) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def openai_engine(handler: httpx.MockTransport) -> OpenAIEngine:
    spec = OpenAIModel(engine="openai", base_url="http://remote.test/v1", model="m")
    engine = OpenAIEngine("remote", spec, transport=handler)
    asyncio.run(engine.start())
    return engine


def streaming(body: bytes, status: int = 200, seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handler(req: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(req)
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_openai_engine_streams_chunks_and_reads_usage_from_the_last() -> None:
    seen: list[httpx.Request] = []
    usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
    body = sse({"choices": [{"delta": {"role": "assistant"}}]}, chunk("Bl"), chunk("ue"))
    body += b": keep-alive\n\n" + sse(chunk(".", "stop"), usage, "[DONE]")
    engine = openai_engine(streaming(body, seen=seen))
    deltas, final = asyncio.run(collect(engine.generate_stream(request(seed=5, max_tokens=16))))
    assert deltas == ["Bl", "ue", "."] and final.text == "Blue."
    assert (final.prompt_tokens, final.output_tokens, final.finish_reason) == (11, 3, "stop")
    sent = json.loads(seen[0].content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["model"], sent["seed"], sent["max_tokens"]) == ("m", 5, 16)


def test_openai_engine_stream_without_usage_leaves_the_counts_unknown() -> None:
    engine = openai_engine(streaming(sse(chunk("Blue."), chunk(finish="stop"), "[DONE]")))
    deltas, final = asyncio.run(collect(engine.generate_stream(request())))
    assert deltas == ["Blue."]
    assert (final.prompt_tokens, final.output_tokens, final.finish_reason) == (None, None, "stop")


@pytest.mark.parametrize(
    ("status", "error"), [(500, EngineUnavailable), (429, EngineUnavailable), (400, RequestRejected)]
)
def test_openai_engine_stream_classifies_http_errors(status: int, error: type[Exception]) -> None:
    engine = openai_engine(streaming(b"no", status=status))
    with pytest.raises(error, match=f"HTTP {status}: no"):
        asyncio.run(collect(engine.generate_stream(request())))


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (sse(chunk("Bl"), {"error": {"message": "engine died"}}), EngineUnavailable, "engine died"),
        (sse(chunk("Bl"), "{not json"), EngineUnavailable, "malformed chunk"),
        (sse(chunk(finish="content_filter"), "[DONE]"), RequestRejected, "finish_reason=content_filter"),
    ],
)
def test_openai_engine_stream_failures(body: bytes, error: type[Exception], message: str) -> None:
    engine = openai_engine(streaming(body))
    with pytest.raises(error, match=message):
        asyncio.run(collect(engine.generate_stream(request())))


def test_openai_engine_stream_connection_errors_are_transient() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(EngineUnavailable, match="ConnectError"):
        asyncio.run(collect(openai_engine(httpx.MockTransport(refuse)).generate_stream(request())))


def test_server_sent_events_join_data_lines_and_skip_the_rest() -> None:
    lines = [": comment", "event: message", "data: a", "data:b", "", "", "id: 7", "data: c"]

    async def read() -> list[str]:
        async def source() -> AsyncIterator[str]:
            for line in lines:
                yield line

        return [data async for data in sse_data(source())]

    assert asyncio.run(read()) == ["a\nb", "c"]


def test_faulty_engine_streams_and_breaks_where_told() -> None:
    inner = SyntheticEngine("s", synthetic(output_tokens=10))
    engine = FaultyEngine(inner, FaultSpec(stream_break_after=3))
    received: list[str] = []

    async def read() -> None:
        async for item in engine.generate_stream(request()):
            if isinstance(item, Delta):
                received.append(item.text)

    with pytest.raises(EngineUnavailable, match="after 3 deltas"):
        asyncio.run(read())
    assert len(received) == 3
    deltas, final = asyncio.run(collect(FaultyEngine(inner, FaultSpec()).generate_stream(request())))
    assert "".join(deltas) == final.text and len(deltas) == 10
    with pytest.raises(EngineUnavailable, match="injected fault in s"):
        asyncio.run(collect(FaultyEngine(inner, FaultSpec(error_rate=1.0)).generate_stream(request())))


class Watched(SyntheticEngine):
    """A synthetic engine that notes when a stream of its stops before its end (cancelled or closed)."""

    stopped: threading.Event

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        try:
            async for item in super().generate_stream(request):
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            self.stopped.set()
            raise


@contextmanager
def host_of(model: SyntheticModel, settings: Settings | None = None) -> Iterator[tuple[EngineHost, Watched]]:
    """An engine host whose model "m" is a watched synthetic engine, already loaded."""
    engines: list[Watched] = []

    def factory(name: str, spec: object, _: Settings) -> Engine:
        engines.append(Watched(name, cast(SyntheticModel, spec)))
        engines[-1].stopped = threading.Event()
        return engines[-1]

    host = EngineHost(settings or Settings(), factory=factory)
    try:
        with host.lease("m", model):
            yield host, engines[0]
    finally:
        host.shutdown()


def stream_on(
    host: EngineHost, model: SyntheticModel, cancelled: Callable[[], bool] | None = None
) -> tuple[list[str], Generation | Failure]:
    """`attempt_stream` of one request on "m": the texts `on_delta` got, and the outcome."""
    received: list[str] = []
    outcome = host.attempt_stream("m", model, lambda _: request(), received.append, cancelled=cancelled)
    return received, outcome


def test_the_host_delivers_deltas_in_the_calling_thread_and_returns_what_generate_would() -> None:
    model = synthetic(latency_ms=100, output_tokens=12)
    threads: set[int] = set()
    received: list[str] = []

    def on_delta(text: str) -> None:
        threads.add(threading.get_ident())
        received.append(text)

    with host_of(model) as (host, _):
        outcome = host.attempt_stream("m", model, lambda _: request(), on_delta)
        whole = host.attempt("m", model, lambda _: request())
    assert isinstance(outcome, Generation) and isinstance(whole, Generation)
    assert threads == {threading.get_ident()}
    assert len(received) > 1 and "".join(received) == outcome.text == whole.text


def test_deltas_that_wait_for_a_slow_callback_come_together() -> None:
    model = synthetic(output_tokens=40)
    calls: list[str] = []

    def slow(text: str) -> None:
        calls.append(text)
        time.sleep(0.05)

    with host_of(model) as (host, _):
        outcome = host.attempt_stream("m", model, lambda _: request(), slow)
    assert isinstance(outcome, Generation)
    assert "".join(calls) == outcome.text and len(calls) < 40


def test_a_cancelled_stream_stops_the_engines_request() -> None:
    # 20 words over 4 s: a stream that ran to its end would take 4 s.
    model = synthetic(latency_ms=4000, output_tokens=20)
    received: list[str] = []
    started = time.perf_counter()
    with host_of(model) as (host, engine):
        outcome = host.attempt_stream(
            "m", model, lambda _: request(), received.append, cancelled=lambda: len(received) >= 3
        )
        assert engine.stopped.wait(2.0), "the engine's stream was not stopped"
    assert isinstance(outcome, Failure) and not outcome.transient
    assert "cancelled by the caller" in outcome.message
    assert 3 <= len(received) < 20 and time.perf_counter() - started < 2.0


def test_a_cancel_is_heard_while_no_delta_comes() -> None:
    settings = Settings(slimmoa_faults={"m": FaultSpec(hang_rate=1.0, hang_seconds=30)})
    model = synthetic()
    host = EngineHost(settings)
    asked = threading.Event()

    def cancelled() -> bool:
        if asked.is_set():
            return True
        asked.set()
        return False

    started = time.perf_counter()
    try:
        received, outcome = stream_on(host, model, cancelled=cancelled)
    finally:
        host.shutdown()
    assert isinstance(outcome, Failure) and "cancelled" in outcome.message and received == []
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("faults", "transient", "message", "delivered"),
    [
        (FaultSpec(stream_break_after=4), True, "after 4 deltas", 4),
        (FaultSpec(error_rate=1.0), True, "injected fault in m", 0),
        (FaultSpec(generate_exception="KeyError"), False, "generating: KeyError", 0),
    ],
)
def test_a_failing_stream_is_an_outcome(
    faults: FaultSpec, transient: bool, message: str, delivered: int
) -> None:
    model = synthetic(output_tokens=10)
    host = EngineHost(Settings(slimmoa_faults={"m": faults}))
    try:
        received, outcome = stream_on(host, model)
    finally:
        host.shutdown()
    assert isinstance(outcome, Failure) and outcome.transient is transient and message in outcome.message
    # What was delivered before the failure is the beginning of the answer.
    assert len(" ".join(received).split()) == delivered


def test_a_stream_past_its_time_limit_is_transient_and_stopped() -> None:
    # A word every 200 ms: two of them come within the limit.
    model = synthetic(latency_ms=5000, output_tokens=25)
    with host_of(model, Settings(engine_request_timeout_s=0.5)) as (host, engine):
        received, outcome = stream_on(host, model)
        assert engine.stopped.wait(2.0)
    assert isinstance(outcome, Failure) and outcome.transient and "no answer within 0.5 s" in outcome.message
    assert 0 < len(received) < 25


def test_a_failing_callback_stops_the_stream() -> None:
    model = synthetic(latency_ms=4000, output_tokens=20)

    def broken(text: str) -> None:
        raise ConnectionError("the stream's store is down")

    with host_of(model) as (host, engine):
        outcome = host.attempt_stream("m", model, lambda _: request(), broken)
        assert engine.stopped.wait(2.0)
    assert isinstance(outcome, Failure) and not outcome.transient
    assert "ConnectionError: the stream's store is down" in outcome.message
