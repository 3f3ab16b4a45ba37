"""The engines' event loop, in a thread of its own, and the requests task threads send to it.

`EngineLoop.run` hands a coroutine to the loop and waits for it within a time limit. Generations are
counted per model (the batch each request was offered, the in-flight gauge).

A stream runs on the loop (`Engine.generate_stream`) and its items cross to the task thread that
asked for it through a queue: the caller's `on_delta` runs in that thread, so what it does with the
text (an XADD to Redis) never holds up the one loop that every engine's requests share. Deltas that
queued up while `on_delta` was busy are delivered together, joined, so a slow reader costs fewer
calls, not more. Leaving early (cancelled by the caller, past the time limit, or an exception from
`on_delta`) cancels the stream on the loop, which stops the engine's request (vLLM aborts it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

from workers.engines import ChatRequest, Delta, Engine, EngineUnavailable, Generation, RequestCancelled
from workers.metrics import ENGINE_IN_FLIGHT, OFFERED_BATCH, TOKENS

__all__ = ["CANCEL_CHECK_S", "EngineLoop", "in_flight", "relay"]

T = TypeVar("T")

# `cancelled` is asked at most this often (it may cost a Redis round trip): also how long a stopped
# request can keep generating before the engine hears of it.
CANCEL_CHECK_S = 0.1

Item = Delta | Generation | Exception


class _Traffic:
    """Requests in flight on one model, and its metrics, labelled once (a labels() call takes a
    lock and a lookup, several times per request otherwise)."""

    def __init__(self, model: str) -> None:
        self.count = 0
        self.offered = OFFERED_BATCH.labels(model)
        self.gauge = ENGINE_IN_FLIGHT.labels(model)
        self.prompt_tokens = TOKENS.labels(model, "prompt")
        self.output_tokens = TOKENS.labels(model, "output")

    def counted(self, generation: Generation) -> Generation:
        # Tokens an engine did not report (None) are not counted.
        self.prompt_tokens.inc(generation.prompt_tokens or 0)
        self.output_tokens.inc(generation.output_tokens or 0)
        return generation


_traffic: dict[str, _Traffic] = {}
# Its own lock: counting must never wait for a model to load.
_count_lock = threading.Lock()


class EngineLoop:
    """One asyncio loop thread per worker process: every engine lives on it, so requests from all task
    threads meet in the same engine, which batches them."""

    def __init__(self, request_timeout_s: float, on_unavailable: Callable[[Engine], None]) -> None:
        self.request_timeout_s = request_timeout_s
        # Told of every request that failed as unavailable (the host replaces an engine that died).
        self._on_unavailable = on_unavailable
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "answer") -> T:
        """Run `coro` on the loop and wait for it; past `timeout` it is cancelled (EngineUnavailable)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise EngineUnavailable(f"no {what} within {timeout:g} s") from exc

    def generate(self, engine: Engine, request: ChatRequest) -> Generation:
        with in_flight(engine.name) as traffic, self._watched(engine):
            return traffic.counted(self.run(engine.generate(request), self.request_timeout_s))

    def stream(
        self,
        engine: Engine,
        request: ChatRequest,
        on_delta: Callable[[str], None],
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """`generate`, streamed: the text goes to `on_delta` in this thread (see `relay`)."""
        with in_flight(engine.name) as traffic, self._watched(engine):
            stream = engine.generate_stream(request)
            generation = relay(
                self.loop, stream, on_delta, timeout_s=self.request_timeout_s, cancelled=cancelled
            )
            return traffic.counted(generation)

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Start `coro` on the loop without waiting for it."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    @contextmanager
    def _watched(self, engine: Engine) -> Iterator[None]:
        try:
            yield
        except EngineUnavailable:
            self._on_unavailable(engine)
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@contextmanager
def in_flight(model: str) -> Iterator[_Traffic]:
    """Count one request on `model` while the block runs (the batch it was offered, and the gauge)."""
    with _count_lock:
        traffic = _traffic.get(model)
        if traffic is None:
            traffic = _traffic[model] = _Traffic(model)
        traffic.count += 1
        count = traffic.count
    traffic.offered.observe(count)
    traffic.gauge.set(count)
    try:
        yield traffic
    finally:
        with _count_lock:
            traffic.count -= 1
            traffic.gauge.set(traffic.count)


def relay(
    loop: asyncio.AbstractEventLoop,
    stream: AsyncGenerator[Delta | Generation, None],
    on_delta: Callable[[str], None],
    *,
    timeout_s: float,
    cancelled: Callable[[], bool] | None = None,
) -> Generation:
    """Run `stream` on `loop` and deliver its text to `on_delta` in this thread; returns the final record.

    Raises what the stream raised, RequestCancelled once `cancelled()` says so, or EngineUnavailable
    when the whole answer has not come within `timeout_s`.
    """
    items: queue.SimpleQueue[Item] = queue.SimpleQueue()
    future = asyncio.run_coroutine_threadsafe(_pump(stream, items), loop)
    deadline = time.monotonic() + timeout_s
    next_check = 0.0
    try:
        while True:
            now = time.monotonic()
            if cancelled is not None and now >= next_check:
                if cancelled():
                    raise RequestCancelled("cancelled by the caller while generating")
                next_check = now + CANCEL_CHECK_S
            if now >= deadline:
                raise EngineUnavailable(f"no answer within {timeout_s:g} s")
            wait = deadline - now if cancelled is None else min(deadline - now, CANCEL_CHECK_S)
            try:
                batch = [items.get(timeout=wait)]
            except queue.Empty:
                continue
            batch += _drain(items)
            text = "".join(item.text for item in batch if isinstance(item, Delta))
            if text:
                on_delta(text)
            # The final record or the error is the last item the stream ever queues.
            last = batch[-1]
            if isinstance(last, Generation):
                return last
            if isinstance(last, Exception):
                raise last
    finally:
        # Nothing once the stream has ended; otherwise it stops the engine's request.
        future.cancel()


async def _pump(stream: AsyncGenerator[Delta | Generation, None], items: queue.SimpleQueue[Item]) -> None:
    """On the loop: queue the stream's items, then its error if it fails or ends without a final record."""
    try:
        async with aclosing(stream) as source:
            async for item in source:
                items.put(item)
                if isinstance(item, Generation):
                    return
        items.put(EngineUnavailable("the stream ended without its final record"))
    except Exception as exc:
        items.put(exc)


def _drain(items: queue.SimpleQueue[Item]) -> list[Item]:
    drained: list[Item] = []
    while True:
        try:
            drained.append(items.get_nowait())
        except queue.Empty:
            return drained
