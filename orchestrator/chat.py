"""A recipe served as a model: a chat completion request runs as a one-item job of kind `chat`.

The request is stored like any job (its conversation as the item's `messages`, its sampling folded
into the recipe it is stored with) and its stages are sent by the API itself (no dispatch task to
wait for) at the interactive priority step, to the models' chat queues, so they are taken before any
bulk job's. Its proposers answer the conversation in parallel; its aggregator streams
the answer into the request's Redis Stream (`workers.chat_stream`), which `answer_records` reads back
for the HTTP response. The answer is stored before the stream says it is finished, so the record and
what the client read are the same text.

Sampling precedence, one rule for every field: the request's value, else the recipe's aggregator
sampling (whose own defaults are `SamplingSpec`'s). The proposers keep the recipe's sampling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from db import progress
from db.models import FINAL_JOB_STATUSES, JobKind, JobStatus
from db.session import session_scope
from orchestrator.api.openai_bodies import ChatCompletionCreate, ChatUsage
from orchestrator.canvas import dispatch
from orchestrator.contracts import InputRecord
from orchestrator.recipes import Recipe
from orchestrator.settings import Settings
from orchestrator.streams import ErrorRecord, FinalRecord, Record, StreamReader
from orchestrator.submission import Submission, store_job

__all__ = ["ChatRequest", "abandon", "answer_records", "chat_submission", "request_usage", "start_chat"]

log = logging.getLogger(__name__)

# How long a request may wait for its answer (queue, proposers, aggregator) before it is given up.
ANSWER_TIMEOUT_S = 1800.0
# Without a record for this long, the relay asks the record whether the request failed (a proposer
# pool below `min_pool` ends it without an aggregator) and whether its client is still there.
IDLE_MS = 1000


@dataclass(frozen=True)
class ChatRequest:
    """A stored chat request: its job, and the name it is answered under."""

    job_id: str
    model: str
    created: int

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.job_id}"

    def chunk_fields(self) -> dict[str, str | int]:
        """What every chunk of the answer repeats: its id, creation time and model."""
        return {"id": self.completion_id, "created": self.created, "model": self.model}


def with_request_sampling(recipe: Recipe, body: ChatCompletionCreate) -> Recipe:
    """The recipe with the request's sampling over its aggregator's: request, then recipe."""
    caps = [value for value in (body.max_tokens, body.max_completion_tokens) if value is not None]
    given = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": min(caps) if caps else None,
        "seed": body.seed,
    }
    overrides = {field: value for field, value in given.items() if value is not None}
    if not overrides:
        return recipe
    sampling = recipe.aggregator.sampling.model_copy(update=overrides)
    aggregator = recipe.aggregator.model_copy(update={"sampling": sampling})
    return recipe.model_copy(update={"aggregator": aggregator})


def chat_submission(recipe: Recipe, body: ChatCompletionCreate) -> Submission:
    """The one-item job a request is stored as; ValidationError names the field at fault."""
    record = InputRecord.model_validate({"id": "0", "messages": [m.model_dump() for m in body.messages]})
    return Submission(with_request_sampling(recipe, body), [record], kind=JobKind.CHAT)


def start_chat(session: Session, submission: Submission) -> str:
    """Store the request's job, commit, and send its stages from here: a chat request does not wait for
    a control worker's thread to dispatch it. Returns the job's id."""
    job_id = store_job(session, submission).id
    session.commit()
    dispatch(job_id)
    return job_id


async def answer_records(
    settings: Settings, job_id: str, disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[Record]:
    """The request's records as they come (deltas, then a final or error record). Ends with an error
    record when the request failed before its aggregator streamed, or when its client went away."""
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    reader = StreamReader(client, job_id)

    async def on_idle() -> Record | None:
        if await disconnected():
            return ErrorRecord(message="the client disconnected", code="cancelled")
        return await run_in_threadpool(_failure, settings.database_url, job_id)

    try:
        async for record in reader.records(ANSWER_TIMEOUT_S, on_idle=on_idle, idle_ms=IDLE_MS):
            yield record
    finally:
        await client.aclose()


def _failure(database_url: str, job_id: str) -> ErrorRecord | None:
    """An error record when the request's job ended without an answer to stream (None otherwise)."""
    with session_scope(database_url) as session:
        job = progress.get_job(session, job_id)
        if job is None or job.status not in FINAL_JOB_STATUSES:
            return None
        if job.items_failed:
            error = progress.latest_error(session, job_id) or job.error or "the request failed"
            return ErrorRecord(message=error, code="stage_failed")
        if job.status == JobStatus.CANCELLED:
            return ErrorRecord(message="the request was cancelled", code="cancelled")
        return None


def request_usage(database_url: str, job_id: str, final: FinalRecord) -> ChatUsage:
    """Every stage's tokens of the request, from the record; the final answer's from its final record
    (it may not be stored yet). A sequential aggregator's steps are the aggregator's, not the proposers'."""
    with session_scope(database_url) as session:
        counts = progress.job_counts(session, job_id)
    prompt = counts.proposer_prompt_tokens + counts.step_prompt_tokens + (final.usage.prompt_tokens or 0)
    completion = (
        counts.proposer_output_tokens + counts.step_output_tokens + (final.usage.completion_tokens or 0)
    )
    return ChatUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        proposer_prompt_tokens=counts.proposer_prompt_tokens,
        proposer_completion_tokens=counts.proposer_output_tokens,
    )


# Abandoned requests being cancelled in the background (a reference keeps each task alive).
_abandoning: set[asyncio.Task[None]] = set()


def abandon(settings: Settings, job_id: str) -> None:
    """The client went away: stop the request's stages (queued ones return at once, the streaming
    aggregator stops its engine request) without waiting for it here."""

    async def cancel() -> None:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            await StreamReader(client, job_id).cancel()
        finally:
            await client.aclose()
        await run_in_threadpool(_cancel_job, settings.database_url, job_id)

    task = asyncio.get_running_loop().create_task(cancel())
    _abandoning.add(task)
    task.add_done_callback(_abandoning.discard)


def _cancel_job(database_url: str, job_id: str) -> None:
    with session_scope(database_url) as session:
        if progress.cancel_job(session, job_id):
            session.commit()
            log.info("chat request %s cancelled: its client disconnected", job_id)
