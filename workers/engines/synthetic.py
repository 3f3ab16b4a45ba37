"""Deterministic text from the prompt and seed, with configurable latency: for orchestration tests,
benchmarks and load tests. Chosen only by a recipe that names `engine: synthetic`.

Two opt-in fields give recipes a quality known by construction (tests of `slimmoa tune`):
`cite_sources` puts the names of the synthetic models whose answers the prompt holds after the model's
own name, so an aggregated answer carries its sources; `judge_scores` makes a judge score each output
it is shown by the names in it (each distinct name once) and answer P(first is better) =
sigmoid(score(first) - score(second)). Without them the text and the judge's logprobs are unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
from collections.abc import AsyncGenerator

from orchestrator.contracts import ChatMessage
from orchestrator.judging import FIRST_TOKEN, SECOND_TOKEN, shown_outputs
from orchestrator.recipes import MODEL_NAME, SyntheticModel
from workers.engines.base import ChatRequest, Delta, Engine, Generation

__all__ = ["SyntheticEngine", "WordTokenizer", "fake_top_logprobs", "prompt_digest", "scored_top_logprobs"]

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


# The first word of every synthetic answer: its model's name and the prompt digest.
_SOURCE = re.compile(rf"(?<![\w.-])({MODEL_NAME.pattern}):[0-9a-f]{{16}}(?![0-9a-f])")


def _cited(messages: list[ChatMessage], own: str) -> list[str]:
    """The other synthetic models whose answers these messages hold, in order of first appearance."""
    names = (m.group(1) for message in messages for m in _SOURCE.finditer(message.content))
    return [name for name in dict.fromkeys(names) if name != own]


def _score(text: str, scores: dict[str, float]) -> float:
    return sum(
        score for name, score in scores.items() if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text)
    )


def scored_top_logprobs(messages: list[ChatMessage], scores: dict[str, float]) -> dict[str, float] | None:
    """The verdict of a judge with `judge_scores`: logprobs of the two identifiers from the scores of
    the names in each output shown; None when the prompt is not a pairwise judge's."""
    shown = shown_outputs(messages[-1].content) if messages else None
    if shown is None:
        return None
    margin = _score(shown[0], scores) - _score(shown[1], scores)
    # log sigmoid(x) = -log(1 + e^-x), written so that large margins do not overflow.
    return {
        FIRST_TOKEN: -math.log1p(math.exp(-margin)) if margin > -30 else margin,
        SECOND_TOKEN: -math.log1p(math.exp(margin)) if margin < 30 else -margin,
    }


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
        cited = _cited(request.messages, self.name)[: count - 1] if self.spec.cite_sources else []
        drawn = random.Random(digest).choices(_WORDS, k=count - 1 - len(cited))
        return [f"{self.name}:{digest}", *cited, *drawn]

    def _generation(self, request: ChatRequest, text: str, count: int, started: float) -> Generation:
        logprobs = request.logprobs
        return Generation(
            text=text,
            prompt_tokens=sum(self._tokenizer.count(m.content) for m in request.messages),
            output_tokens=count,
            finish_reason="length" if count == request.max_tokens else "stop",
            latency_ms=(time.perf_counter() - started) * 1000,
            top_logprobs=self._top_logprobs(request, logprobs) if logprobs else None,
        )

    def _top_logprobs(self, request: ChatRequest, k: int) -> dict[str, float]:
        if self.spec.judge_scores is not None:
            scored = scored_top_logprobs(request.messages, dict(self.spec.judge_scores))
            if scored is not None:
                return scored
        return fake_top_logprobs(prompt_digest(request), k)
