"""Judging: the weighted verdict, the engines' logprobs, `slimmoa eval` over a small job on a real
worker with a synthetic judge, resuming an interrupted evaluation, and `slimmoa compare`'s PNG.

The synthetic engine's first-token distribution is a deterministic function of the judge's prompt, so
the tests can recompute every stored verdict from the prompt the judge must have been given.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db import evaluations
from db.models import Evaluation, Judgment
from db.session import session_scope
from orchestrator.contracts import ChatMessage
from orchestrator.errors import NoVerdict
from orchestrator.evaluation import load_reference, start_evaluation
from orchestrator.judging import (
    JUDGE_LOGPROBS,
    JUDGE_SAMPLING,
    judge_messages,
    resolve_judge,
    shows_model_first,
    verdict_preference,
)
from orchestrator.recipes import OpenAIModel, SamplingSpec, SyntheticModel
from orchestrator.settings import get_settings
from tests.conftest import recipe_from_yaml, sample_records, submit, wait_for_job
from workers.engines import ChatRequest
from workers.engines.openai_engine import OpenAIEngine
from workers.engines.synthetic import SyntheticEngine, fake_top_logprobs, prompt_digest

JOB_RECIPE = """
name: eval-job
models:
  eval-a: {engine: synthetic, output_tokens: 12}
  eval-agg: {engine: synthetic, output_tokens: %d}
layers:
  - proposers:
      - {model: eval-a, sampling: {seed: 1}}
      - {model: eval-a, sampling: {seed: 2}}
aggregator: {model: eval-agg, sampling: {seed: 0}}
"""
JUDGES = """
name: judges
models:
  synth-judge: {engine: synthetic}
  unreachable: {engine: openai, base_url: "http://127.0.0.1:9/v1", model: nobody}
  always-fails: {engine: synthetic}
layers: [{proposers: [{model: synth-judge}]}]
aggregator: {model: synth-judge}
"""


# --- the verdict -------------------------------------------------------------------------------------


def test_the_verdict_is_the_probability_of_the_model_position() -> None:
    logprobs = {"m": math.log(0.6), "M": math.log(0.2), "The": math.log(0.2)}
    assert verdict_preference(logprobs, model_first=True) == pytest.approx(0.75)
    assert verdict_preference(logprobs, model_first=False) == pytest.approx(0.25)
    # Leading spaces are the tokenizer's business; a missing verdict token has probability 0.
    assert verdict_preference({" M": -0.1, "Both": -3.0}, model_first=False) == 1.0
    with pytest.raises(NoVerdict, match="neither 'm' nor 'M'"):
        verdict_preference({"The": -0.1}, model_first=True)


def test_the_order_is_a_fair_coin_fixed_by_seed_and_item() -> None:
    draws = [shows_model_first(0, item_id) for item_id in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws == [shows_model_first(0, item_id) for item_id in range(2000)]
    assert draws != [shows_model_first(1, item_id) for item_id in range(2000)]


def test_the_judge_prompt_holds_both_outputs_in_order_and_folds_the_system_role() -> None:
    messages = judge_messages("Name a colour.", "Blue.", "Red.", system_supported=True)
    assert [m.role for m in messages] == ["system", "user"]
    user = messages[1].content
    assert '"instruction": """Name a colour."""' in user
    assert user.index('"output": """Blue."""') < user.index('"output": """Red."""')
    assert user.rstrip().endswith("## Best Model Identifier")
    merged = judge_messages("Name a colour.", "Blue.", "Red.", system_supported=False)
    assert [m.role for m in merged] == ["user"] and merged[0].content.startswith(messages[0].content)


# --- logprobs from the engines ---------------------------------------------------------------------


def judge_request(seed: int = 0) -> ChatRequest:
    messages = [ChatMessage(role="user", content="Which is better, m or M?")]
    return ChatRequest.build("j1", messages, JUDGE_SAMPLING.model_copy(update={"seed": seed}), logprobs=5)


def test_synthetic_logprobs_are_a_deterministic_distribution() -> None:
    engine = SyntheticEngine("judge", SyntheticModel(engine="synthetic"))
    first = asyncio.run(engine.generate(judge_request()))
    again = asyncio.run(engine.generate(judge_request()))
    other = asyncio.run(engine.generate(judge_request(seed=1)))
    assert first.top_logprobs == again.top_logprobs != other.top_logprobs
    assert first.top_logprobs is not None and len(first.top_logprobs) == 5
    assert sum(math.exp(v) for v in fake_top_logprobs("x", 100).values()) == pytest.approx(1.0)
    plain = asyncio.run(engine.generate(ChatRequest.build("p", judge_request().messages, SamplingSpec())))
    assert plain.top_logprobs is None, "logprobs only when asked"


def test_openai_engine_asks_for_and_reads_top_logprobs() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        top = [{"token": "M", "logprob": -0.02}, {"token": "m", "logprob": -4.0}]
        content = [{"token": "M", "logprob": -0.02, "top_logprobs": top}]
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "message": {"role": "assistant", "content": "M"},
                        "finish_reason": "length",
                        "logprobs": {"content": content},
                    }
                ],
                "usage": {"prompt_tokens": 300, "completion_tokens": 1},
            },
        )

    spec = OpenAIModel(engine="openai", base_url="http://judge.test/v1", model="gpt-4-1106-preview")
    engine = OpenAIEngine("judge", spec, transport=httpx.MockTransport(handler))
    asyncio.run(engine.start())
    generation = asyncio.run(engine.generate(judge_request()))
    assert (seen[0]["logprobs"], seen[0]["top_logprobs"], seen[0]["max_tokens"]) == (True, 5, 1)
    assert generation.top_logprobs == {"M": -0.02, "m": -4.0}


# --- evaluating a job on a real worker -------------------------------------------------------------


def write_reference(path: Path, count: int) -> Path:
    lines = [
        json.dumps({"instruction": r.instruction, "output": "reference " * (5 + 3 * i), "generator": "ref"})
        for i, r in enumerate(sample_records(count))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def slimmoa(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def judged_setup(
    database_url: str, tmp_path: Path, count: int, output_tokens: int = 16
) -> tuple[str, Path, Path]:
    """A finished synthetic job of `count` items, a reference file for its prompts and the judges' recipe."""
    job_id = submit(database_url, recipe_from_yaml(JOB_RECIPE % output_tokens), sample_records(count))
    assert wait_for_job(database_url, job_id).status == "succeeded"
    judges = tmp_path / "judges.yaml"
    judges.write_text(JUDGES)
    return job_id, write_reference(tmp_path / "reference.jsonl", count), judges


