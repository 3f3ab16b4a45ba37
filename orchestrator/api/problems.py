"""Errors as JSON problem details (`application/problem+json`), each naming its field path.

    ProblemError            raised by routes and deps: status, detail and every error found
    SlimMoAError            the orchestrator's errors: the status their class maps to (orchestrator.errors)
    DBAPIError              the database: 503 naming `slimmoa db upgrade` when the schema is not migrated,
                            503 when it cannot be reached
    HTTPException           FastAPI's and Starlette's (404 of unknown routes, 405, ...)
    RequestValidationError  request fields that fail their schema: 422, one line per field

Paths read like the request: `items[37].instruction: must not be empty`.

The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`) answer every error in OpenAI's
shape instead, `{"error": {"message", "type", "param", "code"}}`, which the `openai` SDK turns into its
exceptions; a request field that fails its schema is a 400 there, as OpenAI answers, with the field
as `param`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from db.migrate import schema_is_current
from orchestrator.api.bodies import Problem
from orchestrator.errors import SlimMoAError, validation_message
from orchestrator.settings import Settings

__all__ = [
    "ProblemError",
    "field_errors",
    "install_handlers",
    "openai_error_response",
    "openai_path",
    "openai_route",
    "problem_response",
    "validation_problem",
]

MEDIA_TYPE = "application/problem+json"

log = logging.getLogger(__name__)


class ProblemError(Exception):
    """An error a route answers with; `errors` lists field-level problems (the first is the detail)."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers
        # The field at fault and a machine-readable code, as the OpenAI-compatible routes report them.
        self.param = param
        self.code = code


def problem_response(
    status: int, detail: str, errors: Sequence[str] = (), headers: dict[str, str] | None = None
) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=list(errors))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers, media_type=MEDIA_TYPE)


def openai_path(path: str) -> bool:
    """Whether a path is an OpenAI-compatible route's, whose errors take OpenAI's shape."""
    return path.startswith("/v1/chat/") or path == "/v1/models" or path.startswith("/v1/models/")


def openai_route(request: Request) -> bool:
    return openai_path(request.url.path)


_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def field_errors(errors: Iterable[Any], drop: tuple[str, ...] = ("body",)) -> list[str]:
    """Pydantic errors as `path: message` lines; `drop` removes leading location parts such as `body`."""
    lines = []
    for error in errors:
        loc = list(error["loc"])
        while loc and loc[0] in drop:
            loc.pop(0)
        message = validation_message(error)
        lines.append(f"{_path(loc)}: {message}" if loc else message)
    return lines


def validation_problem(exc: ValidationError | RequestValidationError) -> ProblemError:
    errors = field_errors(exc.errors())
    return ProblemError(422, errors[0] if errors else "invalid request", errors)


def _database_problem(exc: DBAPIError, settings: Settings) -> ProblemError:
    """A database error the API cannot answer around: say which, if it is one a user can fix."""
    try:
        current = schema_is_current(settings.database_url)
    except DBAPIError:
        return ProblemError(503, "the database cannot be reached; try again when it is back")
    if not current:
        return ProblemError(503, "the database schema is not migrated: run `slimmoa db upgrade`")
    log.exception("database error", exc_info=exc)
    return ProblemError(500, "internal error; the server log has the details")


def _answer(request: Request, problem: ProblemError) -> JSONResponse:
    """The problem in the shape the route's clients read."""
    if openai_route(request):
        return openai_error_response(
            problem.status, problem.detail, param=problem.param, code=problem.code, headers=problem.headers
        )
    return problem_response(problem.status, problem.detail, problem.errors, problem.headers)


def _first_field(exc: RequestValidationError) -> str | None:
    """The path of the first field at fault (`messages[0].role`), as OpenAI's `param` names it."""
    for error in exc.errors():
        loc = [part for part in error["loc"] if part != "body"]
        if loc:
            return _path(loc)
    return None


def install_handlers(app: FastAPI, settings: Settings) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProblemError)
        return _answer(request, exc)

    async def on_slimmoa(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SlimMoAError)
        return _answer(request, ProblemError(exc.status, str(exc), [str(exc)]))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        return _answer(request, ProblemError(exc.status_code, str(exc.detail), headers=headers))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problem = validation_problem(exc)
        if openai_route(request):
            return openai_error_response(400, problem.detail, param=_first_field(exc))
        return problem_response(problem.status, problem.detail, problem.errors)

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DBAPIError)
        return _answer(request, await run_in_threadpool(_database_problem, exc, settings))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _answer(request, ProblemError(500, "internal error; the server log has the details"))

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(SlimMoAError, on_slimmoa)
    app.add_exception_handler(DBAPIError, on_database)
    app.add_exception_handler(Exception, on_error)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
