"""/v1/jobs: submit, list, progress, items, results, cancel, retry."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from db import progress, residency
from db.models import FINAL_JOB_STATUSES, ItemStatus, JobKind, JobStatus
from orchestrator.api.bodies import (
    MAX_ID,
    NOTICE_HEADER,
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
from orchestrator.api.deps import JobDep, PageDep, SessionDep, SettingsDep
from orchestrator.api.intake import read_submission
from orchestrator.api.problems import ProblemError
from orchestrator.export_writers import Rejected
from orchestrator.exports import (
    MEDIA_TYPES,
    METADATA_HEADER,
    ExportFormat,
    open_export,
)
from orchestrator.fleet import unserved_models
from orchestrator.recovery import retry_job
from orchestrator.submission import submit_job

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])

UNDISPATCHED_NOTICE = (
    "job stored; the broker is unreachable, the recovery sweep dispatches it when it is back"
)

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
        202: {
            "model": JobPublic,
            "description": "Stored, but the broker could not be reached: the recovery sweep dispatches "
            f"the job once it is back (the {NOTICE_HEADER} header says so).",
        },
        415: {"model": Problem},
    },
)
async def post_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="A retried submit with this key returns the first job."),
    ] = None,
) -> JobPublic:
    """Validate the recipe and every item, store the job and its items in one transaction, then enqueue."""
    submission = await read_submission(request, settings)
    submitted = await run_in_threadpool(submit_job, session, submission, idempotency_key)
    if not submitted.created:
        response.status_code = 200
    elif not submitted.dispatched:
        # Stored, not yet sent: the recovery sweep dispatches it once the broker answers again.
        response.status_code = 202
        response.headers[NOTICE_HEADER] = UNDISPATCHED_NOTICE
    return JobPublic.model_validate(submitted.job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep, page: PageDep, status: JobStatus | None = None, kind: JobKind | None = None
) -> JobsPublic:
    """Jobs newest first; `kind=chat` lists the chat completion requests (`bulk`: submitted jobs)."""
    jobs, count = progress.list_jobs(session, status=status, kind=kind, offset=page.offset, limit=page.limit)
    return JobsPublic(data=[JobPublic.model_validate(job) for job in jobs], count=count)


@router.get("/{job_id}", response_model=JobDetailPublic, responses=_NOT_FOUND)
def read_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobDetailPublic:
    """The job with its progress: counts per stage and status, tokens, rate and ETA, and the models
    that no live worker serves."""
    counts = ProgressPublic.of(job, progress.job_counts(session, job.id))
    loads = EngineLoadsPublic(**asdict(residency.load_stats(session, job.id)))
    unserved = [] if job.status in FINAL_JOB_STATUSES else unserved_models(job.recipe, settings)
    return JobDetailPublic(
        **JobPublic.model_validate(job).model_dump(),
        progress=counts,
        engine=loads,
        unserved_models=unserved,
    )


@router.get("/{job_id}/items", response_model=ItemsPublic, responses=_NOT_FOUND)
def list_items(
    job: JobDep, session: SessionDep, page: PageDep, status: ItemStatus | None = None
) -> ItemsPublic:
    items, count = progress.list_items(session, job.id, status=status, offset=page.offset, limit=page.limit)
    return ItemsPublic(data=[ItemPublic.model_validate(item) for item in items], count=count)


@router.get("/{job_id}/items/{item_id}", response_model=ItemDetailPublic, responses=_NOT_FOUND)
def read_item(
    job: JobDep, session: SessionDep, item_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> ItemDetailPublic:
    """The item with its whole candidate pool, per layer, and its output."""
    item = progress.get_item(session, item_id)
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
    export = open_export(session, job, format, Rejected.parse(rejected))
    headers = {
        "Content-Disposition": f'attachment; filename="{export.filename}"',
        METADATA_HEADER: export.metadata.header(),
    }
    return StreamingResponse(export.chunks, media_type=export.media_type, headers=headers)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=_CONFLICT)
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel: queued stages are dropped, running ones finish, the job ends `cancelled`."""
    if job.status != JobStatus.CANCELLED and not progress.cancel_job(session, job.id):
        session.refresh(job)
        raise ProblemError(409, f"job {job.id} already ended {job.status}")
    session.commit()
    session.refresh(job)
    return JobPublic.model_validate(job)


@router.post("/{job_id}/retry", response_model=RetryResult, responses=_CONFLICT)
def retry(job: JobDep, session: SessionDep, retry_in: RetryCreate | None = None) -> RetryResult:
    """Re-run the failed stages of a job (all, or only the named items)."""
    chosen = retry_in or RetryCreate()
    return retry_job(session, job.id, stage=chosen.stage, item_ids=chosen.items)
