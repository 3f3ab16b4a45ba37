"""What the client commands show of a job: a table of its stages, and a live view until it ends."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.models import FINAL_JOB_STATUSES
from orchestrator.api.bodies import JobDetailPublic, StagePublic
from orchestrator.cli.console import console
from orchestrator.client import ApiClient

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
    if job.engine.loads:
        console.print(
            f"model loads: {job.engine.loads} ({job.engine.load_seconds:.1f} s), "
            f"{job.engine.swaps} of them swaps: "
            + ", ".join(f"{model} x{count}" for model, count in sorted(job.engine.per_model.items()))
        )


def watch_job(client: ApiClient, job_id: str, interval: float) -> JobDetailPublic:
    """A live progress view (items and every stage) until the job ends."""
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {}
        while True:
            job = client.job(job_id)
            rows = [("items", job.items_done, job.total_items)] + [
                (_stage_label(s), s.finished + s.failed, s.expected) for s in job.progress.stages
            ]
            for label, done, total in rows:
                if label not in bars:
                    bars[label] = progress.add_task(label, total=total)
                progress.update(bars[label], completed=done, total=total)
            if job.status in FINAL_JOB_STATUSES:
                return job
            time.sleep(interval)
