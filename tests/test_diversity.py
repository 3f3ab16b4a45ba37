"""Pool diversity: 0 for identical candidates, more than 0 for different ones, per item, job and pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.diversity import embed, job_diversity, pool_distance
from tests.conftest import recipe_from_yaml, sample_records, submit, wait_for_job

POOL_RECIPE = """
name: pool
models:
  div-a: {engine: synthetic, output_tokens: 20}
  div-b: {engine: synthetic, output_tokens: 20}
layers:
  - proposers:
      - {model: div-a, sampling: {seed: 1}}
      - {model: div-a, sampling: {seed: %d}}
      - {model: %s, sampling: {seed: 1}}
aggregator: {model: div-a, sampling: {seed: 0}}
"""


def test_pool_distance_on_vectors() -> None:
    same = np.array([[1.0, 2.0, 3.0]] * 3, dtype=np.float32)
    assert pool_distance(same) == pytest.approx(0.0, abs=1e-12)
    orthogonal = np.eye(3, dtype=np.float32)
    assert pool_distance(orthogonal) == pytest.approx(1.0)
    assert pool_distance(np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)) == pytest.approx(2.0)
    assert pool_distance(same[:1]) is None


def test_embeddings_of_equal_texts_are_equal_and_of_different_texts_are_not() -> None:
    vectors = embed(["The sky is blue.", "The sky is blue.", "Quarterly revenue rose by four percent."])
    assert vectors.shape == (3, 384)
    assert pool_distance(vectors[:2]) == pytest.approx(0.0, abs=1e-12)
    assert pool_distance(vectors[1:]) > 0.3


def test_identical_candidates_have_no_diversity_and_different_ones_do(
    database_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    # Same synthetic model, same seed: three identical candidates per item.
    identical = submit(database_url, recipe_from_yaml(POOL_RECIPE % (1, "div-a")), sample_records(3))
    # Another seed and another model: three different candidates per item.
    different = submit(database_url, recipe_from_yaml(POOL_RECIPE % (2, "div-b")), sample_records(3))
    wait_for_job(database_url, identical), wait_for_job(database_url, different)

    same = job_diversity(database_url, identical)
    assert [i.candidates for i in same.items] == [3, 3, 3]
    assert all(i.distance == pytest.approx(0.0, abs=1e-12) for i in same.items)
    assert same.mean == pytest.approx(0.0, abs=1e-12)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "diversity",
            different,
            "--output",
            str(tmp_path / "d.jsonl"),
        ],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0: div-a" in result.stdout and "2: div-b" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["distance"] > 0 for row in rows)
    other = job_diversity(database_url, different)
    assert [(p.slot_a, p.model_a, p.slot_b, p.model_b) for p in other.pairs] == [
        (0, "div-a", 1, "div-a"),
        (0, "div-a", 2, "div-b"),
        (1, "div-a", 2, "div-b"),
    ]
    assert all(p.items == 3 and p.distance > 0 for p in other.pairs)
    assert other.mean is not None and other.mean > 0
    assert f"mean pool diversity {other.mean:.4f}" in result.stdout
