"""The measuring commands of `slimmoa`: `eval` (a job against reference outputs), `compare` (two jobs
head to head) and `diversity` (how different the candidates of each pool are)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db import evaluations
from db.session import session_scope
from orchestrator.cli.console import POLL_INTERVAL_S, console, fail, fail_on
from orchestrator.cli.options import JudgeOption, ReferenceOption
from orchestrator.cli.run import embedded_services
from orchestrator.embedded import worker_process
from orchestrator.errors import SlimMoAError
from orchestrator.evaluation import (
    JOB_REFERENCE_PREFIX,
    enqueue_judgments,
    finalize_evaluation,
    load_difficulties,
    load_reference,
    start_evaluation,
)
from orchestrator.judging import JudgeSpec, resolve_judge
from orchestrator.recipes import OpenAIModel
from orchestrator.settings import get_settings
from orchestrator.watchdog import Watchdog, live_consumers

__all__ = [
    "compare",
    "diversity",
    "evaluate",
    "judge_job",
    "judge_option",
    "judging_services",
    "percent",
    "reference_option",
]


@contextmanager
def judging_services(log_path: Path) -> Iterator[str]:
    """The database URL to use, with workers to judge: the configured services (their workers are
    running), or, with no REDIS_URL, a private Redis and a local worker for this command only."""
    settings = get_settings()
    if settings.redis_url:
        yield settings.database_url_or_embedded()
        return
    with embedded_services(settings) as services:
        env = {"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
        with worker_process(env, log_path, services.stage_threads):
            yield services.database_url


def judge_option(judge: str | None) -> JudgeSpec:
    settings = get_settings()
    try:
        spec = resolve_judge(judge or settings.eval_judge, settings)
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    key_env = spec.spec.api_key_env if isinstance(spec.spec, OpenAIModel) else None
    if key_env and not os.environ.get(key_env):
        raise fail(f"judge {spec.label}: environment variable {key_env} is not set (the judge's API key)")
    return spec


def reference_option(reference: str | None) -> str:
    """The reference `--reference` names, or EVAL_REFERENCE's file, which must then exist."""
    chosen = reference or str(get_settings().eval_reference)
    if reference is None and not Path(chosen).is_file():
        raise fail(f"reference file {chosen} not found: pass --reference FILE or set EVAL_REFERENCE")
    return chosen


