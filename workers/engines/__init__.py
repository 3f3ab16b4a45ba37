"""Inference engines behind one interface, and the factory that picks one from a recipe's model spec."""

from __future__ import annotations

import asyncio
import builtins
import random
from collections.abc import AsyncGenerator
from contextlib import aclosing

from orchestrator.prompts import Tokenizer
from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import FaultSpec, Settings
from workers.engines.base import ChatRequest, Delta, Engine, Generation, Residency, residency
from workers.engines.errors import (
    EngineError,
    EngineOutOfMemory,
    EngineUnavailable,
    ModelTooLarge,
    RequestCancelled,
    RequestRejected,
)

__all__ = [
    "ChatRequest",
    "Delta",
    "Engine",
    "EngineError",
    "EngineOutOfMemory",
    "EngineUnavailable",
    "FaultyEngine",
    "Generation",
    "ModelTooLarge",
    "RequestCancelled",
    "RequestRejected",
    "Residency",
    "create_engine",
    "residency",
]


class FaultyEngine(Engine):
    """Wraps an engine with injected failures; only built from worker settings, for tests. Residency
    (sleep, wake, liveness) stays the wrapped engine's (`residency` looks through `inner`)."""

    def __init__(self, inner: Engine, faults: FaultSpec) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.faults = faults
        self._draws = random.Random(faults.seed)

    async def start(self) -> None:
        if self.faults.load_hang_seconds:
            await asyncio.sleep(self.faults.load_hang_seconds)
        if self.faults.load_exception:
            raise getattr(builtins, self.faults.load_exception)(f"injected load fault in {self.name}")
        await self.inner.start()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.inner.tokenizer

    @property
    def system_supported(self) -> bool:
        return self.inner.system_supported

    async def generate(self, request: ChatRequest) -> Generation:
        await self._inject()
        return await self.inner.generate(request)

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        """The request's faults come before the first delta; `stream_break_after` breaks it midway."""
        await self._inject()
        deltas = 0
        async with aclosing(self.inner.generate_stream(request)) as stream:
            async for item in stream:
                if isinstance(item, Delta):
                    if deltas == self.faults.stream_break_after:
                        raise EngineUnavailable(f"injected fault in {self.name} after {deltas} deltas")
                    deltas += 1
                yield item

    async def _inject(self) -> None:
        if self.faults.hang_seconds and self._draws.random() < self.faults.hang_rate:
            await asyncio.sleep(self.faults.hang_seconds)
        if self.faults.generate_exception:
            raise getattr(builtins, self.faults.generate_exception)(f"injected fault in {self.name}")
        if self._draws.random() < self.faults.error_rate:
            raise EngineUnavailable(f"injected fault in {self.name}")

    async def close(self) -> None:
        await self.inner.close()


def create_engine(name: str, spec: VllmModel | OpenAIModel | SyntheticModel, settings: Settings) -> Engine:
    """The engine for one recipe model; its kind comes from the recipe only, never from a fallback."""
    engine: Engine
    if isinstance(spec, VllmModel):
        from workers.engines.vllm_engine import VllmEngine

        engine = VllmEngine(name, spec, settings.model_cache_dir, settings.engine_max_num_seqs)
    elif isinstance(spec, OpenAIModel):
        from workers.engines.openai_engine import OpenAIEngine

        engine = OpenAIEngine(name, spec)
    else:
        from workers.engines.synthetic import SyntheticEngine

        engine = SyntheticEngine(name, spec)
    faults = settings.slimmoa_faults.get(name)
    return FaultyEngine(engine, faults) if faults else engine
