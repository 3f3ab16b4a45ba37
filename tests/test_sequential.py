"""Sequential aggregation: a pool larger than the aggregator's context read whole, window by window,
with the running synthesis; every step stored (and resumed after a kill or a retry); `auto` choosing.

Synthetic outputs start with `MODEL:DIGEST` of the prompt they saw, so each step's text proves which
candidates (and which synthesis) its prompt held.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy import select

from db import progress, timeline
from db.models import Candidate, Item, Job, Output
from db.session import session_scope
from orchestrator.api.bodies import ItemDetailPublic, ProgressPublic
from orchestrator.contracts import InputRecord
from orchestrator.errors import RecipeError
from orchestrator.export_writers import Rejected
from orchestrator.exports import ExportFormat, open_export
from orchestrator.planning import plan_memory
from orchestrator.prompts import build_stage_prompt, step_references, step_windows
from orchestrator.recipes import Recipe
from orchestrator.recovery import retry_job
from orchestrator.submission import enqueue_job
from tests.conftest import recipe_from_yaml, run_cli, sample_records, store, submit, wait_for_job
from tests.killable import fault_env, finish_with_sweeps, retry_aggregators, run_with_flaky_model
from tests.test_pipeline import job_rows
from workers.engines import ChatRequest
from workers.engines.synthetic import WordTokenizer, prompt_digest

# Six candidates of 40 words; with the aggregator prompt (92 words), the instruction and the
# 40-token answer they overflow a 400-token context, while a window of two plus a synthesis fits.
RECIPE = """
name: NAME
models:
  seq-a: {engine: synthetic, output_tokens: 40, latency_ms: PROPOSE_MS}
  seq-b: {engine: synthetic, output_tokens: 40, latency_ms: PROPOSE_MS}
  AGG: {engine: synthetic, output_tokens: 40, context_length: CONTEXT, latency_ms: AGGREGATE_MS}
layers:
  - proposers:
      - {model: seq-a, samples: 3, sampling: {seed: 1, max_tokens: 40}}
      - {model: seq-b, samples: 3, sampling: {seed: 10, max_tokens: 40}}