def judge_job(
    database_url: str, job_id: str, reference_arg: str, judge: JudgeSpec, seed: int, difficulty: Path | None
) -> dict[str, Any]:
    """Start or resume the evaluation, send what is left to judge, follow it, and store the metrics."""
    try:
        reference = load_reference(reference_arg, database_url)
        start = start_evaluation(database_url, job_id, reference, judge, seed=seed)
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    console.print(
        f"evaluation {start.evaluation_id} of job {job_id} by {judge.label} (order seed {start.seed}): "
        f"{start.total} items to judge "
        f"({start.already_judged} judged before; skipped {start.without_output} without output, "
        f"{start.without_reference} without a reference row)"
    )
    enqueue_judgments(start.to_judge)
    settings = get_settings()
    watchdog = Watchdog(
        settings.stall_timeout_s,
        f"evaluation {start.evaluation_id}",
        lambda: live_consumers(settings.queue_inference) > 0,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("judging", total=start.total)
        while True:
            with session_scope(database_url) as session:
                counts = evaluations.judgment_counts(session, start.evaluation_id)
                latest = evaluations.latest_judgment_error(session, start.evaluation_id)
            done = counts["done"] + counts["failed"]
            description = f"judging ({counts['failed']} failed)" + (
                f" latest: {latest[:120]}" if latest else ""
            )
            progress.update(bar, completed=done, description=description)
            if not counts["pending"]:
                break
            watchdog.check((counts["done"], counts["failed"]))
            time.sleep(POLL_INTERVAL_S)
    summary = finalize_evaluation(database_url, start.evaluation_id, load_difficulties(difficulty))
    summary["evaluation_id"] = start.evaluation_id
    return summary


def percent(summary: dict[str, Any], value: str, error: str, digits: int = 2) -> str:
    if summary.get(value) is None:
        return "-"
    spread = f" ± {summary[error]:.{digits}f}" if summary.get(error) is not None else ""
    return f"{summary[value]:.{digits}f}{spread}"


def _summary_table(title: str, summary: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("win rate (%)", percent(summary, "win_rate", "standard_error"))
    table.add_row("length-controlled win rate (%)", percent(summary, "lc_win_rate", "lc_standard_error"))
    if "n_total" in summary:
        table.add_row(
            "wins / draws / losses", f"{summary['n_wins']} / {summary['n_draws']} / {summary['n_losses']}"
        )
    judged = summary["judgments"]
    table.add_row("judged / failed", f"{judged['done']} / {judged['failed']}")
    table.add_row("GLM", str(summary.get("glm", "-")))
    return table


def _breakdown_table(title: str, rows: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title)
    for name, justify in (("group", "left"), ("n", "right"), ("win rate (%)", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for group, row in rows.items():
        table.add_row(group, str(int(row["n"])), percent(row, "win_rate", "standard_error", digits=1))
    return table


def evaluate(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job whose outputs are judged.")],
    reference: ReferenceOption = None,
    judge: JudgeOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the per-item order of the two outputs.")] = 0,
) -> None:
    """Judge a job's outputs against reference outputs (AlpacaEval 2.0): win rate and LC win rate.

    Running it again resumes the same evaluation: only items without a verdict are judged.
    """
    settings = get_settings()
    chosen = judge_option(judge)
    reference_arg = reference_option(reference)
    try:
        with judging_services(Path(f"eval-{job_id[:8]}.worker.log")) as database_url:
            summary = judge_job(
                database_url, job_id, reference_arg, chosen, seed, settings.eval_instruction_difficulty
            )
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    console.print(_summary_table(f"job {job_id} vs {Path(reference_arg).name}", summary))
    if summary.get("by_dataset"):
        console.print(_breakdown_table("by dataset", summary["by_dataset"]))
    if summary["status"] == "failed":
        raise typer.Exit(1)


def compare(
    job_a: Annotated[str, typer.Argument(metavar="JOB_A", help="The job whose outputs are judged.")],
    job_b: Annotated[str, typer.Argument(metavar="JOB_B", help="The job it is compared with.")],
    judge: JudgeOption = None,
    plot: Annotated[Path | None, typer.Option(help="Where to write the PNG plot.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the per-item order of the two outputs.")] = 0,
) -> None:
    """Head-to-head of two jobs on the same prompts: A's win rate over B, by dataset and output length."""
    from orchestrator.plots import plot_comparison

    chosen = judge_option(judge)
    try:
        with judging_services(Path(f"compare-{job_a[:8]}-{job_b[:8]}.worker.log")) as database_url:
            summary = judge_job(database_url, job_a, f"{JOB_REFERENCE_PREFIX}{job_b}", chosen, seed, None)
    except SlimMoAError as exc:
        raise fail_on(exc) from None
    console.print(_summary_table(f"job {job_a} (A) vs job {job_b} (B)", summary))
    if summary["status"] == "failed":
        raise typer.Exit(1)
    console.print(_breakdown_table("A's win rate by dataset", summary["by_dataset"]))
    console.print(
        _breakdown_table("A's win rate by A's output length (characters)", summary["by_output_length"])
    )
    target = plot or Path(f"compare-{job_a[:8]}-{job_b[:8]}.png")
    plot_comparison(summary, target, title=f"{job_a[:8]} (A) vs {job_b[:8]} (B), judge {chosen.label}")
    console.print(f"plot: {target}")


def diversity(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job whose candidate pools are measured.")],
    output: Annotated[
        Path | None, typer.Option(help="Also write every item's diversity as JSONL here.")
    ] = None,
) -> None:
    """Pool diversity: mean pairwise cosine distance of the candidates' embeddings, per job and per
    proposer pair (0: identical candidates)."""
    from orchestrator.diversity import job_diversity

    try:
        result = job_diversity(get_settings().database_url_or_embedded(), job_id)
    except LookupError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"pool diversity of job {job_id} (cosine distance, all-MiniLM-L6-v2)")
    for name, justify in (("layer", "right"), ("proposer A", "left"), ("proposer B", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("items", justify="right")
    table.add_column("distance", justify="right")
    for pair in result.pairs:
        table.add_row(
            str(pair.layer),
            f"{pair.slot_a}: {pair.model_a}",
            f"{pair.slot_b}: {pair.model_b}",
            str(pair.items),
            f"{pair.distance:.4f}",
        )
    console.print(table)
    measured = [i for i in result.items if i.distance is not None]
    spread = f" ± {result.std:.4f} (sd)" if result.std is not None else ""
    mean = f"{result.mean:.4f}{spread}" if result.mean is not None else "- (no pool has two candidates)"
    console.print(f"job {job_id}: mean pool diversity {mean} over {len(measured)} pools")
    if output is not None:
        output.write_text("".join(i.model_dump_json() + "\n" for i in result.items), encoding="utf-8")
        console.print(f"per item: {output}")
