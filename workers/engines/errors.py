"""Engine errors, split by what a stage should do about them.

EngineError
 ├── EngineUnavailable   transient: timeouts, connection loss, OOM at generation -> retry with backoff
 └── RequestRejected     permanent: prompt longer than context, content refused -> record at once
"""

from __future__ import annotations

__all__ = ["EngineError", "EngineUnavailable", "RequestRejected"]


class EngineError(Exception):
    """Base of every error an engine raises for a request."""


class EngineUnavailable(EngineError):
    """The engine could not answer now; the same request may succeed later."""


class RequestRejected(EngineError):
    """The engine will never answer this request as it stands."""
