"""The FastAPI application: `/v1` routes behind the bearer token, health probes, `/metrics`, a request
size limit.

Run it with `slimmoa api` (uvicorn). OpenAPI is served at `/openapi.json` and `/docs`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api import chat, health, jobs, recipes
from orchestrator.api.bodies import JobCreate, JobUpload, Problem
from orchestrator.api.deps import require_token
from orchestrator.api.metrics import RequestMetrics, metrics_router
from orchestrator.api.openai_bodies import OpenAIError
from orchestrator.api.problems import install_handlers, openai_error_response, openai_path, problem_response
from orchestrator.settings import Settings, get_settings

__all__ = ["create_app"]


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to a request whose body exceeds `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body exceeds {self.limit} bytes"
        if openai_path(scope["path"]):
            response = openai_error_response(413, detail)
        else:
            response = problem_response(413, detail)
        await response(scope, receive, send)


def _document_problems(schema: dict[str, Any]) -> None:
    """Every error answer is a Problem: 401 and 422 on every /v1 route, 400 and 413 where a body is read.
    The OpenAI-compatible routes answer OpenAI's error object instead, and a bad field is a 400 there."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    openai = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            codes = {"422"} | ({"401"} if path.startswith("/v1/") else set())
            codes |= {"400", "413"} if "requestBody" in operation else set()
            if openai_path(path):
                responses.pop("422", None)
                codes = (codes - {"422"}) | {"400"}
            for code in codes | {c for c in responses if c.startswith(("4", "5")) and c != "503"}:
                description = responses.get(code, {}).get("description") or HTTPStatus(int(code)).phrase
                content = openai if openai_path(path) else problem
                responses[code] = {"description": description, "content": content}
    for unused in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(unused, None)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, plus the two bodies POST /v1/jobs reads itself, and problems documented."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (JobCreate, JobUpload, Problem, OpenAIError):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        _document_problems(schema)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; `settings` replaces the environment's (tests pass their own)."""
    chosen = settings or get_settings()
    app = FastAPI(
        title="SlimMoA",
        version="0.1.0",
        description="Mixture-of-Agents generation jobs: submit, watch, export, cancel, retry.",
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
    v1.include_router(jobs.router)
    v1.include_router(recipes.router)
    v1.include_router(chat.router)
    app.include_router(v1)
    app.include_router(health.router)
    install_handlers(app, chosen)
    registry = CollectorRegistry()
    app.include_router(metrics_router(registry, settings))
    app.add_middleware(BodySizeLimit, limit=chosen.max_request_bytes)
    app.add_middleware(RequestMetrics, registry=registry)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
