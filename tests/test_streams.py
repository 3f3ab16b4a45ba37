"""The Redis Stream per request, on the machine's Redis: what the writer appends the reader gets, in
order, however late it comes; the stream ends with its final or error record, expires once final,
and a reader's cancel reaches the writer (and, through the engine host, the engine)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from orchestrator.contracts import ChatMessage
from orchestrator.recipes import SamplingSpec, SyntheticModel
from orchestrator.settings import Settings
from orchestrator.streams import (
    DeltaRecord,
    ErrorRecord,
    FinalRecord,
    Record,
    StreamReader,
    StreamTimeout,
    StreamWriter,
    Usage,
    cancel_key,
    stream_key,
)
from workers.engine_host import EngineHost
from workers.engines import ChatRequest, Generation
from workers.outcomes import Failure

FINAL = FinalRecord(finish_reason="stop", usage=Usage(prompt_tokens=9, completion_tokens=3))


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.exit("REDIS_URL is not set: run the tests with `make test`")
    return url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"slimmoa.test.stream.{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def read(redis_url: str, prefix: str, timeout_s: float = 5.0, *, decode: bool = False) -> list[Record]:
    async def run() -> list[Record]:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=decode)
        try:
            reader = StreamReader(client, "job-1", prefix=prefix)
            return [record async for record in reader.records(timeout_s)]
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_late_reader_reads_the_whole_answer_and_the_key_expires(
    client: redis.Redis, redis_url: str, prefix: str
) -> None:
    writer = StreamWriter(client, "job-1", prefix=prefix, open_ttl_s=3600, finished_ttl_s=60)
    for text in ["Bl", "ue", "."]:
        writer.delta(text)
    assert 3500 < client.ttl(stream_key("job-1", prefix)) <= 3600
    writer.final(FINAL)
    assert 0 < client.ttl(stream_key("job-1", prefix)) <= 60
    # Everything was written before the reader came.
    for decode in (False, True):
        records = read(redis_url, prefix, decode=decode)
        assert records == [DeltaRecord(text="Bl"), DeltaRecord(text="ue"), DeltaRecord(text="."), FINAL]


def test_the_reader_waits_for_records_and_gets_each_as_it_comes(
    client: redis.Redis, redis_url: str, prefix: str
) -> None:
    writer = StreamWriter(client, "job-1", prefix=prefix)
    arrivals: list[float] = []

    def write() -> None:
        time.sleep(0.3)
        for i in range(5):
            writer.delta(f"w{i} ")
            time.sleep(0.1)
        writer.final(FINAL)

    async def run() -> list[Record]:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        started = time.perf_counter()
        records = []
        async for record in StreamReader(aclient, "job-1", prefix=prefix).records(5.0):
            arrivals.append(time.perf_counter() - started)
            records.append(record)
        await aclient.aclose()
        return records

    thread = threading.Thread(target=write)
    thread.start()
    records = asyncio.run(run())
    thread.join()
    assert [r.text for r in records if isinstance(r, DeltaRecord)] == [f"w{i} " for i in range(5)]
    assert records[-1] == FINAL
    # The first delta came while the writer still had half a second to go.
    assert arrivals[0] < arrivals[-1] - 0.3


def test_an_error_record_ends_the_stream(client: redis.Redis, redis_url: str, prefix: str) -> None:
    writer = StreamWriter(client, "job-1", prefix=prefix, finished_ttl_s=60)
    writer.delta("Bl")
    writer.error(ErrorRecord(message="smollm2: engine died", code="engine_unavailable"))
    writer.delta("never read")
    records = read(redis_url, prefix)
    assert records == [
        DeltaRecord(text="Bl"),
        ErrorRecord(message="smollm2: engine died", code="engine_unavailable"),
    ]
    assert client.ttl(stream_key("job-1", prefix)) <= 60


def test_a_stream_without_its_final_record_times_out(
    client: redis.Redis, redis_url: str, prefix: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(StreamTimeout, match=r"no final record within 0\.5 s"):
        read(redis_url, prefix, timeout_s=0.5)
    assert 0.5 <= time.perf_counter() - started < 2.0
    StreamWriter(client, "job-1", prefix=prefix).delta("Bl")
    received: list[Record] = []

    async def run() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        try:
            async for record in StreamReader(aclient, "job-1", prefix=prefix).records(0.5):
                received.append(record)
        finally:
            await aclient.aclose()

    with pytest.raises(StreamTimeout):
        asyncio.run(run())
    assert received == [DeltaRecord(text="Bl")]


def test_a_finished_stream_goes_away(client: redis.Redis, prefix: str) -> None:
    writer = StreamWriter(client, "job-1", prefix=prefix, finished_ttl_s=1)
    writer.delta("Blue.")
    writer.final(FINAL)
    assert client.exists(stream_key("job-1", prefix))
    time.sleep(1.5)
    assert not client.exists(stream_key("job-1", prefix))


def test_the_readers_cancel_reaches_the_writer(client: redis.Redis, redis_url: str, prefix: str) -> None:
    writer = StreamWriter(client, "job-1", prefix=prefix)
    assert not writer.cancelled()

    async def cancel() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        await StreamReader(aclient, "job-1", prefix=prefix).cancel(ttl_s=120)
        await aclient.aclose()

    asyncio.run(cancel())
    assert writer.cancelled()
    assert 0 < client.ttl(cancel_key("job-1", prefix)) <= 120


def chat_request(_: object) -> ChatRequest:
    messages = [ChatMessage(role="user", content="Name a colour.")]
    return ChatRequest.build("job-1_agg_1", messages, SamplingSpec(max_tokens=30, seed=3))


def test_an_attempt_streams_through_redis_to_a_reader(
    client: redis.Redis, redis_url: str, prefix: str
) -> None:
    model = SyntheticModel(engine="synthetic", latency_ms=600, output_tokens=30)
    writer = StreamWriter(client, "job-1", prefix=prefix)
    host = EngineHost(Settings())
    outcome: list[Generation | Failure] = []

    def stage() -> None:
        result = host.attempt_stream("m", model, chat_request, writer.delta, cancelled=writer.cancelled)
        assert isinstance(result, Generation)
        writer.final(FinalRecord(finish_reason=result.finish_reason, usage=Usage(completion_tokens=30)))
        outcome.append(result)

    thread = threading.Thread(target=stage)
    try:
        thread.start()
        records = read(redis_url, prefix)
        thread.join()
    finally:
        host.shutdown()
    streamed = "".join(r.text for r in records if isinstance(r, DeltaRecord))
    assert isinstance(outcome[0], Generation) and streamed == outcome[0].text
    assert len(records) > 2 and records[-1] == FinalRecord(
        finish_reason="length", usage=Usage(completion_tokens=30)
    )


def test_a_reader_that_goes_away_stops_the_attempt(client: redis.Redis, redis_url: str, prefix: str) -> None:
    # 30 words over 6 s; the reader leaves after its third delta.
    model = SyntheticModel(engine="synthetic", latency_ms=6000, output_tokens=30)
    writer = StreamWriter(client, "job-1", prefix=prefix)
    host = EngineHost(Settings())
    outcome: list[Generation | Failure] = []

    async def leave_early() -> int:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        reader = StreamReader(aclient, "job-1", prefix=prefix)
        seen = 0
        async for _ in reader.records(10.0):
            seen += 1
            if seen == 3:
                await reader.cancel()
                break
        await aclient.aclose()
        return seen

    thread = threading.Thread(
        target=lambda: outcome.append(
            host.attempt_stream("m", model, chat_request, writer.delta, cancelled=writer.cancelled)
        )
    )
    started = time.perf_counter()
    try:
        thread.start()
        asyncio.run(leave_early())
        thread.join(5.0)
    finally:
        host.shutdown()
    result = outcome[0]
    assert isinstance(result, Failure) and "cancelled by the caller" in result.message
    assert time.perf_counter() - started < 3.0
    assert client.xlen(stream_key("job-1", prefix)) < 10