aggregator: {model: AGG, mode: MODE, window: 2, sampling: {seed: 0, max_tokens: 40}}
min_pool: 1
"""
SMALL_CONTEXT = 400


def recipe(
    mode: str, agg: str, context: int = SMALL_CONTEXT, propose_ms: int = 0, aggregate_ms: int = 0
) -> Recipe:
    values = {
        "NAME": f"sequential-{mode}-{agg}",
        "AGGREGATE_MS": str(aggregate_ms),
        "PROPOSE_MS": str(propose_ms),
        "AGG": agg,
        "MODE": mode,
        "CONTEXT": str(context),
    }
    text = RECIPE
    for key, value in values.items():
        text = text.replace(key, value)
    return recipe_from_yaml(text)


def digest(recipe: Recipe, instruction: str, references: list[str]) -> tuple[str, bool]:
    """The aggregator's digest for the builder's prompt over `references`, and whether it was cut."""
    sampling = recipe.aggregator.sampling
    prompt = build_stage_prompt(
        instruction,
        references=references,
        context_length=recipe.model(recipe.aggregator.model).context_length,
        max_tokens=sampling.max_tokens,
        tokenizer=WordTokenizer(),
    )
    return prompt_digest(ChatRequest.build("x", prompt.messages, sampling)), prompt.truncation is not None


def steps_of(candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c.layer == 1]


def assert_steps_read_every_candidate_whole(
    recipe: Recipe, item: Item, candidates: list[Candidate], output: Output | None
) -> None:
    """Each step's text is the digest of its window (and the synthesis before it), uncut; together
    the windows hold every candidate exactly once; the last step is the output."""
    model = recipe.aggregator.model
    pool = [c.text or "" for c in candidates if c.layer == 0]
    steps = steps_of(candidates)
    assert [(s.slot, s.model) for s in steps] == [(0, model), (1, model)]
    assert all(s.prompt_tokens and s.output_tokens == 40 and s.latency_ms is not None for s in steps)
    assert output is not None
    texts = [s.text or "" for s in steps] + [output.text]
    seen: list[str] = []
    for step, text in enumerate(texts):
        references = step_references(pool, 2, step, texts[step - 1] if step else None)
        expected, cut = digest(recipe, item.instruction, references)
        assert text.startswith(f"{model}:{expected} ") and not cut
        seen += references[1:] if step else references
    assert sorted(seen) == sorted(pool) and len(seen) == 6
    # The single prompt over this pool would have cut every candidate.
    assert digest(recipe, item.instruction, pool)[1]


def test_windows_cover_the_pool_once_and_the_synthesis_comes_first() -> None:
    assert step_windows(6, 2) == [range(0, 2), range(2, 4), range(4, 6)]
    assert step_windows(5, 3) == [range(0, 3), range(3, 5)]
    assert step_windows(1, 2) == [range(0, 1)]
    pool = ["a", "b", "c", "d", "e"]
    assert step_references(pool, 2, 0, None) == ["a", "b"]
    assert step_references(pool, 2, 2, "draft") == ["draft", "e"]


def test_a_window_below_two_or_an_unknown_mode_is_refused() -> None:
    data = recipe("sequential", "seq-agg").model_dump()
    with pytest.raises(ValidationError, match="window"):
        Recipe.model_validate(data | {"aggregator": data["aggregator"] | {"window": 1}})
    with pytest.raises(
        RecipeError, match=re.escape("aggregator.mode: Input should be 'single', 'sequential' or 'auto'")
    ):
        recipe("rolling", "seq-agg")


def test_the_plan_counts_the_passes_and_the_longest_step() -> None:
    data = recipe("sequential", "seq-agg").model_dump()
    for model in data["models"].values():
        model["memory_gb"] = 1
    sequential = Recipe.model_validate(data)
    single = Recipe.model_validate(data | {"aggregator": data["aggregator"] | {"mode": "single"}})
    assert plan_memory(sequential, 4).aggregator_passes == 3
    assert plan_memory(single, 4).aggregator_passes == 1
    large = data | {
        "models": data["models"] | {"seq-agg": data["models"]["seq-agg"] | {"context_length": 9000}}
    }
    auto = Recipe.model_validate(large | {"aggregator": data["aggregator"] | {"mode": "auto"}})
    assert plan_memory(auto, 4).aggregator_passes == 1


def test_an_overflowing_pool_is_read_whole_across_steps(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    chosen = recipe("sequential", "seq-agg")
    turns = ["Name a prime number.", "Now name a larger one."]
    records = [*sample_records(3), InputRecord(id="mt", instruction=turns[-1], turns=turns)]
    job_id = submit(database_url, chosen, records)
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_succeeded) == ("succeeded", 4)

    rows = job_rows(database_url, job_id)
    for item, candidates, output in rows[:3]:
        assert output is not None and item.truncation is None
        assert_steps_read_every_candidate_whole(chosen, item, candidates, output)
    # A multi-turn item aggregates each turn in steps of its own.
    item, candidates, output = rows[3]
    assert sorted((c.turn, c.slot) for c in steps_of(candidates)) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    with session_scope(database_url) as session:
        counts = progress.job_counts(session, job_id)
        assert counts.candidates == {(0, 0): (24, 0), (1, 0): (6, 0)}
        assert counts.steps == {0: 8, 1: 2}
        stages = ProgressPublic.of(session.get_one(Job, job_id), counts).stages
        assert [(s.turn, s.stage, s.expected, s.finished) for s in stages] == [
            (0, "proposers", 24, 24),
            (0, "aggregator steps", 8, 8),
            (0, "aggregator", 4, 4),
            (1, "proposers", 6, 6),
            (1, "aggregator steps", 2, 2),
            (1, "aggregator", 1, 1),
        ]
        detail = ItemDetailPublic.of(session.get_one(Item, rows[0][0].id), rows[0][2])
        assert [(layer.layer, layer.stage, len(layer.candidates)) for layer in detail.layers] == [
            (0, "proposers", 6),
            (1, "aggregator steps", 2),
        ]
        drawn = timeline.job_timeline_rows(session, job_id)
        assert drawn is not None
        aggregations = [g for g in drawn.generations if g.model == "seq-agg"]
        assert len(aggregations) == 15 and all(g.layer is None for g in aggregations)

        job_row = session.get_one(Job, job_id)
        pools = [
            json.loads(line)
            for line in b"".join(open_export(session, job_row, ExportFormat.POOLS).chunks)
            .decode()
            .splitlines()
        ]
        pairs = b"".join(
            open_export(session, job_row, ExportFormat.PREFERENCE, Rejected.parse("longest")).chunks
        ).decode()
    first = pools[0]
    assert [c["layer"] for c in first["candidates"]] == [0] * 6
    assert [(s["turn"], s["step"], s["model"]) for s in first["steps"]] == [
        (0, 0, "seq-agg"),
        (0, 1, "seq-agg"),
    ]
    assert (
        first["steps"][1]["text"] == steps_of(rows[0][1])[1].text and first["steps"][0]["output_tokens"] == 40
    )
    # Preference pairs reject a proposer's candidate, never a step.
    assert {json.loads(line)["rejected_model"] for line in pairs.splitlines()} <= {"seq-a", "seq-b"}


def test_auto_reads_a_fitting_pool_at_once_and_an_overflowing_one_in_steps(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    roomy = recipe("auto", "auto-agg-roomy", context=4096)
    tight = recipe("auto", "auto-agg-tight")
    fits = submit(database_url, roomy, sample_records(2))
    overflows = submit(database_url, tight, sample_records(2))
    for job_id in (fits, overflows):
        assert wait_for_job(database_url, job_id).status == "succeeded"
    for item, candidates, output in job_rows(database_url, fits):
        assert steps_of(candidates) == [] and output is not None
        expected, cut = digest(roomy, item.instruction, [c.text or "" for c in candidates])
        assert output.text.startswith(f"auto-agg-roomy:{expected} ") and not cut
    for item, candidates, output in job_rows(database_url, overflows):
        assert_steps_read_every_candidate_whole(tight, item, candidates, output)


def step_rows(database_url: str, job_id: str) -> dict[tuple[int, int], tuple[int, str | None, Any]]:
    """(item, step) -> (row id, text, stored at) of every aggregator step of the job."""
    with session_scope(database_url) as session:
        found = session.execute(
            select(Candidate.item_id, Candidate.slot, Candidate.id, Candidate.text, Candidate.created_at)
            .join(Item, Item.id == Candidate.item_id)
            .where(Item.job_id == job_id, Candidate.layer == 1)
        )
        return {(item, slot): (row, text, at) for item, slot, row, text, at in found}


def assert_resumed_at_the_missing_step(
    database_url: str, job_id: str, chosen: Recipe, before: dict[tuple[int, int], Any], items: int
) -> None:
    after = step_rows(database_url, job_id)
    # Steps stored before the interruption are the ones the later steps read: never redone.
    assert {key: after[key] for key in before} == before
    assert sorted(after) == sorted((item, step) for item in {i for i, _ in after} for step in (0, 1))
    rows = job_rows(database_url, job_id)
    assert len(rows) == items and len(after) == 2 * items
    for item, candidates, output in rows:
        assert output is not None
        assert_steps_read_every_candidate_whole(chosen, item, candidates, output)


def test_a_worker_killed_between_steps_resumes_at_the_missing_step(
    database_url: str, worker_factory: Any
) -> None:
    chosen = recipe("sequential", "slow-agg", aggregate_ms=700)
    killable = worker_factory()
    killable.start()
    job_id = store(database_url, chosen, sample_records(4))
    enqueue_job(job_id)
    deadline = time.monotonic() + 120
    while not step_rows(database_url, job_id):
        assert time.monotonic() < deadline, "no step was stored"
        time.sleep(0.05)
    killable.kill()
    before = step_rows(database_url, job_id)
    assert any((item, 1) not in before for item, _ in before), (
        f"the kill landed between steps: {sorted(before)}"
    )

    killable.start()
    job, resent = finish_with_sweeps(database_url, job_id)
    assert job.status == "succeeded" and job.items_succeeded == 4
    assert resent > 0, "the aggregators lost with the killed worker were re-sent by the sweep"
    assert_resumed_at_the_missing_step(database_url, job_id, chosen, before, 4)


def test_a_retry_resumes_a_failed_aggregation_at_its_failed_step(
    database_url: str, worker_factory: Any
) -> None:
    chosen = recipe("sequential", "flaky-agg")
    job_id, failed = run_with_flaky_model(
        database_url, worker_factory, chosen, sample_records(12), "flaky-agg"
    )
    before = step_rows(database_url, job_id)
    for item, error in failed.items():
        stored = len([key for key in before if key[0] == item])
        assert error is not None and error.startswith(f"aggregator (step {stored + 1} of 3) flaky-agg: "), (
            error
        )
    assert any((item, 0) in before for item in failed), "some item failed after its first step was stored"

    # A turn whose aggregator failed gets its aggregator alone: its pool is complete.
    retry_aggregators(database_url, worker_factory, job_id, failed)
    assert_resumed_at_the_missing_step(database_url, job_id, chosen, before, 12)


def test_a_retry_that_regenerates_candidates_redoes_the_steps(database_url: str, worker_factory: Any) -> None:
    chosen = recipe("sequential", "redo-agg")
    flaky = worker_factory(fault_env({"seq-a": {"error_rate": 0.3}}, retries=0))
    flaky.start()
    job_id = store(database_url, chosen, sample_records(8))
    enqueue_job(job_id)
    job, _ = finish_with_sweeps(database_url, job_id)
    flaky.stop()
    assert job.items_degraded > 0 and job.items_failed == 0
    degraded = step_rows(database_url, job_id)

    worker_factory().start()
    with session_scope(database_url) as session:
        result = retry_job(session, job_id)
    assert len(result.proposer_items) == job.items_degraded and result.aggregator_items == []
    job, _ = finish_with_sweeps(database_url, job_id)
    assert job.status == "succeeded" and job.items_succeeded == 8
    # The steps over the short pools were dropped: the new ones read the whole pool.
    after = step_rows(database_url, job_id)
    assert {key for key in degraded if key[0] in result.proposer_items}.isdisjoint(
        {key for key, row in after.items() if row == degraded.get(key)}
    )
    for item, candidates, output in job_rows(database_url, job_id):
        assert_steps_read_every_candidate_whole(chosen, item, candidates, output)


def test_slimmoa_run_records_the_steps_and_plan_counts_the_passes(tmp_path: Path) -> None:
    data = recipe("sequential", "run-agg").model_dump(mode="json")
    for model in data["models"].values():
        model["memory_gb"] = 1
    (tmp_path / "sequential.yaml").write_text(yaml.safe_dump(data))
    records = sample_records(2)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
    )
    # The embedded mode: a private Redis and ./slimmoa.db (SQLite).
    result = run_cli(tmp_path, "prompts.jsonl", "-o", "out.jsonl", "--recipe", "sequential.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = [json.loads(line)["output"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    pools = [json.loads(line) for line in (tmp_path / "out.pools.jsonl").read_text().splitlines()]
    for pool, output in zip(pools, outputs, strict=True):
        assert [c["layer"] for c in pool["candidates"]] == [0] * 6
        assert [(s["step"], s["model"], s["output_tokens"]) for s in pool["steps"]] == [
            (0, "run-agg", 40),
            (1, "run-agg", 40),
        ]
        assert pool["output"] == output and output.startswith("run-agg:")

    plan = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", str(tmp_path / "sequential.yaml")],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert plan.returncode == 0, plan.stderr
    assert "aggregator passes per item: 3 (sequential, 2 candidates a step" in plan.stdout
