"""The orchestrator's errors, and the one map from each to what the API and the CLI answer.

    SlimMoAError                  status (HTTP) and exit_code (CLI) say how the edges answer
     ├── InvalidInput     422 / 2 the caller's input cannot be used; nothing was stored
     │    ├── RecipeError         a recipe file or object fails validation
     │    ├── InputError          a prompt file cannot be read
     │    ├── ExportError         an export format or rule that does not exist
     │    └── EvaluationError     a reference or judge that does not fit the job
     ├── NotFound         404 / 1
     │    └── JobNotFound
     ├── Conflict         409 / 1
     │    └── NotRetryable        the job or items named cannot be re-run
     ├── Unavailable      503 / 1 a service this needs is not there
     │    └── EmbeddedError       the private Redis or worker of `slimmoa run` did not start
     ├── ApiError         (its status) / 1   the HTTP API answered a client command with an error
     └── StageFailure     a stage's permanent failure, recorded on its row (never an HTTP answer)
          ├── PromptTooLong       the instruction leaves no room for the candidates and the answer
          └── NoVerdict           neither verdict token is among the judge's first tokens

Engine errors are the workers' (`workers.engines.errors`); `db` raises SQLAlchemy's own.
"""

from __future__ import annotations

__all__ = [
    "USAGE_ERROR",
    "ApiError",
    "Conflict",
    "EmbeddedError",
    "EvaluationError",
    "ExportError",
    "InputError",
    "InvalidInput",
    "JobNotFound",
    "NoVerdict",
    "NotFound",
    "NotRetryable",
    "PromptTooLong",
    "RecipeError",
    "SlimMoAError",
    "StageFailure",
    "Unavailable",
    "validation_message",
]

# Exit code of a command refused before it did anything (bad input, unknown recipe, missing file).
USAGE_ERROR = 2


class SlimMoAError(Exception):
    """Base of the orchestrator's errors; the class says how the API and the CLI answer it."""

    status = 500
    exit_code = 1


class InvalidInput(SlimMoAError, ValueError):
    status = 422
    exit_code = USAGE_ERROR


class RecipeError(InvalidInput):
    """A recipe that cannot be loaded; the message names the file and the field."""


class InputError(InvalidInput):
    """A prompt file that cannot be used; the message says where and why."""


class ExportError(InvalidInput):
    """An export that cannot be made as asked: `param` names the parameter at fault, `reason` says why."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class EvaluationError(InvalidInput):
    """An evaluation that cannot start; the message names the file, setting or job at fault."""


class NotFound(SlimMoAError, LookupError):
    status = 404


class JobNotFound(NotFound):
    """No job with that id."""


class Conflict(SlimMoAError):
    status = 409


class NotRetryable(Conflict, ValueError):
    """The job or the items named cannot be retried; the message says why."""


class Unavailable(SlimMoAError):
    status = 503


class EmbeddedError(Unavailable, RuntimeError):
    """The embedded services could not be started."""


class ApiError(SlimMoAError, RuntimeError):
    """The API answered with an error (or could not be reached: status 0); the message is its detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class StageFailure(SlimMoAError, ValueError):
    """A stage that will fail the same way again: recorded on its row at once, never retried."""


class PromptTooLong(StageFailure):
    """The instruction alone leaves no room for the candidates and the answer."""


class NoVerdict(StageFailure):
    """Neither verdict token is among the judge's top first tokens."""


def validation_message(error: dict[str, object]) -> str:
    """One pydantic error's message as users read it: `is required`, or the validator's own words."""
    if error["type"] == "missing":
        return "is required"
    return str(error["msg"]).removeprefix("Value error, ")
