"""Sequential aggregation against single aggregation, on the embedded recipe:

    python -m bench.sequential [--prompts 16] [--window 2]
    python -m bench.sequential --prompts 2 --synthetic      # the tiny setting: synthetic engines

(a) the `embedded` recipe as shipped (`mode: single`: one aggregator pass over the three candidates);
(b) the same recipe with `mode: sequential, window: WINDOW` (with three candidates and a window of 2:
    a step over candidates 1-2, then a step over its synthesis and candidate 3).
Both run in one `slimmoa worker` (all roles), one after the other on the same prompts, after a warm-up
job that loads the model, so neither pays the load. Prints, per side, the job's wall time and, per item,
the aggregator's generations, its prompt and output tokens (steps included), its generation latency
(the sum over its passes) and its span (the first pass handed to the engine to the output stored);
then (b)/(a) of each. Proposer candidates differ between the runs (vLLM's CPU build samples unseeded),
so the aggregator's prompts differ in length a little too. Needs DATABASE_URL (Postgres) and REDIS_URL;
the run uses its own schema and queues.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from bench.end_to_end import embedded_recipe, stand_in
from bench.engine_throughput import prompts
from bench.services import isolated_services, start_process, stop

# Stage threads of the worker: every item's stages in flight at once, as deployed.
CONCURRENCY = 16


@dataclass(frozen=True)
class Side:
    """One job's aggregator figures, per item where it says so."""

    wall_s: float
    passes: float
    prompt_tokens: float
    output_tokens: float
    latency_s: float
    span_s: float

    def row(self, label: str) -> str:
        return (
            f"  {label:<16}: wall {self.wall_s:8.2f} s; per item: {self.passes:.1f} aggregator passes, "
            f"{self.prompt_tokens:7.1f} prompt + {self.output_tokens:6.1f} output tokens, "
            f"latency {self.latency_s:6.2f} s, span {self.span_s:6.2f} s"
        )


def bench_recipe(synthetic: bool, **aggregator: Any) -> dict[str, Any]:
    """The embedded recipe (a synthetic stand-in for SmolLM2 with `synthetic`), its aggregator updated."""
    recipe = embedded_recipe()
    if synthetic:
        recipe["models"] = {"smollm2": stand_in(recipe["models"]["smollm2"])}
    recipe["aggregator"] |= aggregator
    recipe["name"] = f"sequential-bench-{aggregator.get('mode', 'single')}"
    return recipe


def run_job(database_url: str, recipe: dict[str, Any], instructions: list[str]) -> tuple[str, float]:
    """Store and enqueue a job, wait for it to succeed; its id and wall seconds."""
    from db import progress
    from db.models import FINAL_JOB_STATUSES
    from db.session import session_scope
    from orchestrator.contracts import InputRecord
    from orchestrator.recipes import parse_recipe
    from orchestrator.submission import Submission, enqueue_job, store_job

    records = [InputRecord(id=str(i), instruction=text) for i, text in enumerate(instructions)]
    started = time.perf_counter()
    with session_scope(database_url) as session:
        job_id = store_job(session, Submission(parse_recipe(recipe), records, None)).id
    enqueue_job(job_id)
    while True:
        with session_scope(database_url) as session:
            job = progress.get_job(session, job_id)
            assert job is not None
            if job.status in FINAL_JOB_STATUSES:
                if job.status != "succeeded":
                    raise RuntimeError(f"job {job_id} {job.status}: {job.error}")
                return job_id, time.perf_counter() - started
        time.sleep(0.1)


def aggregator_figures(database_url: str, job_id: str, wall_s: float) -> Side:
    """Per item: the aggregator's passes (steps and output), their tokens, latency and span."""
    from sqlalchemy import select

    from db.models import Candidate, Item, Job, Output
    from db.rows import steps_layer
    from db.session import session_scope

    with session_scope(database_url) as session:
        layer = steps_layer(session.get_one(Job, job_id).recipe)
        columns = (Output.prompt_tokens, Output.output_tokens, Output.latency_ms, Output.started_at)
        outputs = session.execute(
            select(Output.item_id, *columns, Output.created_at)
            .join(Item, Item.id == Output.item_id)
            .where(Item.job_id == job_id)
        ).all()
        steps = session.execute(
            select(Candidate.item_id, Candidate.prompt_tokens, Candidate.output_tokens)
            .add_columns(Candidate.latency_ms, Candidate.started_at)
            .join(Item, Item.id == Candidate.item_id)
            .where(Item.job_id == job_id, Candidate.layer == layer)
        ).all()
    passes: dict[int, list[Any]] = {}
    for item_id, *figures in [*((row[:5]) for row in outputs), *steps]:
        passes.setdefault(item_id, []).append(figures)
    ends = {row[0]: row[5] for row in outputs}
    return Side(
        wall_s=wall_s,
        passes=mean(len(rows) for rows in passes.values()),
        prompt_tokens=mean(sum(r[0] or 0 for r in rows) for rows in passes.values()),
        output_tokens=mean(sum(r[1] or 0 for r in rows) for rows in passes.values()),
        latency_s=mean(sum(r[2] or 0 for r in rows) / 1000 for rows in passes.values()),
        span_s=mean((ends[item] - min(r[3] for r in rows)).total_seconds() for item, rows in passes.items()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--window", type=int, default=2, help="candidates a sequential step reads")
    parser.add_argument("--synthetic", action="store_true", help="a synthetic engine stands for SmolLM2")
    args = parser.parse_args()
    logs = Path(os.environ.get("BENCH_LOG_DIR", "/tmp"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    engine = "a synthetic stand-in" if args.synthetic else "vLLM CPU, the embedded SmolLM2"
    print(
        f"sequential aggregation: {args.prompts} prompts, {engine}, window {args.window}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    single = bench_recipe(args.synthetic)
    sequential = bench_recipe(args.synthetic, mode="sequential", window=args.window)
    instructions = prompts(args.prompts)
    with isolated_services(os.environ["DATABASE_URL"], os.environ["REDIS_URL"], CONCURRENCY) as env:
        from orchestrator.celery_app import app

        command = [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"]
        worker = start_process(command, env, logs / "sequential-worker.log")
        try:
            while not app.control.ping(timeout=1.0):
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited; see {logs / 'sequential-worker.log'}")
            run_job(env["DATABASE_URL"], single, instructions[:1])  # warm-up: the model's load
            sides = {}
            for label, recipe in (("(a) single", single), ("(b) sequential", sequential)):
                job_id, wall = run_job(env["DATABASE_URL"], recipe, instructions)
                sides[label] = aggregator_figures(env["DATABASE_URL"], job_id, wall)
                print(sides[label].row(label))
        finally:
            stop(worker)
    a, b = sides["(a) single"], sides["(b) sequential"]
    print(
        f"  (b)/(a)         : wall {b.wall_s / a.wall_s:.2f}; per item: passes {b.passes / a.passes:.2f}, "
        f"prompt tokens {b.prompt_tokens / a.prompt_tokens:.2f}, output tokens "
        f"{b.output_tokens / a.output_tokens:.2f}, latency {b.latency_s / a.latency_s:.2f}, "
        f"span {b.span_s / a.span_s:.2f}; load average at the end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
