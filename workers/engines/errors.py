"""Engine errors, split by what a stage should do about them.

EngineError
 ├── EngineUnavailable   transient: timeouts, connection loss, OOM at generation -> retry with backoff
 │    └── EngineOutOfMemory   a load ran out of device memory -> the host keeps fewer models resident
 ├── ModelTooLarge       permanent: the model alone needs more than the worker's memory budget
 └── RequestRejected     permanent: prompt longer than context, content refused -> record at once
      └── RequestCancelled    the caller stopped a stream (its client went away) -> record, never retry
"""

from __future__ import annotations

__all__ = [
    "EngineError",
    "EngineOutOfMemory",
    "EngineUnavailable",
    "ModelTooLarge",
    "RequestCancelled",
    "RequestRejected",
]


class EngineError(Exception):
    """Base of every error an engine raises for a request."""


class EngineUnavailable(EngineError):
    """The engine could not answer now; the same request may succeed later."""


class RequestRejected(EngineError):
    """The engine will never answer this request as it stands."""


class RequestCancelled(RequestRejected):
    """The caller stopped the request while it streamed; nobody is waiting for the rest."""


class EngineOutOfMemory(EngineUnavailable):
    """Loading the model ran out of memory: fewer models must stay resident beside it."""


class ModelTooLarge(EngineError):
    """The model needs more memory than the worker's whole budget."""
