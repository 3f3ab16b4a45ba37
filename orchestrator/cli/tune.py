"""`slimmoa tune`: run a model zoo's models alone, judge them, build candidate recipes from the scores
and the models' diversity, run and judge those, and rank them all (the rule: `orchestrator.tune`).

Jobs and evaluations are the ordinary ones, through the same services as `eval`: the configured
stack's workers with REDIS_URL, otherwise a private Redis and a local worker for the command.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db import progress as job_progress
from db.models import FINAL_JOB_STATUSES, Job
from db.session import session_scope
from orchestrator.cli.console import POLL_INTERVAL_S, console, fail, fail_on
from orchestrator.cli.evaluate import (
    judge_job,
    judge_option,
    judging_services,
    percent,
    reference_option,
)
from orchestrator.cli.options import FieldOption, InputFormatOption, JudgeOption, ReferenceOption
from orchestrator.contracts import InputRecord
from orchestrator.diversity import job_diversity, source_diversity
from orchestrator.errors import SlimMoAError
from orchestrator.inputs import FieldMap, read_records
from orchestrator.judging import JudgeSpec
from orchestrator.planning import CUDA_CONTEXT_GB
from orchestrator.recovery import sweep
from orchestrator.settings import get_settings
from orchestrator.submission import Submission, submit_job
from orchestrator.tune import (
    Candidate,
    check_solo_budget,
    choose_candidates,
    generations,
    idempotency_key,
    load_zoo,
    plan_summary,
    ranked,
    recipe_yaml,
    sample_records,
    score,
    solo_candidates,
    within_budget,
)
from orchestrator.watchdog import Watchdog, live_consumers

__all__ = ["tune"]


@dataclass
class _Measured:
    """One candidate's job and what was measured of it."""

    candidate: Candidate
    job_id: str
    summary: dict[str, Any] | None = None
    diversity: float | None = None
    tokens: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _Judging:
    """How every job of the tune is judged: the same options as `slimmoa eval`."""

    reference: str
    judge: JudgeSpec
    seed: int
    difficulty: Path | None


def _submit(
    database_url: str, candidates: Sequence[Candidate], records: Sequence[InputRecord], zoo: str
) -> list[str]:
    """Submit every candidate's job under a key derived from its request: a job stored by an earlier
    tune is found, not run again; unfinished ones are swept so that their lost stages are sent."""
    job_ids, reused, unfinished = [], 0, False
    for candidate in candidates:
        request = Submission(candidate.recipe, records, name=f"tune {zoo}: {candidate.recipe.name}")
        with session_scope(database_url) as session:
            submitted = submit_job(session, request, idempotency_key(request))
            job_ids.append(submitted.job.id)
            reused += not submitted.created
            unfinished |= not submitted.created and submitted.job.status not in FINAL_JOB_STATUSES
    console.print(f"{len(job_ids)} jobs: {len(job_ids) - reused} new, {reused} found from an earlier tune")
    if unfinished:
        # With a private Redis nothing of an earlier run is queued any more: resend at once.
        sweep(database_url, grace_s=None if get_settings().redis_url else 0)
    return job_ids


def _follow(database_url: str, job_ids: Sequence[str], what: str) -> None:
    """A progress bar over the jobs' items until every job has ended."""
    settings = get_settings()
    watchdog = Watchdog(settings.stall_timeout_s, what, lambda: live_consumers(settings.queue_inference) > 0)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(what, total=None)
        while True:
            with session_scope(database_url) as session:
                jobs = [session.get_one(Job, job_id) for job_id in job_ids]
            done = sum(job.items_done for job in jobs)
            ended = sum(job.status in FINAL_JOB_STATUSES for job in jobs)
            total = sum(job.total_items for job in jobs)
            progress.update(
                bar, completed=done, total=total, description=f"{what} ({ended}/{len(jobs)} jobs ended)"
            )
            if ended == len(jobs):
                return
            watchdog.check(done)
            time.sleep(POLL_INTERVAL_S)


def _measure(database_url: str, measured: _Measured, judging: _Judging) -> None:
    """Judge the job against the reference (resuming its evaluation), and read its tokens and diversity."""
    with session_scope(database_url) as session:
        counts = job_progress.job_counts(session, measured.job_id)
    measured.tokens = (counts.prompt_tokens, counts.output_tokens)
    if counts.outputs:
        measured.summary = judge_job(
            database_url, measured.job_id, judging.reference, judging.judge, judging.seed, judging.difficulty
        )
        measured.diversity = job_diversity(database_url, measured.job_id).mean


def _run(
    database_url: str,
    candidates: Sequence[Candidate],
    records: Sequence[InputRecord],
    zoo: str,
    judging: _Judging,
    what: str,
) -> list[_Measured]:
    job_ids = _submit(database_url, candidates, records, zoo)
    _follow(database_url, job_ids, what)
    measured = [_Measured(c, job_id) for c, job_id in zip(candidates, job_ids, strict=True)]
    for row in measured:
        _measure(database_url, row, judging)
    return measured


