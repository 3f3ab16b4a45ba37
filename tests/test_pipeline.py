"""The canvas, the broker, the worker and the database together, on the synthetic engine.

Synthetic outputs start with `MODEL:DIGEST`, the digest of the exact messages the engine received, so
the tests can check that every stage saw the prompt the builder makes from the pool in the database.
"""

from __future__ import annotations

import subprocess
import uuid

from sqlalchemy import func, select

from db import progress, results
from db.models import Candidate, Item, Output
from db.session import session_scope
from orchestrator.canvas import dispatch
from orchestrator.prompts import build_stage_prompt
from orchestrator.recipes import Recipe
from tests.conftest import recipe_from_yaml, sample_records, submit, wait_for_job
from workers.engines import ChatRequest
from workers.engines.synthetic import WordTokenizer, prompt_digest

SYNTHETIC = """
name: synthetic-test
models:
  synth-a: {engine: synthetic, output_tokens: 12}
  synth-b: {engine: synthetic, output_tokens: 16}
  synth-c: {engine: synthetic, output_tokens: 20}
  synth-agg: {engine: synthetic, output_tokens: 24}
layers:
  - proposers:
      - {model: synth-a, sampling: {seed: 1}}
      - {model: synth-b, sampling: {seed: 2}}
      - {model: synth-c, sampling: {seed: 3}}
aggregator: {model: synth-agg, sampling: {seed: 0, temperature: 0.5}}
min_pool: 2
"""


def expected_digest(
    recipe: Recipe, model: str, sampling_seed: int | None, instruction: str, refs: list[str]
) -> str:
    """The digest the synthetic engine reports when given the builder's prompt for this stage."""
    sampling = (
        next(
            s.sampling for layer in range(len(recipe.layers)) for s in recipe.slots(layer) if s.model == model
        )
        if model != recipe.aggregator.model
        else recipe.aggregator.sampling
    )
    assert sampling.seed == sampling_seed
    prompt = build_stage_prompt(
        instruction,
        references=refs,
        context_length=recipe.model(model).context_length,
        max_tokens=sampling.max_tokens,
        tokenizer=WordTokenizer(),
    )
    return prompt_digest(ChatRequest.build("x", prompt.messages, sampling))


def job_rows(database_url: str, job_id: str) -> list[tuple[Item, list[Candidate], Output | None]]:
    with session_scope(database_url) as session:
        rows = []
        for item, output in results.job_outputs(session, job_id):
            rows.append((item, list(item.candidates), output))
        return rows


def test_twenty_items_every_pool_and_output_row(database_url: str, worker: subprocess.Popen[bytes]) -> None:
    recipe = recipe_from_yaml(SYNTHETIC)
    records = sample_records(20)
    job_id = submit(database_url, recipe, records)
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_succeeded, job.items_degraded, job.items_failed) == ("succeeded", 20, 0, 0)
    assert job.started_at is not None and job.finished_at is not None

    rows = job_rows(database_url, job_id)
    assert [item.external_id for item, _, _ in rows] == [r.id for r in records]
    for (item, candidates, output), record in zip(rows, records, strict=True):
        assert item.status == "succeeded" and item.error is None
        assert [(c.layer, c.slot, c.model) for c in candidates] == [
            (0, 0, "synth-a"),
            (0, 1, "synth-b"),
            (0, 2, "synth-c"),
        ]
        for candidate in candidates:
            assert candidate.ok and candidate.attempt == 1
            seed = recipe.slots(0)[candidate.slot].sampling.seed
            digest = expected_digest(recipe, candidate.model, seed, record.instruction, [])
            assert candidate.text is not None and candidate.text.startswith(f"{candidate.model}:{digest} ")
            assert candidate.output_tokens == recipe.model(candidate.model).output_tokens  # type: ignore[union-attr]
        assert output is not None and output.pool_size == 3 and output.model == "synth-agg"
        # The aggregator's prompt is the builder's prompt over the pool as stored, in slot order.
        pool = [c.text or "" for c in candidates]
        digest = expected_digest(recipe, "synth-agg", 0, record.instruction, pool)
        assert output.text.startswith(f"synth-agg:{digest} ")


