"""One job end to end on the real vLLM CPU engine with the embedded SmolLM2 model."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from db import results
from db.session import session_scope
from orchestrator.contracts import InputRecord
from orchestrator.recipes import Recipe, parse_recipe
from orchestrator.settings import PROJECT_ROOT
from tests.conftest import sample_records, submit, wait_for_job

pytestmark = pytest.mark.vllm


def embedded_recipe(**aggregator: Any) -> Recipe:
    """The shipped default recipe with short generations (quick tests), its aggregator updated."""
    data = yaml.safe_load((PROJECT_ROOT / "recipes" / "embedded.yaml").read_text())
    for proposer in data["layers"][0]["proposers"]:
        proposer["sampling"]["max_tokens"] = 24
    data["aggregator"]["sampling"]["max_tokens"] = 32
    data["aggregator"].update(aggregator)
    return parse_recipe(data)


def test_embedded_recipe_on_vllm(database_url: str, worker: subprocess.Popen[bytes]) -> None:
    recipe = embedded_recipe()
    # Three one-turn prompts and one two-turn question (MT-Bench's shape).
    turns = ["Name one primary color.", "Now name a second one, different from your first answer."]
    records = [*sample_records(3), InputRecord(id="mt", instruction=turns[-1], turns=turns)]
    job_id = submit(database_url, recipe, records)
    job = wait_for_job(database_url, job_id, timeout=600)
    assert (job.status, job.items_succeeded) == ("succeeded", 4)

    with session_scope(database_url) as session:
        rows = list(results.job_outputs(session, job_id))
        item, output = rows.pop()
        first, second = item.outputs
        assert (first.turn, second.turn, output) == (0, 1, second) and first.text.strip()
        by_turn = [[c for c in item.candidates if c.turn == turn] for turn in (0, 1)]
        assert [len(pool) for pool in by_turn] == [3, 3] and all(c.ok for c in item.candidates)
        # The second turn's prompt holds the first turn and its aggregated answer before the question.
        for earlier, later in zip(*by_turn, strict=True):
            assert (later.prompt_tokens or 0) > (earlier.prompt_tokens or 0) + (first.output_tokens or 0)
        for item, output in rows:
            candidates = item.candidates
            assert [(c.layer, c.slot, c.model) for c in candidates] == [(0, s, "smollm2") for s in range(3)]
            texts = [c.text or "" for c in candidates]
            assert all(t.strip() for t in texts), texts
            assert len(set(texts)) > 1, f"seeds and temperatures differ, so must the candidates: {texts}"
            assert all(0 < (c.output_tokens or 0) <= 24 for c in candidates)
            assert all(c.prompt_tokens and c.finish_reason in {"stop", "length"} for c in candidates)
            assert output is not None and output.text.strip()
            assert 0 < (output.output_tokens or 0) <= 32
            # The aggregator prompt holds the instruction and three numbered candidates.
            assert (output.prompt_tokens or 0) > sum(c.output_tokens or 0 for c in candidates)


def test_one_sequential_item_on_vllm(database_url: str, worker: subprocess.Popen[bytes]) -> None:
    # Three candidates, two a step: the first step reads candidates 1 and 2, the second its synthesis
    # and candidate 3.
    recipe = embedded_recipe(mode="sequential", window=2)
    job_id = submit(database_url, recipe, sample_records(1))
    job = wait_for_job(database_url, job_id, timeout=600)
    assert (job.status, job.items_succeeded) == ("succeeded", 1)

    with session_scope(database_url) as session:
        ((item, output),) = list(results.job_outputs(session, job_id, with_pools=True))
        pool = [c for c in item.candidates if c.layer == 0]
        (step,) = [c for c in item.candidates if c.layer == 1]
        assert len(pool) == 3 and all(c.ok and (c.output_tokens or 0) > 0 for c in pool)
        assert (step.slot, step.model, step.finish_reason in {"stop", "length"}) == (0, "smollm2", True)
        assert (step.text or "").strip() and 0 < (step.output_tokens or 0) <= 32 and step.latency_ms
        assert output is not None and output.text.strip() and 0 < (output.output_tokens or 0) <= 32
        assert output.pool_size == 3 and item.truncation is None
        # Each step's prompt holds what it read, whole.
        assert (step.prompt_tokens or 0) > sum(c.output_tokens or 0 for c in pool[:2])
        assert (output.prompt_tokens or 0) > (step.output_tokens or 0) + (pool[2].output_tokens or 0)