def _distances_table(pairs: dict[frozenset[str], float]) -> Table:
    table = Table(title="source diversity: cosine distance between the models' answers")
    for name, justify in (("model A", "left"), ("model B", "left"), ("distance", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for pair, distance in pairs.items():
        first, second = sorted(pair)
        table.add_row(first, second, f"{distance:.4f}")
    return table


def _ranking_table(rows: list[_Measured], items: int, gpu_memory_gb: float, context_gb: float) -> Table:
    table = Table(title=f"recipes ranked by LC win rate ({items} prompts)")
    columns = ("#", "recipe", "rule", "proposers", "aggregator", "LC win rate (%)", "win rate (%)")
    for column in (*columns, "diversity", "tokens/item in/out", "generations", "GPU plan"):
        table.add_column(column)
    order = ranked([row.summary for row in rows])
    for rank, index in enumerate(order, start=1):
        row, summary = rows[index], rows[index].summary or {}
        table.add_row(
            str(rank),
            row.candidate.recipe.name,
            row.candidate.rule,
            row.candidate.proposers,
            row.candidate.aggregator,
            percent(summary, "lc_win_rate", "lc_standard_error"),
            percent(summary, "win_rate", "standard_error"),
            "-" if row.diversity is None else f"{row.diversity:.4f}",
            f"{row.tokens[0] / items:.0f} / {row.tokens[1] / items:.0f}",
            str(generations(row.candidate.recipe, items)),
            plan_summary(row.candidate.recipe, gpu_memory_gb, context_gb),
        )
    return table


def tune(
    zoo_path: Annotated[Path, typer.Argument(metavar="ZOO", help="The zoo: models, aggregators, sampling.")],
    prompts: Annotated[Path, typer.Argument(metavar="PROMPTS", help="JSONL, JSON list, Parquet or CSV.")],
    sample: Annotated[
        int | None, typer.Option(min=1, help="Prompts drawn from the file (default: all).")
    ] = None,
    reference: ReferenceOption = None,
    judge: JudgeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample and of the judge's order.")] = 0,
    proposers: Annotated[int, typer.Option(min=1, help="Proposers per candidate recipe.")] = 3,
    min_distance: Annotated[
        float,
        typer.Option(min=0.0, help="Least cosine distance between two proposers' answers (diverse rule)."),
    ] = 0.0,
    max_generations: Annotated[
        int | None,
        typer.Option(min=1, help="Cap on generations (proposer slots + aggregations, every prompt)."),
    ] = None,
    gpu_memory_gb: Annotated[
        float, typer.Option(min=0.1, help="Device memory of the GPU plan column.")
    ] = 80.0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the best recipe is written.")] = Path(
        "tune-best.yaml"
    ),
    input_format: InputFormatOption = None,
    field: FieldOption = None,
) -> None:
    """Choose a recipe from a model zoo: solo runs, source diversity, candidate recipes, ranked.

    Running it again with the same inputs reuses every job and evaluation it finished.
    """
    settings = get_settings()
    judging = _Judging(
        reference_option(reference), judge_option(judge), seed, settings.eval_instruction_difficulty
    )
    try:
        zoo = load_zoo(zoo_path)
        records = read_records(prompts, None, input_format=input_format, fields=FieldMap.parse(field or []))
        records = sample_records(records, sample, seed)
        solos = solo_candidates(zoo)
        spent = check_solo_budget(solos, len(records), max_generations)
        with judging_services(Path(f"tune-{zoo.name}.worker.log")) as url:
            rows = _run(url, solos, records, zoo.name, judging, "solo runs")
            between = source_diversity(url, {row.candidate.aggregator: row.job_id for row in rows})
            distances = {frozenset((p.model_a, p.model_b)): p.distance for p in between.pairs}
            # The models that were scored, best first: a model whose every item failed is no candidate.
            ranking = [
                rows[i].candidate.aggregator
                for i in ranked([r.summary for r in rows])
                if score(rows[i].summary) is not None
            ]
            candidates = (
                choose_candidates(zoo, ranking, distances, proposers=proposers, min_distance=min_distance)
                if ranking
                else []
            )
            budget = None if max_generations is None else max_generations - spent
            kept, dropped = within_budget(candidates, len(records), budget)
            if dropped:
                console.print(
                    f"--max-generations {max_generations}: {spent} go to the solo runs; left out "
                    + ", ".join(f"{c.recipe.name} ({generations(c.recipe, len(records))})" for c in dropped)
                )
            rows += _run(url, kept, records, zoo.name, judging, "candidate recipes")
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    console.print(_distances_table(distances))
    console.print(_ranking_table(rows, len(records), gpu_memory_gb, CUDA_CONTEXT_GB))
    best = rows[ranked([row.summary for row in rows])[0]]
    if score(best.summary) is None:
        raise fail("no recipe was scored: every job ended without outputs to judge", code=1)
    output.write_text(recipe_yaml(best.candidate.recipe), encoding="utf-8")
    console.print(f"best: {best.candidate.recipe.name} (job {best.job_id}) -> {output}")
