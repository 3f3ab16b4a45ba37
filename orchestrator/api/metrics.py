"""Prometheus metrics of the API at `/metrics`: requests by route and status, their latency, jobs by
status (read from the database at scrape time) and queue depths (read from Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.models import Job, JobStatus
from db.session import session_scope
from orchestrator.api.queue_metrics import QueueDepth
from orchestrator.settings import Settings, get_settings

__all__ = ["RequestMetrics", "metrics_router"]


class _JobsByStatus(Collector):
    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("slimmoa_jobs", "Jobs in the record by status.", labels=["status"])
        with session_scope((self.settings or get_settings()).database_url) as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
            )
        for status in JobStatus:
            family.add_metric([status.value], counts.get(status, 0))
        yield family


class RequestMetrics:
    """ASGI middleware counting requests and timing them, labelled by route template (not raw path)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "slimmoa_http_requests",
            "HTTP requests answered.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "slimmoa_http_request_seconds",
            "Time to answer, to the last byte.",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.seconds.labels(scope["method"], route).observe(time.perf_counter() - started)


def metrics_router(registry: CollectorRegistry, settings: Settings | None) -> APIRouter:
    """The `/metrics` route of one app: its own registry, so several apps in one process do not clash."""
    registry.register(_JobsByStatus(settings))
    registry.register(QueueDepth(settings))
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
