"""What one attempt of a stage came to: a `Generation`, or a `Failure` that is transient (try again)
or permanent (record it now). The engine host is the one place where exceptions become outcomes.

    EngineUnavailable (timeouts, engine death, no room, HTTP 429/5xx)   -> transient
    ModelTooLarge, RequestRejected, StageFailure (PromptTooLong, ...)  -> permanent
    anything else (a loader's OSError, a bug)                           -> permanent, with its type and
                                                                            message, traceback logged
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel

from orchestrator.errors import StageFailure
from workers.engines import EngineUnavailable, ModelTooLarge, RequestRejected

__all__ = ["Failure", "classify"]

log = logging.getLogger(__name__)


class Failure(BaseModel):
    kind: Literal["transient", "permanent"]
    message: str

    @property
    def transient(self) -> bool:
        return self.kind == "transient"


def classify(exc: BaseException, model: str, during: str) -> Failure:
    """The outcome of an exception raised while `during` (loading, generating, ...) on `model`."""
    if isinstance(exc, EngineUnavailable):
        return Failure(kind="transient", message=f"{model}: {exc}")
    if isinstance(exc, ModelTooLarge | RequestRejected | StageFailure):
        return Failure(kind="permanent", message=f"{model}: {exc}")
    log.error("%s: unexpected %s while %s", model, type(exc).__name__, during, exc_info=exc)
    return Failure(kind="permanent", message=f"{model}: {during}: {type(exc).__name__}: {exc}")
