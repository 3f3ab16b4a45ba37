"""`slimmoa timeline`: a job's generations, loads and evictions on one time axis, and its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from db.models import Candidate, EngineLoad, Item, Job, Output
from db.session import session_scope
from db.timeline import GenerationRow, JobTimelineRows, LoadRow
from orchestrator.recipes import parse_recipe
from orchestrator.timeline import Span, build_timeline, in_flight, plot_timeline, union
from tests.conftest import sample_records, submit, wait_for_job

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def generation(model: str, start: float, end: float, tokens: int = 10) -> GenerationRow:
    return GenerationRow(model, 0, at(start), at(end), tokens, True)


def hand_made() -> JobTimelineRows:
    """a loads over [0, 1] and generates twice; b evicts a over [4, 4.5], loads over [4.5, 5], generates."""
    return JobTimelineRows(
        job_id="j" * 32,
        status="succeeded",
        created_at=at(-0.5),
        started_at=at(0),
        finished_at=at(6.5),
        generations=[generation("a", 1, 2), generation("a", 1.5, 3), generation("b", 5, 6, tokens=4)],
        loads=[
            LoadRow("a", "load", 1.0, 0.0, [], at(1)),
            LoadRow("b", "load", 0.5, 0.5, ["a"], at(5)),
        ],
        untimed=0,
    )


def test_intervals_merge_and_count_what_is_in_flight() -> None:
    spans = [Span(0, 2), Span(1, 3), Span(5, 6)]
    assert union(spans) == [Span(0, 3), Span(5, 6)]
    assert in_flight(spans) == [(0, 1), (1, 2), (2, 1), (3, 0), (5, 1), (6, 0)]
    # One span ending where another starts: never counted as two in flight.
    assert in_flight([Span(0, 1), Span(1, 2)]) == [(0, 1), (1, 1), (2, 0)]
    assert in_flight(span for span in spans) == in_flight(spans), "any iterable, read once"


def test_summary_of_a_hand_made_job() -> None:
    found = build_timeline(hand_made())
    summary = found.summary
    assert summary.span_s == pytest.approx(6.5)
    assert summary.busy_s == pytest.approx(3.0)  # [1, 3] and [5, 6]
    assert summary.busy_share == pytest.approx(3.0 / 6.5)
    assert summary.loads == 2 and summary.load_s == pytest.approx(1.5)
    assert summary.evictions == 1 and summary.unload_s == pytest.approx(0.5)
    assert summary.idle_gap == Span(3.0, 4.0)
    assert (summary.generations, summary.output_tokens) == (3, 24)
    lanes = {lane.model: lane for lane in found.lanes}
    assert lanes["a"].evictions == [Span(4.0, 4.5, "evict")]
    assert lanes["b"].loads == [Span(4.5, 5.0, "load")]
    assert (lanes["a"].peak_in_flight, lanes["b"].peak_in_flight) == (2, 1)
    assert lanes["a"].busy_s == pytest.approx(2.0)


def test_the_plot_is_a_png_of_the_figure(tmp_path: Path) -> None:
    import matplotlib.image

    path = plot_timeline(build_timeline(hand_made()), tmp_path / "t.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    # 10 inches wide; 2.4 inches of axes and titles plus half an inch per model lane (two here).
    assert (width, height) == (500, 170)


Timed = list[tuple[datetime, datetime, int]]


def recorded(
    database_url: str, job_id: str
) -> tuple[datetime, datetime, Timed, list[tuple[datetime, float]]]:
    """The job's start and end, every generation's (start, stored, tokens) and every load's (recorded
    at, seconds), read straight from the tables."""
    with session_scope(database_url) as session:
        job = session.get_one(Job, job_id)
        rows = [
            *session.execute(
                select(Candidate.started_at, Candidate.created_at, Candidate.output_tokens)
                .join(Item)
                .where(Item.job_id == job_id)
            ).tuples(),
            *session.execute(
                select(Output.started_at, Output.created_at, Output.output_tokens)
                .join(Item)
                .where(Item.job_id == job_id)
            ).tuples(),
        ]
        loads = list(
            session.execute(
                select(EngineLoad.created_at, EngineLoad.seconds).where(EngineLoad.job_id == job_id)
            ).tuples()
        )
        assert job.started_at is not None and job.finished_at is not None
        assert all(start is not None for start, _, _ in rows), "every generation has its start"
        timed = [(start, end, tokens or 0) for start, end, tokens in rows if start is not None]
        return job.started_at, job.finished_at, timed, loads


def grid_measures(
    start: datetime, finish: datetime, rows: Timed, loads: list[tuple[datetime, float]]
) -> tuple[float, float, float]:
    """Span, busy seconds (generating) and longest idle stretch (neither generating nor loading) on a
    1 ms grid: another way to the same figures."""
    load_spans = [(end - timedelta(seconds=seconds), end) for end, seconds in loads]
    origin = min([start, *(s for s, _, _ in rows), *(s for s, _ in load_spans)])
    end = max([finish, *(e for _, e, _ in rows), *(e for _, e in load_spans)])
    ticks = int((end - origin).total_seconds() * 1000) + 1

    def covered(spans: list[tuple[datetime, datetime]]) -> Any:
        grid = np.zeros(ticks, dtype=bool)
        for s, e in spans:
            grid[int((s - origin).total_seconds() * 1000) : int((e - origin).total_seconds() * 1000)] = True
        return grid

    generating = [(s, e) for s, e, _ in rows]
    active = covered(generating + load_spans)
    longest = run = 0
    for value in active:
        run = 0 if value else run + 1
        longest = max(longest, run)
    return ticks / 1000, covered(generating).sum() / 1000, longest / 1000


def test_timeline_of_a_finished_job_matches_its_rows(
    database_url: str, services: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    a, b, agg = (f"tl-{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b", "agg"))
    models = {
        name: {"engine": "synthetic", "latency_ms": latency, "output_tokens": tokens}
        for name, latency, tokens in ((a, 40, 12), (b, 60, 20), (agg, 30, 30))
    }
    recipe = parse_recipe(
        {
            "name": "timeline",
            "models": models,
            "layers": [{"proposers": [{"model": a, "samples": 2}, {"model": b}]}],
            "aggregator": {"model": agg},
        }
    )
    job_id = submit(database_url, recipe, sample_records(8))
    assert wait_for_job(database_url, job_id).status == "succeeded"
    started, finished, rows, loads = recorded(database_url, job_id)
    assert len(rows) == 8 * 3 + 8 and len(loads) == 3, "each model loaded once, for this job"
    # (Not `e <= finished`: concurrent items stamp their own finish, and the job's last count may
    # carry a moment a few milliseconds before another item's.)
    assert all(started <= s <= e for s, e, _ in rows)

    plot = tmp_path / "timeline.png"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "timeline", job_id, "--plot", str(plot)],
        env={**os.environ, **services, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    span, busy, gap = grid_measures(started, finished, rows, loads)
    head = re.search(r"span ([\d.]+) s, (\d+) generations, (\d+) tokens", out)
    assert head is not None, out
    assert float(head[1]) == pytest.approx(span, abs=0.02)
    assert (int(head[2]), int(head[3])) == (len(rows), sum(t for _, _, t in rows))
    shown_busy = re.search(r"device busy: ([\d.]+)% \(([\d.]+) s", out)
    assert shown_busy is not None, out
    assert float(shown_busy[2]) == pytest.approx(busy, abs=0.02)
    assert float(shown_busy[1]) == pytest.approx(100 * busy / span, abs=0.5)
    shown_loads = re.search(r"time in loads: ([\d.]+) s \((\d+) loads", out)
    assert shown_loads is not None and int(shown_loads[2]) == 3
    assert float(shown_loads[1]) == pytest.approx(sum(seconds for _, seconds in loads), abs=0.01)
    # Idle: neither generating nor loading (a synthetic load is short, but not nothing on a slow machine).
    shown_gap = re.search(r"longest idle gap: ([\d.]+) s", out)
    assert shown_gap is not None, out
    assert float(shown_gap[1]) == pytest.approx(gap, abs=0.02)
    for name, count in ((a, 16), (b, 8), (agg, 8)):
        assert re.search(rf"{name}\s+│\s+1\s+│\s+0\s+│\s+0\s+│\s+{count}\s+│", out), out


def test_an_unknown_job_is_an_error(services: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "timeline", "nope"],
        env={**os.environ, **services},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "job nope not found" in result.stderr