def expected_preference(judgment: Judgment, instruction: str, output: str) -> float:
    """What the synthetic judge must have answered for this judgment's prompt."""
    first, second = (
        (output, judgment.reference_output) if judgment.swapped else (judgment.reference_output, output)
    )
    messages = judge_messages(instruction, first, second, system_supported=True)
    request = ChatRequest.build("x", messages, JUDGE_SAMPLING, logprobs=JUDGE_LOGPROBS)
    logprobs = fake_top_logprobs(prompt_digest(request), JUDGE_LOGPROBS)
    return verdict_preference(logprobs, model_first=judgment.swapped)


def evaluation_of(database_url: str, job_id: str) -> tuple[Evaluation, list[tuple[Judgment, str, str]]]:
    with session_scope(database_url) as session:
        (evaluation,) = session.scalars(select(Evaluation).where(Evaluation.job_id == job_id)).all()
        rows = [(j, j.item.instruction, j.item.output.text) for j in evaluation.judgments]  # type: ignore[union-attr]
        return evaluation, rows


def test_eval_judges_every_item_and_stores_win_rates(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    job_id, reference, judges = judged_setup(database_url, tmp_path, 8, output_tokens=24)

    result = slimmoa("eval", job_id, "--reference", str(reference), "--judge", f"{judges}:synth-judge")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 items to judge (0 judged before" in result.stdout
    assert "length-controlled win rate (%)" in result.stdout

    evaluation, rows = evaluation_of(database_url, job_id)
    assert (evaluation.status, evaluation.total, len(rows)) == ("succeeded", 8, 8)
    assert evaluation.judge == "judges:synth-judge"
    for judgment, instruction, output in rows:
        assert judgment.status == "done" and judgment.error is None
        assert judgment.preference == pytest.approx(expected_preference(judgment, instruction, output))
        assert judgment.verdict_logprobs and judgment.reference_index is not None
    preferences = [j.preference or 0.0 for j, _, _ in rows]
    mean = sum(preferences) / 8
    sd = math.sqrt(sum((p - mean) ** 2 for p in preferences) / 7)
    assert evaluation.win_rate == pytest.approx(mean * 100)
    assert evaluation.standard_error == pytest.approx(sd / math.sqrt(8) * 100)
    assert evaluation.lc_win_rate is not None and evaluation.lc_standard_error is not None
    assert evaluation.metrics and evaluation.metrics["judgments"] == {"pending": 0, "done": 8, "failed": 0}


def test_an_interrupted_eval_resumes_without_judging_again(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    from workers.judge_tasks import run_judge

    job_id, reference_path, judges = judged_setup(database_url, tmp_path, 6)
    judge = resolve_judge(f"{judges}:synth-judge", get_settings())

    # The first run stored its evaluation and judged half the items, then stopped.
    start = start_evaluation(database_url, job_id, load_reference(str(reference_path), database_url), judge)
    assert (start.total, len(start.to_judge), start.already_judged) == (6, 6, 0)
    for judgment_id in start.to_judge[:3]:
        run_judge.run(judgment_id)
    _, before = evaluation_of(database_url, job_id)
    judged_before = {j.id: (j.preference, j.judged_at) for j, _, _ in before if j.status == "done"}
    assert len(judged_before) == 3

    result = slimmoa("eval", job_id, "--reference", str(reference_path), "--judge", f"{judges}:synth-judge")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 items to judge (3 judged before" in result.stdout
    evaluation, after = evaluation_of(database_url, job_id)
    assert evaluation.status == "succeeded"
    assert all(j.status == "done" for j, _, _ in after)
    assert {j.id: (j.preference, j.judged_at) for j, _, _ in after if j.id in judged_before} == judged_before
    with session_scope(database_url) as session:
        assert (
            session.scalar(select(func.count()).select_from(Evaluation).where(Evaluation.job_id == job_id))
            == 1
        )
    # Resuming again finds nothing left to judge, and keeps the order drawn first whatever seed is given.
    again = start_evaluation(
        database_url, job_id, load_reference(str(reference_path), database_url), judge, seed=99
    )
    assert (again.evaluation_id, again.seed, again.to_judge, again.already_judged) == (
        evaluation.id,
        0,
        [],
        6,
    )

    # A redelivered judge task returns the stored verdict without asking any judge: here the evaluation's
    # judge becomes an unreachable endpoint, and the task still answers.
    with session_scope(database_url) as session:
        evaluation_row = session.get(Evaluation, evaluation.id)
        assert evaluation_row is not None
        evaluation_row.judge_spec = {
            "name": "unreachable",
            **resolve_judge(f"{judges}:unreachable", get_settings()).spec.model_dump(mode="json"),
        }
    first_id = next(iter(judged_before))
    assert run_judge.run(first_id) == judged_before[first_id][0]
    with session_scope(database_url) as session:
        assert evaluations.judgment_counts(session, evaluation.id) == {"pending": 0, "done": 6, "failed": 0}


def test_failed_judgments_are_recorded_and_judged_again_on_resume(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    job_id, reference, judges = judged_setup(database_url, tmp_path, 3)

    # The session worker injects a fault into every request to `always-fails`.
    failing = slimmoa("eval", job_id, "--reference", str(reference), "--judge", f"{judges}:always-fails")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    evaluation, rows = evaluation_of(database_url, job_id)
    assert evaluation.status == "failed" and evaluation.win_rate is None
    for judgment, _, _ in rows:
        assert (judgment.status, judgment.preference, judgment.attempt) == ("failed", None, 3)
        assert "injected fault in always-fails (after 3 attempts)" in (judgment.error or "")

    # Another judge is another evaluation; the failed one keeps its record.
    working = slimmoa("eval", job_id, "--reference", str(reference), "--judge", f"{judges}:synth-judge")
    assert working.returncode == 0, working.stdout + working.stderr
    with session_scope(database_url) as session:
        statuses = session.scalars(
            select(Evaluation.status).where(Evaluation.job_id == job_id).order_by(Evaluation.id)
        ).all()
        assert statuses == ["failed", "succeeded"]
        # Resuming the failed evaluation sends its failed judgments again.
        judge = resolve_judge(f"{judges}:always-fails", get_settings())
        again = start_evaluation(database_url, job_id, load_reference(str(reference), database_url), judge)
        assert (len(again.to_judge), again.already_judged) == (3, 0)


def test_a_missing_reference_file_names_the_setting(tmp_path: Path) -> None:
    env_reference = tmp_path / "absent.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "eval", "0" * 32, "--judge", "synthetic"],
        env={**os.environ, "EVAL_REFERENCE": str(env_reference), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "set EVAL_REFERENCE" in result.stderr.replace("\n", "") and str(
        env_reference
    ) in result.stderr.replace("\n", "")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_compare_two_jobs_head_to_head_with_a_plot(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    records = sample_records(8)
    job_a = submit(database_url, recipe_from_yaml(JOB_RECIPE % 40), records)
    job_b = submit(database_url, recipe_from_yaml(JOB_RECIPE % 10), records)
    wait_for_job(database_url, job_a), wait_for_job(database_url, job_b)
    judges = tmp_path / "judges.yaml"
    judges.write_text(JUDGES)
    plot = tmp_path / "plots" / "a-vs-b.png"

    result = slimmoa("compare", job_a, job_b, "--judge", f"{judges}:synth-judge", "--plot", str(plot))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "A's win rate by dataset" in result.stdout and "helpful_base" in result.stdout
    width, height = png_size(plot)
    assert (width, height) == (1200, 450)
    evaluation, rows = evaluation_of(database_url, job_a)
    assert evaluation.reference == f"job:{job_b}" and evaluation.status == "succeeded" and len(rows) == 8
    assert set(evaluation.metrics["by_dataset"]) == {r.dataset for r in records}  # type: ignore[index]
