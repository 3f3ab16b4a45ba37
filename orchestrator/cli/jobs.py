"""Client commands: the same jobs through the HTTP API (`submit`, `status`, `export`, `cancel`, `retry`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from db.models import JobStatus
from orchestrator.cli.console import console, err, fail, fail_on, save_atomically
from orchestrator.cli.options import FieldOption, InputFormatOption, OutputFormatOption
from orchestrator.cli.views import show_job, watch_job
from orchestrator.client import DEFAULT_URL, ApiClient
from orchestrator.contracts import RetryStage
from orchestrator.errors import ApiError, ExportError, InputError
from orchestrator.export_files import output_format
from orchestrator.export_writers import Rejected
from orchestrator.exports import metadata_path
from orchestrator.inputs import FieldMap
from orchestrator.settings import get_settings
from orchestrator.watchdog import Stalled

__all__ = ["cancel", "export", "retry", "status", "submit"]

ApiUrl = Annotated[
    str, typer.Option("--api", envvar="SLIMMOA_API_URL", help="The API's base URL.", show_default=True)
]
ApiToken = Annotated[
    str | None,
    typer.Option("--token", envvar="SLIMMOA_API_TOKEN", help="Bearer token, if the API needs one."),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")]
ItemIds = Annotated[str | None, typer.Option(help="Comma-separated item ids (default: every failed item).")]


@contextmanager
def _api(url: str, token: str | None) -> Iterator[ApiClient]:
    """A client of the API; its errors become exit code 1 with the API's message."""
    try:
        with ApiClient(url, token) as client:
            yield client
    except ApiError as exc:
        raise fail_on(exc) from None


def submit(
    input_path: Annotated[
        Path, typer.Argument(metavar="FILE", help="JSONL, JSON list (AlpacaEval), Parquet or CSV.")
    ],
    recipe: Annotated[str, typer.Option(help="Recipe name (see GET /v1/recipes).")],
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0 (lowest) to 9.")] = 0,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the first job.")
    ] = None,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
    input_format: InputFormatOption = None,
    field: FieldOption = None,
) -> None:
    """Submit a prompt file as a job; prints the job id."""
    if not input_path.is_file():
        raise fail(f"{input_path}: no such file")
    try:
        fields = FieldMap.parse(field or [])
    except InputError as exc:
        raise fail_on(exc) from None
    with _api(url, token) as client:
        job, notice = client.submit_file(
            input_path,
            recipe,
            name=name,
            priority=priority,
            idempotency_key=idempotency_key,
            fields=fields.sources,
            input_format=input_format,
        )
    err.print(f"job {job.id}: {job.total_items} items, recipe {job.recipe_name}, {job.status}")
    if notice:
        err.print(f"[yellow]note:[/yellow] {notice}", highlight=False)
    console.print(job.id, highlight=False)


def status(
    job_id: JobArg,
    watch: Annotated[bool, typer.Option(help="Follow the job live until it ends.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls with --watch.")] = 1.0,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Show a job's progress per stage; with --watch, follow it and exit 1 unless it succeeds."""
    stall_s = get_settings().stall_timeout_s
    try:
        with _api(url, token) as client:
            job = watch_job(client, job_id, interval, stall_s) if watch else client.job(job_id)
    except Stalled as exc:
        raise fail_on(exc) from None
    show_job(job)
    if watch and job.status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _rejected_rule(value: str) -> str:
    try:
        Rejected.parse(value)
    except ExportError as exc:
        raise typer.BadParameter(exc.reason) from None
    return value


def export(
    job_id: JobArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="File to write: .json (AlpacaEval's list), .jsonl or .parquet."),
    ],
    write_format: OutputFormatOption = None,
    rejected: Annotated[
        str,
        typer.Option(
            callback=_rejected_rule,
            help="For --format preference, the final-layer candidate rejected: "
            "shortest, longest, random (seeded by the item) or model:NAME.",
        ),
    ] = "shortest",
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Download a job's finished results (the job may still run); the metadata record goes beside them."""
    if not output.parent.is_dir():
        raise fail(f"--output: no folder {output.parent} to write {output.name} in")
    try:
        export_format = output_format(output, write_format)
    except ExportError as exc:
        raise fail_on(exc) from None
    with _api(url, token) as client, client.results(job_id, export_format, rejected=rejected) as download:
        save_atomically(output, download.chunks, download.metadata)
    console.print(
        f"{export_format.value} export of job {job_id}: {output} (metadata: {metadata_path(output)})"
    )


def cancel(job_id: JobArg, url: ApiUrl = DEFAULT_URL, token: ApiToken = None) -> None:
    """Cancel a job: queued stages are dropped, running ones finish."""
    with _api(url, token) as client:
        job = client.cancel(job_id)
    console.print(f"job {job.id}: {job.status} ({job.items_done}/{job.total_items} items done)")


def retry(
    job_id: JobArg,
    stage: Annotated[RetryStage, typer.Option(help="Which failed stages to re-run.")] = RetryStage.ALL,
    items: ItemIds = None,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Re-run the failed stages of a job, reusing every finished candidate."""
    try:
        chosen = [int(part) for part in items.split(",")] if items else None
    except ValueError:
        raise fail(f"--items: comma-separated item ids, got {items!r}") from None
    with _api(url, token) as client:
        result = client.retry(job_id, stage, chosen)
    console.print(
        f"job {result.job_id}: {result.items_reopened} items reopened "
        f"({len(result.proposer_items)} from the proposers, {len(result.aggregator_items)} aggregator only)"
    )
