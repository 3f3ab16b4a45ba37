"""`slimmoa timeline JOB`: where a job's time went, per model, from the record (and as a PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from db.session import session_scope
from db.timeline import job_timeline_rows
from orchestrator.cli.console import console, err, fail_on
from orchestrator.errors import JobNotFound
from orchestrator.settings import get_settings
from orchestrator.timeline import Timeline, build_timeline, plot_timeline

__all__ = ["show_timeline", "timeline"]


def show_timeline(found: Timeline) -> None:
    """Print the summary lines and a row per model."""
    summary = found.summary
    console.print(
        f"job {found.job_id} ({found.status}): span {summary.span_s:.2f} s, "
        f"{summary.generations} generations, {summary.output_tokens} tokens "
        f"({summary.tokens_per_s:.1f} tokens/s)",
        highlight=False,
    )
    console.print(
        f"device busy: {summary.busy_share:.1%} ({summary.busy_s:.2f} s with a generation in flight)",
        highlight=False,
    )
    console.print(
        f"time in loads: {summary.load_s:.2f} s ({summary.loads} loads and wakes); "
        f"evictions: {summary.evictions} ({summary.unload_s:.2f} s)",
        highlight=False,
    )
    gap = summary.idle_gap
    console.print(
        "longest idle gap: "
        + (f"{gap.seconds:.2f} s (from {gap.start:.2f} s to {gap.end:.2f} s)" if gap else "none"),
        highlight=False,
    )
    table = Table()
    for column in (
        "model",
        "loads",
        "wakes",
        "evictions",
        "generations",
        "tokens",
        "busy s",
        "peak in flight",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for lane in found.lanes:
        kinds = [span.kind for span in lane.loads]
        table.add_row(
            lane.model,
            str(kinds.count("load")),
            str(kinds.count("wake")),
            str(len(lane.evictions)),
            str(len(lane.generations)),
            str(lane.output_tokens),
            f"{lane.busy_s:.2f}",
            str(lane.peak_in_flight),
        )
    console.print(table)
    if found.untimed:
        err.print(
            f"note: {found.untimed} generations have no start time (failed at a load) and are not drawn"
        )


def timeline(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job to draw.")],
    plot: Annotated[Path | None, typer.Option(help="Write the timeline as a PNG here.")] = None,
) -> None:
    """Draw a job on a time axis: per model its loads, wakes, evictions, generations and requests in
    flight; prints the device's busy share, the time in loads and the longest idle gap."""
    with session_scope(get_settings().database_url_or_embedded()) as session:
        rows = job_timeline_rows(session, job_id)
    if rows is None:
        raise fail_on(JobNotFound(f"job {job_id} not found"))
    found = build_timeline(rows)
    show_timeline(found)
    if plot is not None:
        plot_timeline(found, plot)
        console.print(f"plot: {plot}")
