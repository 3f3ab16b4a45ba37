"""A job on a time axis, from the record: where the device's time went.

Per model: its loads and wakes (an `engine_loads` row is written when the load ends, so it ran for the
`seconds` before that), the evictions that made room for them (the `unload_seconds` just before the
load), its generations (a candidate's or output's `started_at` to the moment its row was stored) and
how many of them were in flight at once. The summary says how much of the job's span the device spent
generating (busy share: at least one generation in flight), how long loads took, and the longest
stretch in which it did nothing at all (no generation, load or eviction): the gaps a scheduler leaves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from db.timeline import JobTimelineRows

__all__ = [
    "Lane",
    "Span",
    "Timeline",
    "TimelineSummary",
    "build_timeline",
    "headline",
    "in_flight",
    "plot_timeline",
    "union",
]


@dataclass(frozen=True)
class Span:
    """An interval in seconds from the timeline's origin; `kind` says what filled it."""

    start: float
    end: float
    kind: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


def union(spans: Iterable[Span]) -> list[Span]:
    """The spans merged where they overlap or touch, in order."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, span.end))
        else:
            merged.append(Span(span.start, span.end))
    return merged


def in_flight(spans: Iterable[Span]) -> list[tuple[float, int]]:
    """The number of spans open at each moment, as (time, count from then on) steps."""
    spans = list(spans)
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans], key=lambda e: (e[0], e[1]))
    steps: list[tuple[float, int]] = []
    count = 0
    for moment, change in events:
        count += change
        if steps and steps[-1][0] == moment:
            steps[-1] = (moment, count)
        else:
            steps.append((moment, count))
    return steps


def _gaps(covered: list[Span], start: float, end: float) -> list[Span]:
    gaps, cursor = [], start
    for span in covered:
        if span.start > cursor:
            gaps.append(Span(cursor, min(span.start, end)))
        cursor = max(cursor, span.end)
    if cursor < end:
        gaps.append(Span(cursor, end))
    return [gap for gap in gaps if gap.seconds > 0]


@dataclass
class Lane:
    """One model's row of the timeline."""

    model: str
    generations: list[Span] = field(default_factory=list)
    # "load", "wake" or "failed"
    loads: list[Span] = field(default_factory=list)
    evictions: list[Span] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def busy_s(self) -> float:
        return sum(span.seconds for span in union(self.generations))

    @property
    def peak_in_flight(self) -> int:
        return max((count for _, count in in_flight(self.generations)), default=0)


@dataclass(frozen=True)
class TimelineSummary:
    span_s: float
    generations: int
    output_tokens: int
    # Seconds with at least one generation in flight, and their share of the span.
    busy_s: float
    busy_share: float
    loads: int
    load_s: float
    evictions: int
    unload_s: float
    # The longest stretch with no generation, load or eviction (None: the device never rested).
    idle_gap: Span | None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True)
class Timeline:
    job_id: str
    status: str
    origin: datetime
    # The drawn span, in seconds from the origin (the job's start; a load may begin a little before).
    start: float
    end: float
    lanes: list[Lane]
    summary: TimelineSummary
    untimed: int


def build_timeline(rows: JobTimelineRows) -> Timeline:
    """Place a job's generations, loads and evictions on one axis (seconds from the job's start)."""
    times = [rows.started_at or rows.created_at]
    times += [g.started_at for g in rows.generations]
    origin = min(times)

    def since(moment: datetime) -> float:
        return (moment - origin).total_seconds()

    lanes: dict[str, Lane] = {}

    def lane(model: str) -> Lane:
        return lanes.setdefault(model, Lane(model))

    for load in rows.loads:
        lane(load.model)
    for generation in rows.generations:
        found = lane(generation.model)
        found.generations.append(
            Span(since(generation.started_at), since(generation.finished_at), "generate")
        )
        found.output_tokens += generation.output_tokens
    for load in rows.loads:
        ended = since(load.recorded_at)
        started = ended - load.seconds
        lane(load.model).loads.append(Span(started, ended, load.kind))
        # The evictions ran one after another just before the load; only their total is recorded.
        for model in load.evicted:
            lane(model).evictions.append(Span(started - load.unload_seconds, started, "evict"))
    spans = [s for found in lanes.values() for s in (*found.generations, *found.loads, *found.evictions)]
    start = min([0.0, *(s.start for s in spans)])
    end = max([since(rows.finished_at) if rows.finished_at else 0.0, *(s.end for s in spans)])
    busy = union(s for found in lanes.values() for s in found.generations)
    busy_s = sum(s.seconds for s in busy)
    gaps = _gaps(union(spans), start, end)
    loads = [load for found in lanes.values() for load in found.loads]
    summary = TimelineSummary(
        span_s=end - start,
        generations=len(rows.generations),
        output_tokens=sum(found.output_tokens for found in lanes.values()),
        busy_s=busy_s,
        busy_share=busy_s / (end - start) if end > start else 0.0,
        loads=len(loads),
        load_s=sum(load.seconds for load in loads),
        evictions=sum(len(load.evicted) for load in rows.loads),
        unload_s=sum(load.unload_seconds for load in rows.loads),
        idle_gap=max(gaps, key=lambda gap: gap.seconds, default=None),
    )
    return Timeline(rows.job_id, rows.status, origin, start, end, list(lanes.values()), summary, rows.untimed)


