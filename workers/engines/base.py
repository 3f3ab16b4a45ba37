"""The one engine interface: async chat generation, batched by the engine across concurrent calls.

`Engine` is what generation needs (start, generate, close, tokenizer, system_supported). What the
engine host can do with an engine's memory (`sleep`, `wake`, `memory_gb`, `alive`) is the separate
`Residency` protocol, which only engines that have it implement (vLLM).

Usage::

    engine = create_engine("smollm2", recipe.model("smollm2"), settings)
    await engine.start()
    generation = await engine.generate(ChatRequest.build("item-7_0_1", messages, slot.sampling))

Many coroutines awaiting `generate` at once is what lets vLLM batch them continuously.

Streaming: `generate_stream` is an async iterator of `Delta` items (text as it is generated) that ends
with one `Generation`, the final record; the deltas concatenated are exactly `Generation.text`::

    async for item in engine.generate_stream(request):
        if isinstance(item, Delta):
            send(item.text)
        else:
            generation = item

Every engine streams: the default yields the whole text of `generate` as one delta. Closing or
cancelling the iterator early stops the request in the engine (vLLM aborts it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from orchestrator.contracts import ChatMessage
from orchestrator.prompts import Tokenizer
from orchestrator.recipes import SamplingSpec
from orchestrator.routing import BULK_PRIORITY

__all__ = ["ChatRequest", "Delta", "Engine", "Generation", "Residency", "residency"]


class ChatRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    request_id: str
    messages: list[ChatMessage]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    # Ask for the k most likely first tokens with their logprobs (a weighted judge reads its verdict there).
    logprobs: int | None = None
    # The stage's priority step (`orchestrator.routing`): an engine that schedules by priority runs
    # 0, a request someone waits for, before everything else.
    priority: int = BULK_PRIORITY

    @classmethod
    def build(
        cls,
        request_id: str,
        messages: list[ChatMessage],
        sampling: SamplingSpec,
        *,
        logprobs: int | None = None,
        priority: int = BULK_PRIORITY,
    ) -> ChatRequest:
        """Request sampling comes from the recipe stage; engines only fill what it leaves unset."""
        return cls(
            request_id=request_id,
            messages=messages,
            logprobs=logprobs,
            priority=priority,
            **sampling.model_dump(),
        )


class Generation(BaseModel):
    text: str
    # None: the engine did not say (an OpenAI-compatible server without `usage` or `finish_reason`).
    prompt_tokens: int | None
    output_tokens: int | None
    finish_reason: str | None
    latency_ms: float
    # Token text -> logprob of the top `request.logprobs` candidates for the first generated token.
    top_logprobs: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece of a streamed answer's text (a plain dataclass: there is one per token or so)."""

    text: str


class Engine(ABC):
    """An inference backend for one model. Subclasses stay small: start, generate, close."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    async def start(self) -> None:
        """Load the model or open the connection; called once, on the engine host's event loop."""

    @abstractmethod
    async def generate(self, request: ChatRequest) -> Generation:
        """Generate one chat completion; raises EngineUnavailable (transient) or RequestRejected.

        Anything else it raises is taken for a permanent failure by the engine host."""

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        """The answer as it is generated: `Delta` items, then the final `Generation`; raises as `generate`.

        This default streams the whole answer as one delta; engines that can do better override it."""
        generation = await self.generate(request)
        if generation.text:
            yield Delta(generation.text)
        yield generation

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """Counts and cuts text in this model's tokens (for fair truncation of pools)."""

    @property
    @abstractmethod
    def system_supported(self) -> bool:
        """Whether the chat template accepts a system message."""

    @abstractmethod
    async def close(self) -> None:
        """Release the model or connection."""


@runtime_checkable
class Residency(Protocol):
    """What the engine host can do with an engine's memory, for engines that hold a model."""

    @property
    def alive(self) -> bool:
        """False once the engine cannot serve again (its process died): the host then replaces it."""

    @property
    def memory_gb(self) -> float | None:
        """Device memory the started engine holds, as it reports it (None: the recipe's estimate stands)."""

    @property
    def supports_sleep(self) -> bool:
        """Whether `sleep` frees the device memory while keeping the weights ready for a fast `wake`."""

    async def sleep(self) -> None:
        """Free the device memory (vLLM sleep mode level 1: weights to host memory, KV cache dropped)."""

    async def wake(self) -> None:
        """Take the device memory back after `sleep`."""


def residency(engine: Engine) -> Residency | None:
    """The engine's residency controls, if it has any; a wrapper (`inner`) answers for what it wraps."""
    inner = getattr(engine, "inner", None)
    if isinstance(inner, Engine):
        return residency(inner)
    return engine if isinstance(engine, Residency) else None
