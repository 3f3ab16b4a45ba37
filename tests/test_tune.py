"""`slimmoa tune`: the synthetic quality known by construction, the candidate rule and the budget, and a
whole tune over a zoo of five models and two aggregators on a real worker, interrupted and resumed.

The zoo's quality is built in: its aggregators cite the models whose answers they read, and the judge
scores each output by the names in it (zoo-a 0.8 > zoo-b > zoo-c > zoo-d > zoo-e; agg-good 0.3,
agg-weak -0.3). So the three best models under agg-good are the best recipe by construction.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from db.models import FINAL_JOB_STATUSES, Evaluation, Item, Job
from db.models import Candidate as CandidateRow
from db.session import session_scope
from orchestrator.contracts import ChatMessage
from orchestrator.errors import InvalidInput, RecipeError
from orchestrator.judging import JUDGE_SAMPLING, judge_messages, verdict_preference
from orchestrator.recipes import SamplingSpec, SyntheticModel, load_recipe
from orchestrator.tune import (
    Zoo,
    check_solo_budget,
    choose_candidates,
    generations,
    load_zoo,
    solo_candidates,
    within_budget,
)
from tests.conftest import SAMPLE, stored
from workers.engines import ChatRequest
from workers.engines.synthetic import SyntheticEngine

SCORES = {
    "zoo-a": 0.8,
    "zoo-b": 0.6,
    "zoo-c": 0.4,
    "zoo-d": 0.2,
    "zoo-e": 0.1,
    "agg-good": 0.3,
    "agg-weak": -0.3,
}
ZOO = """
models:
  zoo-a: {engine: synthetic, output_tokens: 16, vendor: alpha, memory_gb: 40, weights_gb: 36}
  zoo-b: {engine: synthetic, output_tokens: 16, vendor: beta, memory_gb: 40, weights_gb: 36}
  zoo-c: {engine: synthetic, output_tokens: 16, vendor: gamma, memory_gb: 40, weights_gb: 36}
  zoo-d: {engine: synthetic, output_tokens: 16, vendor: delta, memory_gb: 40, weights_gb: 36}
  zoo-e: {engine: synthetic, output_tokens: 16, vendor: epsilon, memory_gb: 40, weights_gb: 36}
  agg-good: {engine: synthetic, output_tokens: 24, latency_ms: 300, cite_sources: true, memory_gb: 20}
  agg-weak: {engine: synthetic, output_tokens: 24, latency_ms: 300, cite_sources: true, memory_gb: 20}
aggregators: [agg-good, agg-weak]
sampling:
  proposers: {temperature: 0.7, max_tokens: 64, seed: 1}
  aggregator: {temperature: 0.5, max_tokens: 64, seed: 0}
"""
JUDGES = f"""
name: tune-judges
models:
  tune-judge: {{engine: synthetic, judge_scores: {SCORES}}}
