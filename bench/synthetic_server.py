"""An OpenAI-compatible chat endpoint on the synthetic engine: what `vllm serve` is to bench/peer.py,
in its tiny setting (no model weights, every answer as long as the request's max_tokens allows).

    python -m bench.synthetic_server --port 8001 [--latency-ms 50] [--name smollm2]
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from orchestrator.contracts import ChatMessage
from orchestrator.recipes import SyntheticModel
from workers.engines import ChatRequest
from workers.engines.synthetic import SyntheticEngine

__all__ = ["create_app"]


class ChatCompletionCreate(BaseModel):
    """The fields of an OpenAI chat completion request the peer client sends."""

    model: str
    messages: list[ChatMessage]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


def create_app(name: str, latency_ms: float) -> FastAPI:
    engine = SyntheticEngine(
        name, SyntheticModel(engine="synthetic", latency_ms=latency_ms, output_tokens=10**6)
    )
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def complete(body: ChatCompletionCreate) -> dict[str, Any]:
        request = ChatRequest(request_id=uuid.uuid4().hex, **body.model_dump(exclude={"model"}))
        generation = await engine.generate(request)
        return {
            "id": request.request_id,
            "object": "chat.completion",
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.output_tokens,
                "total_tokens": (generation.prompt_tokens or 0) + (generation.output_tokens or 0),
            },
        }

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--name", default="smollm2")
    args = parser.parse_args()
    uvicorn.run(create_app(args.name, args.latency_ms), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
