"""/healthz (the database and the broker answer) and /readyz (and the schema is migrated)."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from db.migrate import schema_is_current
from db.session import get_engine
from orchestrator.api.bodies import HealthPublic
from orchestrator.api.deps import SettingsDep
from orchestrator.settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["health"])

# A health probe must answer quickly even when a dependency hangs.
PROBE_TIMEOUT_S = 2.0


def _database(settings: Settings) -> str:
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


def _broker(settings: Settings) -> str:
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )
        with client:
            client.ping()
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


def _answer(health: HealthPublic) -> JSONResponse:
    ok = health.database == "ok" and health.broker == "ok"
    health.status = "ok" if ok else "unavailable"
    return JSONResponse(health.model_dump(), status_code=200 if ok else 503)


@router.get("/healthz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def healthz(settings: SettingsDep) -> JSONResponse:
    """200 when the database and the broker answer, 503 otherwise."""
    return _answer(HealthPublic(status="", database=_database(settings), broker=_broker(settings)))


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(settings: SettingsDep) -> JSONResponse:
    """200 when healthy and the database schema is at the newest migration, 503 otherwise."""
    database = _database(settings)
    if database == "ok" and not schema_is_current(settings.database_url):
        database = "schema not migrated: run `slimmoa db upgrade`"
    return _answer(HealthPublic(status="", database=database, broker=_broker(settings)))