_COLORS = {
    "generate": "#4c72b0",
    "load": "#c44e52",
    "wake": "#dd8452",
    "failed": "#222222",
    "evict": "#9a9a9a",
    "idle": "#f2d95c",
}


def _bars(axis: Any, spans: list[Span], y: float, height: float, width: float, **style: Any) -> None:
    """Draw spans as bars in one lane; instants (a synthetic load) still show, `width` seconds wide."""
    if spans:
        bars = [(s.start, max(s.seconds, width)) for s in spans]
        axis.broken_barh(bars, (y - height / 2, height), **style)


def plot_timeline(timeline: Timeline, path: Path, *, dpi: int = 100) -> Path:
    """Write the timeline as a PNG: a lane per model (generating, loads, wakes, evictions) over the
    requests in flight per model, the longest idle gap shaded; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes, summary = timeline.lanes, timeline.summary
    figure, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 2.4 + 0.5 * len(lanes)), height_ratios=[max(len(lanes), 1), 2.2]
    )
    tick = max(summary.span_s, 1e-3) / 400
    for y, lane in enumerate(lanes):
        _bars(top, union(lane.generations), y, 0.5, tick, color=_COLORS["generate"], alpha=0.55)
        for kind in ("load", "wake", "failed"):
            _bars(top, [s for s in lane.loads if s.kind == kind], y, 0.8, tick, color=_COLORS[kind])
        _bars(top, lane.evictions, y, 0.8, tick, color=_COLORS["evict"], hatch="//")
    top.set_yticks(range(len(lanes)), [lane.model for lane in lanes], fontsize=8)
    top.set_ylim(-0.6, len(lanes) - 0.4)
    top.invert_yaxis()
    legend = [Patch(color=_COLORS[k], label=k) for k in ("generate", "load", "wake", "evict")]
    for lane in lanes:
        steps = in_flight(lane.generations)
        if steps:
            bottom.step([t for t, _ in steps], [c for _, c in steps], where="post", label=lane.model)
    everything = in_flight(s for lane in lanes for s in lane.generations)
    if len(lanes) > 1 and everything:
        bottom.step(
            [t for t, _ in everything],
            [c for _, c in everything],
            where="post",
            color="black",
            linewidth=0.8,
            label="all",
        )
    bottom.set_xlim(timeline.start, max(timeline.end, timeline.start + 1e-3))
    bottom.set_ylabel("in flight")
    bottom.set_xlabel("seconds since the job started")
    if summary.idle_gap is not None:
        for axis in (top, bottom):
            axis.axvspan(summary.idle_gap.start, summary.idle_gap.end, color=_COLORS["idle"], alpha=0.5)
        legend.append(Patch(color=_COLORS["idle"], alpha=0.5, label="longest idle gap"))
    top.legend(
        handles=legend, loc="lower left", bbox_to_anchor=(0, 1), fontsize=7, ncols=len(legend), frameon=False
    )
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper right", fontsize=7)
    figure.suptitle(f"job {timeline.job_id[:8]} ({timeline.status}): {headline(summary)}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    plt.close(figure)
    return path


def headline(summary: TimelineSummary) -> str:
    """The summary in one line: busy share, time in loads, longest idle gap."""
    gap = f"{summary.idle_gap.seconds:.2f} s" if summary.idle_gap else "none"
    return (
        f"device busy {summary.busy_share:.1%} of {summary.span_s:.2f} s; "
        f"{summary.loads} loads in {summary.load_s:.2f} s; longest idle gap {gap}"
    )
