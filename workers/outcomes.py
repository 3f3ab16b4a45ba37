"""What one attempt of a stage came to: a `Generation`, or a `Failure` that is transient (try again)
or permanent (record it now). The engine host is the one place where exceptions become outcomes.

    EngineUnavailable (timeouts, engine death, no room, HTTP 429/5xx)   -> transient
    ModelTooLarge, RequestRejected, StageFailure (PromptTooLong, ...)  -> permanent
    anything else (a loader's OSError, a bug)                           -> permanent, with its type and
                                                                            message, traceback logged
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

from pydantic import BaseModel

from orchestrator.errors import StageFailure
from workers.engines import EngineUnavailable, ModelTooLarge, RequestRejected
from workers.metrics import ENGINE_LOAD_FAILED

__all__ = ["FailedLoads", "Failure", "LoadFailed", "classify"]

log = logging.getLogger(__name__)


class Failure(BaseModel):
    kind: Literal["transient", "permanent"]
    message: str

    @property
    def transient(self) -> bool:
        return self.kind == "transient"


class LoadFailed(Exception):
    """A model could not be made ready; `failure` is the outcome its stages record."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class FailedLoads:
    """Permanent load failures, remembered for `ttl_s`: the model's stages then fail at once with the
    loader's message instead of each paying for a load that cannot work."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[float, Failure]] = {}

    def remember(self, model: str, failure: Failure) -> None:
        if failure.transient or self.ttl_s <= 0:
            return
        with self._lock:
            self._failures[model] = (time.monotonic() + self.ttl_s, failure)
        ENGINE_LOAD_FAILED.labels(model).set(1)

    def get(self, model: str) -> Failure | None:
        """The model's remembered failure, if it has one still."""
        with self._lock:
            until, failure = self._failures.get(model, (0.0, None))
            if failure is not None and until <= time.monotonic():
                del self._failures[model]
                ENGINE_LOAD_FAILED.labels(model).set(0)
                return None
            return failure


def classify(exc: BaseException, model: str, during: str) -> Failure:
    """The outcome of an exception raised while `during` (loading, generating, ...) on `model`."""
    if isinstance(exc, EngineUnavailable):
        return Failure(kind="transient", message=f"{model}: {exc}")
    if isinstance(exc, ModelTooLarge | RequestRejected | StageFailure):
        return Failure(kind="permanent", message=f"{model}: {exc}")
    log.error("%s: unexpected %s while %s", model, type(exc).__name__, during, exc_info=exc)
    return Failure(kind="permanent", message=f"{model}: {during}: {type(exc).__name__}: {exc}")
