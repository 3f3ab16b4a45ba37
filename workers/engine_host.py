"""The engines of one worker process: one asyncio loop thread, one engine per model, kept for life.

Celery runs stage tasks in a threads pool (a prefork child cannot host vLLM: it cannot spawn the
engine process, and CUDA cannot be re-initialised after fork). Each task thread hands its request to
the loop with `run_coroutine_threadsafe`; requests from all threads meet in the same engine, which
batches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import Settings
from workers.engines import ChatRequest, Engine, EngineUnavailable, Generation, create_engine
from workers.metrics import ENGINE_IN_FLIGHT, ENGINE_LOAD_SECONDS, ENGINE_LOADS, OFFERED_BATCH

__all__ = ["EngineHost"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()
        self._engines: dict[tuple[str, VllmModel | OpenAIModel | SyntheticModel], Engine] = {}
        self._lock = threading.Lock()
        # Separate from the loading lock: counting must not wait for a model to load.
        self._count_lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise EngineUnavailable(f"no answer within {timeout:.0f} s") from exc

    def engine(self, name: str, spec: VllmModel | OpenAIModel | SyntheticModel) -> Engine:
        """The started engine for a recipe model; the first caller loads it, the others wait."""
        # Same spec, same engine: recipes that share a model definition share its weights.
        # Specs are frozen (hashable), so the lookup costs no serialisation on the hot path.
        key = (name, spec)
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                log.info("starting engine %s (%s)", name, spec.engine)
                engine = create_engine(name, spec, self.settings)
                started = time.perf_counter()
                self._run(engine.start())
                ENGINE_LOADS.labels(name).inc()
                ENGINE_LOAD_SECONDS.labels(name).observe(time.perf_counter() - started)
                self._engines[key] = engine
            return engine

    def generate(self, engine: Engine, request: ChatRequest) -> Generation:
        with self._count_lock:
            self._in_flight[engine.name] = in_flight = self._in_flight.get(engine.name, 0) + 1
        OFFERED_BATCH.labels(engine.name).observe(in_flight)
        ENGINE_IN_FLIGHT.labels(engine.name).set(in_flight)
        try:
            return self._run(engine.generate(request), self.settings.engine_request_timeout_s)
        except EngineUnavailable:
            if not engine.alive:
                self._replace(engine)
            raise
        finally:
            with self._count_lock:
                self._in_flight[engine.name] -= 1
                ENGINE_IN_FLIGHT.labels(engine.name).set(self._in_flight[engine.name])

    def _replace(self, engine: Engine) -> None:
        """Forget a dead engine so that the next request (the stage's retry) starts a fresh one."""
        with self._lock:
            for key, known in list(self._engines.items()):
                if known is engine:
                    log.warning("engine %s died; it is restarted on the next request", engine.name)
                    del self._engines[key]
                    asyncio.run_coroutine_threadsafe(engine.close(), self._loop)

    def shutdown(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                try:
                    self._run(engine.close(), timeout=60)
                except Exception:  # shutting down: one engine failing to close must not keep the others
                    log.exception("closing engine %s failed", engine.name)
            self._engines.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
