"""Typed dependencies, so every route reads plainly: settings, a database session, the caller's token."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db.models import Job
from db.progress import get_job
from db.session import session_scope
from orchestrator.api.problems import ProblemError
from orchestrator.settings import Settings, get_settings

__all__ = ["JobDep", "PageDep", "SessionDep", "SettingsDep", "require_token"]

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One transaction per request; routes that write commit before they answer."""
    with session_scope(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="Required when SLIMMOA_API_TOKEN is set.")


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With a token configured, refuse (401) any request without `Authorization: Bearer <token>`."""
    if not settings.api_token:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not hmac.compare_digest(given, settings.api_token.encode()):
        raise ProblemError(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="slimmoa"'}
        )


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def get_job_or_404(session: SessionDep, job_id: Annotated[str, Path(description="The job's id.")]) -> Job:
    job = get_job(session, job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ProblemError(404, f"job {job_id!r} not found")
    return job


JobDep = Annotated[Job, Depends(get_job_or_404)]


@dataclass(frozen=True)
class Page:
    offset: int
    limit: int


def get_page(
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int | None, Query(ge=1, description="Default and maximum: see settings.")] = None,
) -> Page:
    chosen = settings.page_size_default if limit is None else limit
    if chosen > settings.page_size_max:
        message = f"limit: at most {settings.page_size_max}"
        raise ProblemError(422, message, [message])
    return Page(offset=offset, limit=chosen)


PageDep = Annotated[Page, Depends(get_page)]
