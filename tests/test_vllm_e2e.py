"""One job end to end on the real vLLM CPU engine with the embedded SmolLM2 model."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from db import results
from db.session import session_scope
from orchestrator.contracts import InputRecord
from orchestrator.recipes import parse_recipe
from orchestrator.settings import PROJECT_ROOT
from tests.conftest import sample_records, submit, wait_for_job

pytestmark = pytest.mark.vllm


def test_embedded_recipe_on_vllm(database_url: str, worker: subprocess.Popen[bytes]) -> None:
    data = yaml.safe_load((PROJECT_ROOT / "recipes" / "embedded.yaml").read_text())
    # Short generations keep the test quick; everything else is the shipped default recipe.
    for proposer in data["layers"][0]["proposers"]:
        proposer["sampling"]["max_tokens"] = 24
    data["aggregator"]["sampling"]["max_tokens"] = 32
    recipe = parse_recipe(data)
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