layers: [{{proposers: [{{model: tune-judge}}]}}]
aggregator: {{model: tune-judge}}
"""
PROMPTS = 6


def zoo_from(source: str, name: str = "zoo") -> Zoo:
    return Zoo.model_validate({"name": name, **yaml.safe_load(source)})


# --- quality by construction -------------------------------------------------------------------------


def test_a_citing_aggregator_names_its_sources_and_a_scoring_judge_prefers_them() -> None:
    aggregator = SyntheticEngine("agg-good", SyntheticModel(engine="synthetic", cite_sources=True))
    pool = "1. zoo-a:0123456789abcdef alpha beta\n2. zoo-c:fedcba9876543210 gamma\n3. zoo-a:00000000000000ff"
    messages = [ChatMessage(role="system", content=pool), ChatMessage(role="user", content="Name a colour.")]
    answer = asyncio.run(aggregator.generate(ChatRequest.build("a", messages, SamplingSpec(seed=0))))
    words = answer.text.split()
    assert words[0].startswith("agg-good:") and words[1:3] == ["zoo-a", "zoo-c"] and len(words) == 32

    judge = SyntheticEngine(
        "judge", SyntheticModel.model_validate({"engine": "synthetic", "judge_scores": SCORES})
    )
    chat = judge_messages("Name a colour.", "reference text", answer.text, system_supported=True)
    verdict = asyncio.run(judge.generate(ChatRequest.build("j", chat, JUDGE_SAMPLING, logprobs=20)))
    assert verdict.top_logprobs is not None
    # The output shown second is the job's: 0.8 + 0.4 + 0.3 against nothing.
    assert verdict_preference(verdict.top_logprobs, model_first=False) == pytest.approx(
        1 / (1 + math.exp(-1.5))
    )

    # Without the new fields nothing changes: no citation, the digest's words.
    plain = SyntheticEngine("agg-good", SyntheticModel(engine="synthetic"))
    text = asyncio.run(plain.generate(ChatRequest.build("a", messages, SamplingSpec(seed=0)))).text
    assert "zoo-a" not in text and text.split()[0] == words[0] and len(text.split()) == 32


def test_the_rule_takes_the_best_under_the_diversity_constraint_self_moa_and_the_plain_top() -> None:
    zoo = zoo_from(ZOO.replace("vendor: beta", "vendor: alpha"))
    ranking = ["zoo-a", "zoo-b", "zoo-c", "zoo-d", "zoo-e"]
    distances = {frozenset(("zoo-a", "zoo-c")): 0.01}
    chosen = choose_candidates(zoo, ranking, distances, proposers=3, min_distance=0.05)
    summary = [(c.recipe.name, c.proposers, c.aggregator) for c in chosen]
    assert summary == [
        # zoo-b shares zoo-a's vendor, zoo-c answers too much like zoo-a.
        ("zoo-diverse-agg-good", "zoo-a, zoo-d, zoo-e", "agg-good"),
        ("zoo-diverse-agg-weak", "zoo-a, zoo-d, zoo-e", "agg-weak"),
        ("zoo-self-agg-good", "zoo-a x3", "agg-good"),
        ("zoo-self-agg-weak", "zoo-a x3", "agg-weak"),
        ("zoo-top-agg-good", "zoo-a, zoo-b, zoo-c", "agg-good"),
        ("zoo-top-agg-weak", "zoo-a, zoo-b, zoo-c", "agg-weak"),
    ]
    # With distinct sources the top set is the diverse one, listed once.
    plain = choose_candidates(zoo_from(ZOO), ranking, {}, proposers=3)
    assert [c.rule for c in plain] == ["diverse", "diverse", "self", "self"]
    assert all(
        c.recipe.models.keys() == {*c.proposers.replace(" x3", "").split(", "), c.aggregator} for c in plain
    )


def test_the_budget_refuses_solo_runs_it_cannot_pay_and_trims_candidates_in_order() -> None:
    zoo = zoo_from(ZOO)
    solos = solo_candidates(zoo)
    assert [c.recipe.name for c in solos] == [f"zoo-solo-zoo-{x}" for x in "abcde"]
    assert check_solo_budget(solos, 6, None) == 5 * 2 * 6
    with pytest.raises(InvalidInput, match="the solo runs alone need 60 generations"):
        check_solo_budget(solos, 6, 59)
    candidates = choose_candidates(zoo, ["zoo-a", "zoo-b", "zoo-c", "zoo-d", "zoo-e"], {}, proposers=3)
    assert [generations(c.recipe, 6) for c in candidates] == [24, 24, 24, 24]
    kept, dropped = within_budget(candidates, 6, 50)
    assert [c.recipe.name for c in kept] == ["zoo-diverse-agg-good", "zoo-diverse-agg-weak"]
    assert [c.recipe.name for c in dropped] == ["zoo-self-agg-good", "zoo-self-agg-weak"]


def test_a_zoo_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(ZOO.replace("[agg-good, agg-weak]", "[agg-good, agg-ghost]"))
    with pytest.raises(RecipeError, match=r"aggregators\[1\]: unknown model 'agg-ghost'"):
        load_zoo(path)
    path.write_text(ZOO)
    assert load_zoo(path).proposers == [f"zoo-{x}" for x in "abcde"]


# --- a whole tune on a real worker -------------------------------------------------------------------


def slimmoa_tune(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "zoo.yaml").write_text(ZOO)
    (tmp_path / "judges.yaml").write_text(JUDGES)
    return [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "tune",
        str(tmp_path / "zoo.yaml"),
        str(SAMPLE),
        "--sample",
        str(PROMPTS),
        "--reference",
        str(SAMPLE),
        "--judge",
        f"{tmp_path / 'judges.yaml'}:tune-judge",
        "--output",
        str(tmp_path / "best.yaml"),
        *extra,
    ]


def test_a_budget_below_the_solo_runs_stores_nothing(database_url: str, tmp_path: Path) -> None:
    before = stored(database_url)
    command = slimmoa_tune(tmp_path, "--max-generations", "10")
    result = subprocess.run(
        command, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the solo runs alone need 60 generations" in result.stderr.replace("\n", "")
    assert stored(database_url) == before


def tune_jobs(database_url: str) -> dict[str, Job]:
    with session_scope(database_url) as session:
        jobs = session.scalars(select(Job).where(Job.name.like("tune zoo: %"))).all()
        return {job.name or "": job for job in jobs}


def candidate_rows(database_url: str, job_ids: list[str]) -> dict[int, tuple[str, datetime]]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(CandidateRow.id, Item.job_id, CandidateRow.created_at)
            .join(Item)
            .where(Item.job_id.in_(job_ids))
        ).all()
        return {row_id: (job_id, created) for row_id, job_id, created in rows}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f} s")
        time.sleep(0.05)


def test_tune_ranks_the_best_combination_first_and_resumes_without_generating_again(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    env = {**os.environ, "COLUMNS": "250"}
    # 60 generations for the solo runs leave 80: three candidates of 24, not the fourth.
    command = slimmoa_tune(tmp_path, "--max-generations", "140")
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    # Interrupt it once the candidate recipes are submitted, while they run.
    wait_until(lambda: any("-diverse-" in name for name in tune_jobs(database_url)), 240, "no candidate job")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    log.close()
    # A job the kill caught between its commit and its dispatch stays queued: the re-run sends it.
    wait_until(
        lambda: all(
            job.status in {*FINAL_JOB_STATUSES, "queued"} for job in tune_jobs(database_url).values()
        ),
        120,
        "the interrupted tune's jobs did not end",
    )
    before = tune_jobs(database_url)
    ended = [job.id for job in before.values() if job.status in FINAL_JOB_STATUSES]
    rows_before = candidate_rows(database_url, ended)
    assert len(before) >= 6 and len(ended) >= 5 and rows_before

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "5 jobs: 0 new, 5 found from an earlier tune" in out

    after = tune_jobs(database_url)
    # Eight recipes: five solo, diverse under each aggregator and Self-MoA under agg-good (the budget
    # leaves Self-MoA under agg-weak out); each stored once, the earlier jobs found with their rows untouched.
    assert "left out zoo-self-agg-weak (24)" in out
    assert sorted(after) == sorted(
        [f"tune zoo: zoo-solo-zoo-{x}" for x in "abcde"]
        + [f"tune zoo: zoo-{recipe}" for recipe in ("diverse-agg-good", "diverse-agg-weak", "self-agg-good")]
    )
    assert {name: job.id for name, job in after.items() if name in before} == {
        n: j.id for n, j in before.items()
    }
    rows_after = candidate_rows(database_url, [job.id for job in after.values()])
    assert {k: v for k, v in rows_after.items() if v[0] in ended} == rows_before
    assert all(job.status == "succeeded" for job in after.values())
    with session_scope(database_url) as session:
        judged = session.scalars(
            select(Evaluation.job_id).where(Evaluation.job_id.in_([j.id for j in after.values()]))
        )
        assert sorted(judged) == sorted(job.id for job in after.values()), "one evaluation per job"

    cells = [line.split("│") for line in out.splitlines() if line.startswith("│ ")]
    table = [row for row in cells if row[1].strip().isdigit()]
    assert [cells[2].strip() for cells in table[:4]] == [
        "zoo-diverse-agg-good",
        "zoo-diverse-agg-weak",
        "zoo-self-agg-good",
        "zoo-solo-zoo-a",
    ]
    assert "zoo-a, zoo-b, zoo-c" in table[0][4] and "80/80 GB, loads: 4" in table[0][11]
    assert f"best: zoo-diverse-agg-good (job {after['tune zoo: zoo-diverse-agg-good'].id})" in out
    best = load_recipe(tmp_path / "best.yaml", tmp_path)
    assert [p.model for p in best.layers[0].proposers] == ["zoo-a", "zoo-b", "zoo-c"]
    assert best.aggregator.model == "agg-good" and best.model("agg-good") == SyntheticModel.model_validate(
        yaml.safe_load(ZOO)["models"]["agg-good"]
    )
