"""The bodies of the OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`), in OpenAI's schema,
so that the `openai` SDK, LangChain and curl scripts talk to a recipe as to a model.

Unknown request fields are ignored (clients send many: `user`, `logprobs`, ...); the ones that change
the answer and are not supported (`n` other than 1) are refused naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.contracts import ChatMessage

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionCreate",
    "ChatDelta",
    "ChatUsage",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorBody",
    "StreamOptions",
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionCreate(BaseModel):
    """A chat completion request. `model` names a recipe (`GET /v1/models`); the sampling fields given
    override the recipe's aggregator sampling, the others keep the recipe's."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # OpenAI's newer name for max_tokens; the smaller wins when both are given.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    n: Literal[1] = Field(default=1, description="One answer per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatUsage(BaseModel):
    """Tokens of every stage of the request; the `proposer_*` fields say how many were the proposers'."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    proposer_prompt_tokens: int
    proposer_completion_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class _Answer(BaseModel):
    """What a completion and each chunk of a streamed one say of the answer they are part of."""

    id: str
    created: int
    model: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: ChatUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None


class ModelCard(BaseModel):
    """A recipe, served as a model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slimmoa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Every error of the OpenAI-compatible routes: `{"error": {message, type, param, code}}`."""

    error: OpenAIErrorBody
