"""Any OpenAI-compatible chat endpoint: a remote `vllm serve`, a hosted API, a judge."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from orchestrator.recipes import OpenAIModel
from workers.engines.base import ChatRequest, Delta, Engine, Generation
from workers.engines.errors import EngineUnavailable, RequestRejected

__all__ = ["ApproxTokenizer", "OpenAIEngine", "sse_data"]

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
        client = self._started()
        started = time.perf_counter()
        try:
            response = await client.post("/chat/completions", json=self._body(request))
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from exc
        self._check_status(response.status_code, response.text)
        try:
            payload = response.json()
            choice = payload["choices"][0]
            usage = payload.get("usage") or {}
            generation = Generation(
                text=choice["message"]["content"] or "",
                # What the server did not report stays unknown: never a made-up 0 or "stop".
                prompt_tokens=_count(usage.get("prompt_tokens")),
                output_tokens=_count(usage.get("completion_tokens")),
                finish_reason=_reason(choice.get("finish_reason")),
                latency_ms=(time.perf_counter() - started) * 1000,
                top_logprobs=_first_token_logprobs(choice) if request.logprobs else None,
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineUnavailable(f"{self.spec.base_url}: malformed response: {exc}") from exc
        return self._answered(request, generation)

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        """`stream: true`: one delta per chunk with text; usage from the last chunk when the server
        sends one (`stream_options.include_usage`), else unknown."""
        client = self._started()
        body = {**self._body(request), "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        final = Generation(text="", prompt_tokens=None, output_tokens=None, finish_reason=None, latency_ms=0)
        pieces: list[str] = []
        try:
            async with client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    self._check_status(
                        response.status_code, (await response.aread()).decode(errors="replace")
                    )
                async for data in sse_data(response.aiter_lines()):
                    if data == "[DONE]":
                        break
                    text, final = self._read_chunk(data, final, request)
                    if text:
                        pieces.append(text)
                        yield Delta(text)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        yield self._answered(
            request, final.model_copy(update={"text": "".join(pieces), "latency_ms": latency_ms})
        )

    def _read_chunk(self, data: str, final: Generation, request: ChatRequest) -> tuple[str, Generation]:
        """One chunk's text, and the final record updated with what the chunk says."""
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                raise EngineUnavailable(
                    f"{self.spec.base_url}: error in the stream: {str(chunk['error'])[:300]}"
                )
            update: dict[str, Any] = {}
            if usage := chunk.get("usage"):
                update["prompt_tokens"] = _count(usage.get("prompt_tokens"))
                update["output_tokens"] = _count(usage.get("completion_tokens"))
            choices = chunk.get("choices") or []
            if not choices:
                return "", final.model_copy(update=update)
            choice = choices[0]
            if reason := _reason(choice.get("finish_reason")):
                update["finish_reason"] = reason
            if request.logprobs and final.top_logprobs is None:
                update["top_logprobs"] = _first_token_logprobs(choice)
            text = (choice.get("delta") or {}).get("content") or ""
            return str(text), final.model_copy(update=update)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EngineUnavailable(f"{self.spec.base_url}: malformed chunk: {exc}") from exc

    def _started(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineUnavailable(f"engine {self.name} is not started")
        return self._client

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
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
        return body

    def _unavailable(self, exc: httpx.HTTPError) -> EngineUnavailable:
        return EngineUnavailable(f"{self.spec.base_url}: {type(exc).__name__}: {exc}")

    def _check_status(self, status: int, text: str) -> None:
        """Rate limits and server errors may pass (transient); other client errors will not (permanent)."""
        if status == 429 or status >= 500:
            raise EngineUnavailable(f"{self.spec.base_url}: HTTP {status}: {text[:300]}")
        if status >= 400:
            raise RequestRejected(f"{self.spec.base_url}: HTTP {status}: {text[:300]}")

    def _answered(self, request: ChatRequest, generation: Generation) -> Generation:
        if not generation.text and not request.logprobs:
            # An answer with no text (a refusal by a content filter, a broken server) is no answer.
            reason = generation.finish_reason or "not given"
            raise RequestRejected(f"{self.spec.base_url}: empty answer (finish_reason={reason})")
        return generation

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (its `data:` lines joined); comments and other fields skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _reason(value: Any) -> str | None:
    return str(value) if value else None


def _first_token_logprobs(choice: dict[str, Any]) -> dict[str, float] | None:
    """`choices[0].logprobs.content[0].top_logprobs` as {token: logprob}; None if the endpoint sent none."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return None
    return {str(entry["token"]): float(entry["logprob"]) for entry in content[0].get("top_logprobs") or []}
