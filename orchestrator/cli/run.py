"""`slimmoa run`: one job all-in-one, with a private Redis and a local worker unless services are set."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from db import progress as job_progress
from db.migrate import upgrade
from db.models import FINAL_JOB_STATUSES, Job, JobStatus
from db.session import session_scope
from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.cli.console import POLL_INTERVAL_S, console, fail, fail_on, save_atomically
from orchestrator.cli.options import FieldOption, InputFormatOption, OutputFormatOption
from orchestrator.embedded import private_redis, worker_process
from orchestrator.errors import RecipeError, SlimMoAError
from orchestrator.export_files import answers, output_format
from orchestrator.exports import ExportFormat, open_export
from orchestrator.inputs import FieldMap, read_records
from orchestrator.recipes import Recipe, load_recipe, missing_local_weights
from orchestrator.settings import Settings, get_settings
from orchestrator.submission import Submission, enqueue_job, store_job
from orchestrator.watchdog import Watchdog, live_consumers

__all__ = ["embedded_services", "run"]


@contextmanager
def embedded_services(settings: Settings) -> Iterator[Settings]:
    """The command's settings pointed at services that run: the configured ones, or (without
    REDIS_URL) a private Redis, and the embedded ./slimmoa.db without DATABASE_URL; migrated."""
    database_url = settings.database_url_or_embedded()
    upgrade(database_url)
    with private_redis() if not settings.redis_url else nullcontext(settings.redis_url) as redis_url:
        chosen = settings.model_copy(update={"database_url": database_url, "redis_url": redis_url})
        configure(celery_app, chosen)
        yield chosen


def _checked_recipe(name: str, settings: Settings) -> Recipe:
    recipe = load_recipe(name, settings.recipes_dir)
    missing = missing_local_weights(recipe)
    if missing:
        raise RecipeError("\n".join(f"recipe {recipe.name}: {problem}" for problem in missing))
    return recipe


def run(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="JSONL, JSON list (AlpacaEval), Parquet or CSV.")
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write: .json (AlpacaEval's list), .jsonl or .parquet."),
    ],
    recipe: Annotated[str, typer.Option(help="Recipe name (recipes/NAME.yaml) or path.")] = "embedded",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N records.")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    show: Annotated[bool, typer.Option(help="Print every aggregated answer at the end.")] = False,
    input_format: InputFormatOption = None,
    field: FieldOption = None,
    write_format: OutputFormatOption = None,
) -> None:
    """Run one job all-in-one: a private Redis unless REDIS_URL, ./slimmoa.db unless DATABASE_URL."""
    settings = get_settings()
    try:
        chosen = _checked_recipe(recipe, settings)
        export_format = output_format(output, write_format)
        fields = FieldMap.parse(field or [])
        records = read_records(input_path, limit, input_format=input_format, fields=fields)
        with embedded_services(settings) as services:
            url = services.database_url
            with session_scope(url) as session:
                job_id = store_job(session, Submission(chosen, records, name)).id
            console.print(f"job [bold]{job_id}[/bold]: {len(records)} items, recipe {chosen.name}")
            log_path = output.with_name(output.name + ".worker.log")
            env = {"DATABASE_URL": url, "REDIS_URL": services.redis_url}
            with worker_process(env, log_path, services.stage_threads) as worker:
                enqueue_job(job_id)
                status = _follow(services, job_id, worker, log_path)
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    _write_export(url, job_id, export_format, output)
    pools = _write_export(url, job_id, ExportFormat.POOLS, output.with_name(output.stem + ".pools.jsonl"))
    with session_scope(url) as session:
        counts = job_progress.count_rows(session, job_id)
    if show:
        for record in answers(url, job_id):
            console.rule(f"[bold]{record['id']}[/bold] {record['instruction'][:70]}")
            console.print(record["output"], markup=False, highlight=False)
    console.print(
        f"job {job_id} {status}: {counts['items']} items, {counts['candidates']} candidates, "
        f"{counts['outputs']} outputs stored in {url}\n"
        f"outputs: {output}\ncandidate pools: {pools}"
    )
    if status != JobStatus.SUCCEEDED:
        with session_scope(url) as session:
            job = session.get_one(Job, job_id)
            reason = "; ".join(filter(None, [job.error, job_progress.latest_error(session, job_id)]))
        raise fail(f"job {job_id} {status}" + (f": {reason}" if reason else ""), code=1)


def _follow(services: Settings, job_id: str, worker: subprocess.Popen[bytes], log_path: Path) -> str:
    """Show a progress bar, with stage failures as they happen, until the job ends; stop early if the
    worker dies, or if nothing moves while no worker takes the work."""
    watchdog = Watchdog(
        services.stall_timeout_s, f"job {job_id}", lambda: live_consumers(services.queue_inference) > 0
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("generating", total=None)
        while True:
            with session_scope(services.database_url) as session:
                job = session.get_one(Job, job_id)
                counts = job_progress.job_counts(session, job_id)
            failed = sum(bad for _, bad in counts.candidates.values())
            description = f"generating ({job.items_failed} items failed, {failed} stages failed)"
            if counts.latest_error:
                description += f" latest: {counts.latest_error[:120]}"
            progress.update(bar, completed=job.items_done, total=job.total_items, description=description)
            if job.status in FINAL_JOB_STATUSES:
                return job.status
            code = worker.poll()
            if code is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise fail(f"the worker exited with code {code}; last lines of {log_path}:\n{tail}", code=1)
            watchdog.check(
                (
                    job.items_done,
                    *sorted(counts.candidates.items()),
                    *sorted(counts.answers.items()),
                    *sorted(counts.steps.items()),
                )
            )
            time.sleep(POLL_INTERVAL_S)


def _write_export(database_url: str, job_id: str, fmt: ExportFormat, path: Path) -> Path:
    """Write one export of the job from the database, with its metadata record beside it."""
    with session_scope(database_url) as session:
        export = open_export(session, session.get_one(Job, job_id), fmt)
        return save_atomically(path, export.chunks, export.metadata.model_dump(mode="json"))
