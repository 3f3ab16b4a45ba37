"""Engine errors, split by what a stage should do about them.

EngineError
 ├── EngineUnavailable   transient: timeouts, connection loss, OOM at generation -> retry with backoff
 │    └── EngineOutOfMemory   a load ran out of device memory -> the host keeps fewer models resident
 ├── ModelTooLarge       permanent: the model alone needs more than the worker's memory budget
 └── RequestRejected     permanent: prompt longer than context, content refused -> record at once
"""

from __future__ import annotations

__all__ = ["EngineError", "EngineOutOfMemory", "EngineUnavailable", "ModelTooLarge", "RequestRejected"]


class EngineError(Exception):
    """Base of every error an engine raises for a request."""


class EngineUnavailable(EngineError):
    """The engine could not answer now; the same request may succeed later."""


class RequestRejected(EngineError):
    """The engine will never answer this request as it stands."""


class EngineOutOfMemory(EngineUnavailable):
    """Loading the model ran out of memory: fewer models must stay resident beside it."""


class ModelTooLarge(EngineError):
    """The model needs more memory than the worker's whole budget."""
