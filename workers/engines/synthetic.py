"""Deterministic text from the prompt and seed, with configurable latency: for orchestration tests,
benchmarks and load tests. Chosen only by a recipe that names `engine: synthetic`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections.abc import AsyncGenerator

from orchestrator.recipes import SyntheticModel
from workers.engines.base import ChatRequest, Delta, Engine, Generation

__all__ = ["SyntheticEngine", "WordTokenizer", "fake_top_logprobs", "prompt_digest"]

_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "answer",
    "because",
    "therefore",
    "first",
    "second",
    "finally",
    "example",
    "consider",
    "result",
    "model",
    "response",
    "careful",
    "detail",
    "summary",
    "point",
    "reason",
    "data",
    "value",
    "step",
    "clear",
    "short",
    "long",
    "context",
]


def prompt_digest(request: ChatRequest) -> str:
    """A digest of everything that determines the output, so tests can tell which prompt was seen."""
    payload = json.dumps(
        [[m.role, m.content] for m in request.messages] + [request.seed, request.temperature, request.top_p],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# First-token vocabulary of the fake distribution: a pairwise judge's two verdicts and some words.
_FIRST_TOKENS = ["m", "M", "The", "Both", "Output", "I", "Model", "Based"]


def fake_top_logprobs(digest: str, k: int) -> dict[str, float]:
    """A deterministic first-token distribution for a prompt digest: the top k of a fixed vocabulary."""
    rng = random.Random(f"{digest}:logprobs")
    logits = [rng.gauss(0.0, 2.0) for _ in _FIRST_TOKENS]
    norm = math.log(sum(math.exp(x) for x in logits))
    ranked = sorted(zip(_FIRST_TOKENS, logits, strict=True), key=lambda pair: -pair[1])
    return {token: logit - norm for token, logit in ranked[:k]}


class WordTokenizer:
    """Whitespace words as tokens: exact for synthetic text, close enough for its truncation tests."""

    def count(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])


class SyntheticEngine(Engine):
    def __init__(self, name: str, spec: SyntheticModel) -> None:
        super().__init__(name)
        self.spec = spec
        self._tokenizer = WordTokenizer()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def tokenizer(self) -> WordTokenizer:
        return self._tokenizer

    @property
    def system_supported(self) -> bool:
        return self.spec.system_role != "merge"

    async def generate(self, request: ChatRequest) -> Generation:
        started = time.perf_counter()
        if self.spec.latency_ms:
            await asyncio.sleep(self.spec.latency_ms / 1000)
        words = self._words(request)
        return self._generation(request, " ".join(words), len(words), started)

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        """Its words one by one, `latency_ms` spread over them; the same text as `generate`."""
        started = time.perf_counter()
        words = self._words(request)
        pause = self.spec.latency_ms / 1000 / len(words)
        for i, word in enumerate(words):
            if pause:
                await asyncio.sleep(pause)
            yield Delta(word if i == 0 else f" {word}")
        yield self._generation(request, " ".join(words), len(words), started)

    def _words(self, request: ChatRequest) -> list[str]:
        """The answer's words: the model's name and prompt digest first, then words drawn from the digest."""
        digest = prompt_digest(request)
        count = min(self.spec.output_tokens, request.max_tokens)
        return [f"{self.name}:{digest}", *random.Random(digest).choices(_WORDS, k=count - 1)]

    def _generation(self, request: ChatRequest, text: str, count: int, started: float) -> Generation:
        logprobs = request.logprobs
        return Generation(
            text=text,
            prompt_tokens=sum(self._tokenizer.count(m.content) for m in request.messages),
            output_tokens=count,
            finish_reason="length" if count == request.max_tokens else "stop",
            latency_ms=(time.perf_counter() - started) * 1000,
            top_logprobs=fake_top_logprobs(prompt_digest(request), logprobs) if logprobs else None,
        )
