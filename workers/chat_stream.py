"""The answer of a chat request as its aggregator generates it: deltas into the request's Redis Stream
(`orchestrator.streams`), then one final or error record. The API relays the stream to the client.

Once a delta has been sent the answer cannot start again: a transient failure after it is recorded as
the request's failure (an error record), never retried (`workers.stage_runner.attempt_stage`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import redis

from db.rows import GenerationRecord
from orchestrator.settings import get_settings
from orchestrator.streams import ErrorRecord, FinalRecord, StreamWriter, Usage

__all__ = ["ChatStream"]


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


class ChatStream:
    """One chat request's stream, written by its aggregator stage."""

    def __init__(self, job_id: str) -> None:
        self.writer = StreamWriter(_client(get_settings().redis_url), job_id)
        self.started = False
        # Whether the generation under way is the answer (a sequential aggregation's drafts are not).
        self.streaming: Callable[[], bool] = lambda: True

    def delta(self, text: str) -> None:
        if text and self.streaming():
            self.writer.delta(text)
            self.started = True

    def cancelled(self) -> bool:
        """Whether the client went away (the API set the request's cancel key)."""
        return self.writer.cancelled()

    def finish(self, output: GenerationRecord) -> None:
        """The answer is stored: say how it ended (the API adds the proposers' tokens from the record)."""
        usage = Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.output_tokens)
        self.writer.final(FinalRecord(finish_reason=output.finish_reason, usage=usage))

    def fail(self, message: str) -> None:
        self.writer.error(ErrorRecord(message=message, code="stage_failed"))
