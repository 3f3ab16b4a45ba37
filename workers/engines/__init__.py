"""Inference engines behind one interface, and the factory that picks one from a recipe's model spec."""

from __future__ import annotations

import asyncio
import random

from orchestrator.prompts import Tokenizer
from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import FaultSpec, Settings
from workers.engines.base import ChatRequest, Engine, Generation
from workers.engines.errors import (
    EngineError,
    EngineOutOfMemory,
    EngineUnavailable,
    ModelTooLarge,
    RequestRejected,
)

__all__ = [
    "ChatRequest",
    "Engine",
    "EngineError",
    "EngineOutOfMemory",
    "EngineUnavailable",
    "FaultyEngine",
    "Generation",
    "ModelTooLarge",
    "RequestRejected",
    "create_engine",
]


class FaultyEngine(Engine):
    """Wraps an engine with injected failures; only built from worker settings, for tests."""

    def __init__(self, inner: Engine, faults: FaultSpec) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.faults = faults

    async def start(self) -> None:
        await self.inner.start()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.inner.tokenizer

    @property
    def system_supported(self) -> bool:
        return self.inner.system_supported

    @property
    def alive(self) -> bool:
        return self.inner.alive

    @property
    def memory_gb(self) -> float | None:
        return self.inner.memory_gb

    @property
    def supports_sleep(self) -> bool:
        return self.inner.supports_sleep

    async def sleep(self) -> None:
        await self.inner.sleep()

    async def wake(self) -> None:
        await self.inner.wake()

    async def generate(self, request: ChatRequest) -> Generation:
        if self.faults.hang_seconds and random.random() < self.faults.hang_rate:
            await asyncio.sleep(self.faults.hang_seconds)
        if random.random() < self.faults.error_rate:
            raise EngineUnavailable(f"injected fault in {self.name}")
        return await self.inner.generate(request)

    async def close(self) -> None:
        await self.inner.close()


def create_engine(name: str, spec: VllmModel | OpenAIModel | SyntheticModel, settings: Settings) -> Engine:
    """The engine for one recipe model; its kind comes from the recipe only, never from a fallback."""
    engine: Engine
    if isinstance(spec, VllmModel):
        from workers.engines.vllm_engine import VllmEngine

        engine = VllmEngine(name, spec, settings.model_cache_dir)
    elif isinstance(spec, OpenAIModel):
        from workers.engines.openai_engine import OpenAIEngine

        engine = OpenAIEngine(name, spec)
    else:
        from workers.engines.synthetic import SyntheticEngine

        engine = SyntheticEngine(name, spec)
    faults = settings.slimmoa_faults.get(name)
    return FaultyEngine(engine, faults) if faults else engine
