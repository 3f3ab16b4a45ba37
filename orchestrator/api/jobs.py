"""/v1/jobs: submit, list, progress, items, results, cancel, retry."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from db import queries, residency
from db.models import FINAL_JOB_STATUSES, ItemStatus, JobStatus
from db.session import session_scope
from orchestrator.api.deps import JobDep, PageDep, SessionDep, SettingsDep
from orchestrator.api.intake import read_submission
from orchestrator.api.problems import ProblemError
from orchestrator.api.schemas import (
    MAX_ID,
    EngineLoadsPublic,
    ItemDetailPublic,
    ItemPublic,
    ItemsPublic,
    JobDetailPublic,
    JobPublic,
    JobsPublic,
    Problem,
    ProgressPublic,
    RetryCreate,
    RetryResult,
)
from orchestrator.exports import (
    MEDIA_TYPES,
    METADATA_HEADER,
    ExportError,
    ExportFormat,
    Rejected,
    open_export,
)
from orchestrator.fleet import unserved_models
from orchestrator.jobs import submit_job
from orchestrator.recovery import JobNotFound, NotRetryable, retry_job

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])

_SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobUpload"}},
        },
    }
}
# Route-specific errors; 401, 422 (and 400, 413 where a body is read) are added to every /v1 route.
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem}}
_CONFLICT: dict[int | str, dict[str, Any]] = {**_NOT_FOUND, 409: {"model": Problem}}
_EXPORT: dict[str, Any] = {
    "content": {media_type: {} for media_type in MEDIA_TYPES},
    "headers": {
        METADATA_HEADER: {
            "description": "The export's metadata record (JSON): job, recipe, models, preference rule.",
            "schema": {"type": "string"},
        }
    },
}


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    openapi_extra=_SUBMIT_BODY,
    responses={
        200: {"model": JobPublic, "description": "A retried submit: the first job."},
        415: {"model": Problem},
    },
)
async def create_job(
    request: Request,
    response: Response,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="A retried submit with this key returns the first job."),
    ] = None,
) -> JobPublic:
    """Validate the recipe and every item, store the job and its items in one transaction, then enqueue."""
    submission = await read_submission(request, settings)
    job_id, created = await run_in_threadpool(submit_job, settings.database_url, submission, idempotency_key)
    if not created:
        response.status_code = 200
    return await run_in_threadpool(_job_public, settings.database_url, job_id)


def _job_public(database_url: str, job_id: str) -> JobPublic:
    with session_scope(database_url) as session:
        return JobPublic.model_validate(queries.get_job(session, job_id))


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, page: PageDep, status: JobStatus | None = None) -> JobsPublic:
    jobs, count = queries.list_jobs(session, status=status, offset=page.offset, limit=page.limit)
    return JobsPublic(data=[JobPublic.model_validate(job) for job in jobs], count=count)


@router.get("/{job_id}", response_model=JobDetailPublic, responses=_NOT_FOUND)
def read_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobDetailPublic:
    """The job with its progress: counts per stage and status, tokens, rate and ETA, and the models
    that no live worker serves."""
    progress = ProgressPublic.of(job, queries.job_counts(session, job.id))
    loads = EngineLoadsPublic(**asdict(residency.load_stats(session, job.id)))
    unserved = [] if job.status in FINAL_JOB_STATUSES else unserved_models(job.recipe, settings)
    return JobDetailPublic(
        **JobPublic.model_validate(job).model_dump(),
        progress=progress,
        engine=loads,
        unserved_models=unserved,
    )


@router.get("/{job_id}/items", response_model=ItemsPublic, responses=_NOT_FOUND)
def list_items(
    job: JobDep, session: SessionDep, page: PageDep, status: ItemStatus | None = None
) -> ItemsPublic:
    items, count = queries.list_items(session, job.id, status=status, offset=page.offset, limit=page.limit)
    return ItemsPublic(data=[ItemPublic.model_validate(item) for item in items], count=count)


@router.get("/{job_id}/items/{item_id}", response_model=ItemDetailPublic, responses=_NOT_FOUND)
def read_item(
    job: JobDep, session: SessionDep, item_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> ItemDetailPublic:
    """The item with its whole candidate pool, per layer, and its output."""
    item = queries.get_item(session, item_id)
    if item is None or item.job_id != job.id:
        raise ProblemError(404, f"item {item_id} not found in job {job.id}")
    return ItemDetailPublic.of(item, item.output)


@router.get(
    "/{job_id}/results",
    response_class=StreamingResponse,
    responses={200: _EXPORT, **_NOT_FOUND},
)
def read_results(
    job: JobDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[ExportFormat, Query()] = ExportFormat.JSONL,
    rejected: Annotated[
        str,
        Query(
            max_length=300,
            description="preference only: which final-layer candidate is rejected: "
            "shortest, longest, random (seeded by the item) or model:NAME.",
        ),
    ] = "shortest",
) -> StreamingResponse:
    """Stream the finished items (the job may still run) in one of the export formats."""
    try:
        export = open_export(settings.database_url, job, format, Rejected.parse(rejected))
    except ExportError as exc:
        raise ProblemError(422, str(exc), [str(exc)]) from None
    session.close()  # the export reads in pages of its own; hold no connection while the client reads
    headers = {
        "Content-Disposition": f'attachment; filename="{export.filename}"',
        METADATA_HEADER: export.metadata.header(),
    }
    return StreamingResponse(export.chunks, media_type=export.media_type, headers=headers)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=_CONFLICT)
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel: queued stages are dropped, running ones finish, the job ends `cancelled`."""
    if job.status != JobStatus.CANCELLED and not queries.cancel_job(session, job.id):
        session.refresh(job)
        raise ProblemError(409, f"job {job.id} already ended {job.status}")
    session.commit()
    session.refresh(job)
    return JobPublic.model_validate(job)


@router.post("/{job_id}/retry", response_model=RetryResult, responses=_CONFLICT)
def retry(job: JobDep, settings: SettingsDep, retry_in: RetryCreate | None = None) -> RetryResult:
    """Re-run the failed stages of a job (all, or only the named items)."""
    chosen = retry_in or RetryCreate()
    try:
        return retry_job(settings.database_url, job.id, stage=chosen.stage, item_ids=chosen.items)
    except JobNotFound:
        raise ProblemError(404, f"job {job.id!r} not found") from None
    except NotRetryable as exc:
        raise ProblemError(409, str(exc)) from None