def test_the_same_job_dispatched_twice_is_not_duplicated(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(SYNTHETIC)
    job_id = submit(database_url, recipe, sample_records(6))
    wait_for_job(database_url, job_id)
    before = {
        (c.item_id, c.layer, c.slot): (c.id, c.text)
        for _, cs, _ in job_rows(database_url, job_id)
        for c in cs
    }
    outputs_before = {o.item_id: (o.id, o.text) for _, _, o in job_rows(database_url, job_id) if o}

    # A redelivered dispatch of a finished job sends nothing: its items are no longer pending.
    assert dispatch.run(job_id) == 0
    # Stage tasks redelivered after they finished return the stored rows without generating.
    from workers.tasks import run_aggregator, run_proposer

    for (item_id, layer, slot), (candidate_id, _) in before.items():
        assert run_proposer.run(item_id, layer, slot) in (candidate_id, None)
    for item_id in outputs_before:
        assert run_aggregator.run(item_id) == "succeeded"

    rows = job_rows(database_url, job_id)
    after = {(c.item_id, c.layer, c.slot): (c.id, c.text) for _, cs, _ in rows for c in cs}
    assert after == before
    assert {o.item_id: (o.id, o.text) for _, _, o in rows if o} == outputs_before
    with session_scope(database_url) as session:
        assert progress.count_rows(session, job_id) == {"items": 6, "candidates": 18, "outputs": 6}


def test_the_same_input_submitted_twice_makes_two_separate_jobs(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(SYNTHETIC)
    records = sample_records(3)
    first, second = submit(database_url, recipe, records), submit(database_url, recipe, records)
    assert first != second
    wait_for_job(database_url, first), wait_for_job(database_url, second)
    texts = [[o.text for _, _, o in job_rows(database_url, j) if o] for j in (first, second)]
    assert texts[0] == texts[1], "same prompts, same seeds: the synthetic engine is deterministic"
    with session_scope(database_url) as session:
        for job_id in (first, second):
            assert progress.count_rows(session, job_id) == {"items": 3, "candidates": 9, "outputs": 3}


def test_a_proposer_that_always_fails_gives_degraded_items(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(
        SYNTHETIC.replace("synth-c: {engine: synthetic", "always-fails: {engine: synthetic").replace(
            "model: synth-c", "model: always-fails"
        )
    )
    job_id = submit(database_url, recipe, sample_records(4))
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_degraded, job.items_failed) == ("succeeded", 4, 0)
    for item, candidates, output in job_rows(database_url, job_id):
        assert item.status == "degraded"
        failed = [c for c in candidates if not c.ok]
        assert [(c.slot, c.model, c.text) for c in failed] == [(2, "always-fails", None)]
        assert "injected fault in always-fails" in (failed[0].error or "")
        assert failed[0].attempt == 3, "the first try and STAGE_MAX_RETRIES=2 retries"
        assert item.error and "pool has 2 of 3 candidates" in item.error and "slot 2" in item.error
        assert output is not None and output.pool_size == 2


def test_too_few_candidates_fail_the_item_by_the_min_pool_rule(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(
        SYNTHETIC.replace("synth-b: {engine: synthetic", "always-fails: {engine: synthetic")
        .replace("model: synth-b", "model: always-fails")
        .replace("synth-c: {engine: synthetic", "broken-agg: {engine: synthetic")
        .replace("model: synth-c", "model: broken-agg")
    )
    job_id = submit(database_url, recipe, sample_records(2))
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_failed) == ("failed", 2)
    for item, candidates, output in job_rows(database_url, job_id):
        assert item.status == "failed" and output is None
        assert item.error is not None
        assert item.error.startswith("pool has 1 of 3 candidates, fewer than min_pool=2")
        assert "always-fails" in item.error and "broken-agg" in item.error
        assert sum(c.ok for c in candidates) == 1


def test_an_aggregator_failure_fails_the_item_with_its_error(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(
        SYNTHETIC.replace("synth-agg: {engine: synthetic", "broken-agg: {engine: synthetic").replace(
            "model: synth-agg", "model: broken-agg"
        )
    )
    job_id = submit(database_url, recipe, sample_records(3))
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_failed) == ("failed", 3)
    for item, candidates, output in job_rows(database_url, job_id):
        assert output is None and item.status == "failed"
        assert item.error == "aggregator broken-agg: injected fault in broken-agg (after 3 attempts)"
        assert len(candidates) == 3 and all(c.ok for c in candidates), "the pool is kept for a retry"


def test_two_layers_feed_the_first_pool_to_the_second(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    recipe = recipe_from_yaml(
        SYNTHETIC.replace(
            "aggregator:",
            "  - proposers:\n      - {model: synth-a, sampling: {seed: 1}}\n"
            "      - {model: synth-b, sampling: {seed: 2}}\naggregator:",
        )
    )
    records = sample_records(3)
    job_id = submit(database_url, recipe, records)
    job = wait_for_job(database_url, job_id)
    assert job.status == "succeeded"
    for (_item, candidates, output), record in zip(job_rows(database_url, job_id), records, strict=True):
        layer0 = [c for c in candidates if c.layer == 0]
        layer1 = [c for c in candidates if c.layer == 1]
        assert [c.slot for c in layer0] == [0, 1, 2] and [c.slot for c in layer1] == [0, 1]
        pool0 = [c.text or "" for c in layer0]
        for candidate in layer1:
            digest = expected_digest(recipe, candidate.model, candidate.slot + 1, record.instruction, pool0)
            assert (candidate.text or "").startswith(f"{candidate.model}:{digest} ")
        assert output is not None and output.pool_size == 2
        digest = expected_digest(recipe, "synth-agg", 0, record.instruction, [c.text or "" for c in layer1])
        assert output.text.startswith(f"synth-agg:{digest} ")
    with session_scope(database_url) as session:
        count = session.scalar(
            select(func.count()).select_from(Candidate).join(Item).where(Item.job_id == job_id)
        )
        assert count == 3 * 5


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A worker's /metrics, as {sample name: [(labels, value)]}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_concurrent_stages_reach_the_engine_together(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    from tests.conftest import WORKER_ENV

    # Model names of this test only, so the worker's metrics for them count this test's requests.
    probe, agg = f"probe-{uuid.uuid4().hex[:6]}", f"probe-agg-{uuid.uuid4().hex[:6]}"
    recipe = recipe_from_yaml(
        f"""
name: batch-probe
models:
  {probe}: {{engine: synthetic, latency_ms: 100}}
  {agg}: {{engine: synthetic}}
layers: [{{proposers: [{{model: {probe}, samples: 3, sampling: {{seed: 1}}}}]}}]
aggregator: {{model: {agg}}}
"""
    )
    for _ in range(2):  # two jobs: the engine outlives a job
        job_id = submit(database_url, recipe, sample_records(20))
        assert wait_for_job(database_url, job_id).status == "succeeded"
    samples = scrape(int(WORKER_ENV["WORKER_METRICS_PORT"]))
    buckets = {
        labels["le"]: value
        for labels, value in samples["slimmoa_engine_offered_batch_bucket"]
        if labels["model"] == probe
    }
    assert buckets["+Inf"] == 2 * 20 * 3, "every proposer request was counted"
    assert buckets["1.0"] < buckets["+Inf"], "requests met others in flight: batches larger than 1"
    loads = {labels["model"]: value for labels, value in samples["slimmoa_engine_loads_total"]}
    assert loads[probe] == 1 and loads[agg] == 1, "one engine per model for the life of the worker"
    stages = {
        (labels["stage"], labels["outcome"]): value for labels, value in samples["slimmoa_stages_total"]
    }
    assert stages[("aggregator", "succeeded")] >= 40
