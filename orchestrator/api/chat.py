"""OpenAI-compatible routes: `POST /v1/chat/completions` answers with a recipe, `GET /v1/models` lists
the recipes. Errors take OpenAI's shape (`orchestrator.api.problems`).

A streamed answer is sent as server-sent events in OpenAI's chunk format: a first chunk with the
assistant's role, one chunk per delta as the aggregator generates it, a last chunk with the finish
reason, the usage chunk when `stream_options.include_usage` asks for it, then `data: [DONE]`. A failure
after the stream began is sent as an `{"error": ...}` event before `[DONE]`. A client that goes away
cancels the request: its queued stages return without working and the aggregator stops generating.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from orchestrator.api.deps import SessionDep, SettingsDep
from orchestrator.api.openai_bodies import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatDelta,
    ModelCard,
    ModelList,
    OpenAIError,
)
from orchestrator.api.problems import ProblemError
from orchestrator.chat import ChatRequest, abandon, answer_records, chat_submission, request_usage, start_chat
from orchestrator.errors import RecipeError
from orchestrator.recipes import Recipe, available_recipes, load_recipe
from orchestrator.settings import Settings
from orchestrator.streams import DeltaRecord, ErrorRecord, FinalRecord

__all__ = ["router"]

router = APIRouter(tags=["chat"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": OpenAIError} for status in (400, 401, 404, 500, 503)
}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
def list_models(settings: SettingsDep) -> ModelList:
    """Every recipe that loads, as a model a chat completion may name."""
    cards = []
    for name in available_recipes(settings.recipes_dir):
        path = settings.recipes_dir / f"{name}.yaml"
        created = int(path.stat().st_mtime) if path.exists() else 0
        cards.append(ModelCard(id=name, created=created))
    return ModelList(data=cards)


def _recipe(name: str, settings: Settings) -> Recipe:
    if name not in available_recipes(settings.recipes_dir):
        raise ProblemError(
            404,
            f"The model {name!r} does not exist (GET /v1/models lists the recipes)",
            param="model",
            code="model_not_found",
        )
    try:
        return load_recipe(name, settings.recipes_dir)
    except RecipeError as exc:
        raise ProblemError(500, f"recipe {name!r} does not load: {exc}", param="model") from None


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=_ERRORS | {200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, session: SessionDep, settings: SettingsDep
) -> ChatCompletion | StreamingResponse:
    """Answer a conversation with the recipe `model`: one `chat.completion`, or a stream of chunks."""
    recipe = _recipe(body.model, settings)
    try:
        submission = chat_submission(recipe, body)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ProblemError(400, f"messages: {problem['msg']}", param="messages") from None
    job_id = await run_in_threadpool(start_chat, session, submission)
    chat = ChatRequest(job_id, body.model, int(time.time()))
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _events(chat, request, settings, include_usage=include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await _completion(chat, request, settings)


async def _completion(chat: ChatRequest, request: Request, settings: Settings) -> ChatCompletion:
    text: list[str] = []
    finished = False
    try:
        async for record in answer_records(settings, chat.job_id, request.is_disconnected):
            if isinstance(record, DeltaRecord):
                text.append(record.text)
            elif isinstance(record, ErrorRecord):
                raise ProblemError(_status(record), record.message, code=record.code)
            else:
                finished = True
                usage = await run_in_threadpool(request_usage, settings.database_url, chat.job_id, record)
                choice = ChatChoice(
                    message=AssistantMessage(content="".join(text)), finish_reason=record.finish_reason
                )
                return ChatCompletion(
                    id=chat.completion_id,
                    created=chat.created,
                    model=chat.model,
                    choices=[choice],
                    usage=usage,
                )
    finally:
        if not finished:
            abandon(settings, chat.job_id)
    raise ProblemError(500, "the answer ended without a final record")


def _event(body: BaseModel) -> str:
    """One server-sent event: the body as JSON on a `data:` line."""
    return f"data: {body.model_dump_json()}\n\n"


def _status(record: ErrorRecord) -> int:
    return 499 if record.code == "cancelled" else 500


async def _events(
    chat: ChatRequest, request: Request, settings: Settings, *, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        body = ChatCompletionChunk(
            id=chat.completion_id, created=chat.created, model=chat.model, choices=[choice]
        )
        return f"data: {body.model_dump_json()}\n\n"

    finished = False
    try:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for record in answer_records(settings, chat.job_id, request.is_disconnected):
            if isinstance(record, DeltaRecord):
                yield chunk(ChatDelta(content=record.text))
            elif isinstance(record, FinalRecord):
                yield chunk(ChatDelta(), record.finish_reason)
                if include_usage:
                    usage = await run_in_threadpool(request_usage, settings.database_url, chat.job_id, record)
                    yield _event(ChatCompletionChunk(**chat.chunk_fields(), choices=[], usage=usage))
                finished = True
            else:
                error = OpenAIError.model_validate(
                    {"error": {"message": record.message, "type": "server_error", "code": record.code}}
                )
                yield _event(error)
                finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            abandon(settings, chat.job_id)
