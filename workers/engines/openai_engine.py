"""Any OpenAI-compatible chat endpoint: a remote `vllm serve`, a hosted API, a judge."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from orchestrator.recipes import OpenAIModel
from workers.engines.base import ChatRequest, Engine, Generation
from workers.engines.errors import EngineUnavailable, RequestRejected

__all__ = ["ApproxTokenizer", "OpenAIEngine"]

# English averages about four characters per token; the remote tokenizer is not available here.
CHARS_PER_TOKEN = 4


class ApproxTokenizer:
    def count(self, text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN)

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[: max_tokens * CHARS_PER_TOKEN]


class OpenAIEngine(Engine):
    def __init__(
        self, name: str, spec: OpenAIModel, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        super().__init__(name)
        self.spec = spec
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise RequestRejected(
                    f"model {self.name}: environment variable {self.spec.api_key_env} is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=self.spec.base_url.rstrip("/"),
            headers=headers,
            timeout=self.spec.timeout_s,
            transport=self._transport,
        )

    @property
    def tokenizer(self) -> ApproxTokenizer:
        return ApproxTokenizer()

    @property
    def system_supported(self) -> bool:
        return self.spec.system_role != "merge"

    async def generate(self, request: ChatRequest) -> Generation:
        if self._client is None:
            raise EngineUnavailable(f"engine {self.name} is not started")
        body = {
            "model": self.spec.model,
            "messages": [m.model_dump() for m in request.messages],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        started = time.perf_counter()
        try:
            response = await self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.spec.base_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise EngineUnavailable(
                f"{self.spec.base_url}: HTTP {response.status_code}: {response.text[:300]}"
            )
        if response.status_code >= 400:
            raise RequestRejected(f"{self.spec.base_url}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            usage = payload.get("usage") or {}
            finish_reason = choice.get("finish_reason")
            generation = Generation(
                text=text or "",
                # What the server did not report stays unknown: never a made-up 0 or "stop".
                prompt_tokens=_count(usage.get("prompt_tokens")),
                output_tokens=_count(usage.get("completion_tokens")),
                finish_reason=str(finish_reason) if finish_reason else None,
                latency_ms=(time.perf_counter() - started) * 1000,
                top_logprobs=_first_token_logprobs(choice) if request.logprobs else None,
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailable(f"{self.spec.base_url}: malformed response: {exc}") from exc
        if not text and not request.logprobs:
            # An answer with no text (a refusal by a content filter, a broken server) is no answer.
            raise RequestRejected(
                f"{self.spec.base_url}: empty answer (finish_reason={finish_reason or 'not given'})"
            )
        return generation

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _first_token_logprobs(choice: dict[str, Any]) -> dict[str, float] | None:
    """`choices[0].logprobs.content[0].top_logprobs` as {token: logprob}; None if the endpoint sent none."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return None
    return {str(entry["token"]): float(entry["logprob"]) for entry in content[0].get("top_logprobs") or []}
