"""A Redis Stream per request: the inference worker writes an answer as it is generated, the API reads it.

One stream per job, `{prefix}:{job_id}`. Its entries, in order: any number of `DeltaRecord`, then
exactly one `FinalRecord` (finish reason, usage) or `ErrorRecord`. The concatenated deltas are the
answer. A Stream rather than pub/sub: a reader reads from the first entry whenever it arrives, so one
that subscribes late misses nothing. Each entry has one field, `record`, the record as JSON.

Expiry: a stream expires `finished_ttl_s` after its last record (time enough for a late reader), and
`open_ttl_s` after its first one, so that the stream of a writer that died does not stay forever.
Cancellation: the reader sets `{prefix}:{job_id}:cancel` (its client went away); the stages ask
`StreamWriter.cancelled()` and stop.

Writer (sync, in a stage's thread) and reader (async, in the API)::

    writer = StreamWriter(redis.Redis.from_url(url), job_id)
    writer.delta("Hel")
    writer.delta("lo.")
    writer.final(FinalRecord(finish_reason="stop", usage=Usage(prompt_tokens=9, completion_tokens=2)))

    reader = StreamReader(redis.asyncio.Redis.from_url(url), job_id)
    async for record in reader.records(timeout_s=600):
        ...  # DeltaRecord..., then FinalRecord or ErrorRecord
    await reader.cancel()  # on a client disconnect
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

import redis
import redis.asyncio
from pydantic import BaseModel, Field, TypeAdapter

__all__ = [
    "DEFAULT_PREFIX",
    "DeltaRecord",
    "ErrorRecord",
    "FinalRecord",
    "Record",
    "StreamReader",
    "StreamTimeout",
    "StreamWriter",
    "Usage",
    "cancel_key",
    "stream_key",
]

DEFAULT_PREFIX = "slimmoa.stream"
# Long enough for a reader that comes late (a slow client, a reconnect) to read the whole answer.
FINISHED_TTL_S = 600
# Longer than any answer takes (4,096 tokens at 60 tokens/s is about 70 s, plus the proposers and a
# queue): a stream still open after this long lost its writer.
OPEN_TTL_S = 3600
# One XREAD waits at most this long before the reader looks at its time limit again.
BLOCK_MS = 5000
READ_COUNT = 512


class Usage(BaseModel):
    """Tokens of the whole request, every stage counted (None: an engine did not say)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The proposers' share of the counts above.
    proposer_prompt_tokens: int | None = None
    proposer_completion_tokens: int | None = None


class DeltaRecord(BaseModel):
    type: Literal["delta"] = "delta"
    text: str


class FinalRecord(BaseModel):
    type: Literal["final"] = "final"
    finish_reason: str | None
    usage: Usage


class ErrorRecord(BaseModel):
    type: Literal["error"] = "error"
    message: str
    # What the API maps to a status or an error type, e.g. "cancelled", "engine_unavailable".
    code: str | None = None


Record = DeltaRecord | FinalRecord | ErrorRecord
_RECORD: TypeAdapter[Record] = TypeAdapter(Annotated[Record, Field(discriminator="type")])


class StreamTimeout(TimeoutError):
    """No final record within the reader's time limit."""


def stream_key(job_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:{job_id}"


def cancel_key(job_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:{job_id}:cancel"


class StreamWriter:
    """Appends one request's records; `cancelled` tells its stages that nobody waits any more."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        open_ttl_s: int = OPEN_TTL_S,
        finished_ttl_s: int = FINISHED_TTL_S,
    ) -> None:
        self.client = client
        self.key = stream_key(job_id, prefix)
        self._cancel_key = cancel_key(job_id, prefix)
        self.open_ttl_s = open_ttl_s
        self.finished_ttl_s = finished_ttl_s
        self._opened = False

    def delta(self, text: str) -> None:
        self._append(DeltaRecord(text=text), None if self._opened else self.open_ttl_s)
        self._opened = True

    def final(self, record: FinalRecord) -> None:
        self._append(record, self.finished_ttl_s)

    def error(self, record: ErrorRecord) -> None:
        self._append(record, self.finished_ttl_s)

    def cancelled(self) -> bool:
        """Whether the reader asked to stop (its client disconnected)."""
        return bool(self.client.exists(self._cancel_key))

    def _append(self, record: Record, ttl_s: int | None) -> None:
        fields: dict[Any, Any] = {"record": record.model_dump_json()}
        if ttl_s is None:
            self.client.xadd(self.key, fields)
            return
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, fields)
            pipe.expire(self.key, ttl_s)
            pipe.execute()


class StreamReader:
    """Reads one request's records from the first one, waiting for those still to come."""

    def __init__(self, client: redis.asyncio.Redis, job_id: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.key = stream_key(job_id, prefix)
        self._cancel_key = cancel_key(job_id, prefix)

    async def records(
        self,
        timeout_s: float,
        *,
        on_idle: Callable[[], Awaitable[Record | None]] | None = None,
        idle_ms: int = BLOCK_MS,
    ) -> AsyncIterator[Record]:
        """Every record in order, up to and including the final (or error) one; raises StreamTimeout
        if that has not come within `timeout_s`. `on_idle` is asked after every `idle_ms` without a
        record (is the writer still there? is the client?): a record it returns ends the stream."""
        deadline = time.monotonic() + timeout_s
        last: Any = "0-0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamTimeout(f"{self.key}: no final record within {timeout_s:g} s")
            block = max(1, min(idle_ms, int(remaining * 1000)))
            reply: Any = await self.client.xread({self.key: last}, count=READ_COUNT, block=block)
            if not reply and on_idle is not None:
                ended = await on_idle()
                if ended is not None:
                    yield ended
                    return
            # [[key, entries]] as redis-py answers by default; {key: entries} with its unified replies.
            for _, entries in reply.items() if isinstance(reply, dict) else reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    record = _parse(fields)
                    yield record
                    if not isinstance(record, DeltaRecord):
                        return

    async def cancel(self, ttl_s: int = OPEN_TTL_S) -> None:
        """Ask the request's stages to stop (its client went away); the signal lasts `ttl_s`."""
        await self.client.set(self._cancel_key, 1, ex=ttl_s)


def _parse(fields: Mapping[Any, Any]) -> Record:
    """One entry's record (a client may or may not decode responses: keys are bytes or str)."""
    raw = fields.get(b"record", fields.get("record"))
    return _RECORD.validate_json(raw)
