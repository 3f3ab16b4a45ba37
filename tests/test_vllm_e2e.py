"""One job end to end on the real vLLM CPU engine with the embedded SmolLM2 model."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from db import results
from db.session import session_scope
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
    records = sample_records(3)
    job_id = submit(database_url, recipe, records)
    job = wait_for_job(database_url, job_id, timeout=600)
    assert (job.status, job.items_succeeded) == ("succeeded", 3)

    with session_scope(database_url) as session:
        for item, output in results.job_outputs(session, job_id):
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
