"""What the client commands show of a job: a table of its stages, and a live view until it ends."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.models import FINAL_JOB_STATUSES
from orchestrator.api.bodies import JobDetailPublic, StagePublic
from orchestrator.cli.console import console
from orchestrator.client import ApiClient
from orchestrator.watchdog import Watchdog

__all__ = ["show_job", "watch_job"]


def _stage_label(stage: StagePublic) -> str:
    return f"proposers L{stage.layer}" if stage.layer is not None else stage.stage


def show_job(job: JobDetailPublic) -> None:
    console.print(f"job {job.id} ({job.recipe_name}): {job.status}", highlight=False)
    table = Table(show_header=True)
    for column in ("stage", "done", "failed", "of"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    table.add_row("items", str(job.items_done), str(job.items_failed), str(job.total_items))
    for stage in job.progress.stages:
        table.add_row(_stage_label(stage), str(stage.finished), str(stage.failed), str(stage.expected))
    console.print(table)
    eta = job.progress.eta_seconds
    console.print(
        f"tokens: {job.progress.prompt_tokens} prompt, {job.progress.output_tokens} output"
        + (f"; {job.progress.items_per_second:.2f} items/s" if job.progress.items_per_second else "")
        + (f"; ETA {eta:.0f} s" if eta is not None else "")
    )
    if job.unserved_models:
        console.print(_unserved_note(job.unserved_models))
    if job.progress.latest_error:
        console.print(f"[red]latest stage failure:[/red] {job.progress.latest_error}", highlight=False)
    for model, error in sorted(job.engine.failed.items()):
        console.print(f"[red]model {model} failed to load:[/red] {error}", highlight=False)
    if job.engine.loads:
        console.print(
            f"model loads: {job.engine.loads} ({job.engine.load_seconds:.1f} s), "
            f"{job.engine.swaps} of them swaps: "
            + ", ".join(f"{model} x{count}" for model, count in sorted(job.engine.per_model.items()))
        )


def _unserved_note(models: list[str]) -> str:
    return (
        f"[yellow]no live worker serves:[/yellow] {', '.join(models)} "
        "(their stages wait until a worker that serves them joins)"
    )


def _say_what_changed(progress: Progress, job: JobDetailPublic, before: JobDetailPublic | None) -> None:
    """Above the bars: a model that lost its last worker, a stage that failed."""
    if job.unserved_models and (before is None or job.unserved_models != before.unserved_models):
        progress.console.print(_unserved_note(job.unserved_models))
    latest = job.progress.latest_error
    if latest and (before is None or latest != before.progress.latest_error):
        progress.console.print(f"[red]stage failed:[/red] {latest}", highlight=False)


def watch_job(client: ApiClient, job_id: str, interval: float, stall_s: float) -> JobDetailPublic:
    """A live progress view (items and every stage, failures as they happen) until the job ends; raises
    Stalled when nothing moved for `stall_s` seconds while a model of the job has no live worker."""
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    job = client.job(job_id)
    watchdog = Watchdog(stall_s, f"job {job_id}", lambda: not job.unserved_models)
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {}
        said: JobDetailPublic | None = None
        while True:
            _say_what_changed(progress, job, said)
            said = job
            rows = [("items", job.items_done, job.total_items)] + [
                (_stage_label(s), s.finished + s.failed, s.expected) for s in job.progress.stages
            ]
            for label, done, total in rows:
                if label not in bars:
                    bars[label] = progress.add_task(label, total=total)
                progress.update(bars[label], completed=done, total=total)
            if job.status in FINAL_JOB_STATUSES:
                return job
            watchdog.check(tuple(done for _, done, _ in rows))
            time.sleep(interval)
            job = client.job(job_id)
