"""The weighted judge on the real vLLM CPU engine: the embedded SmolLM2 judges a small job's outputs
against AlpacaEval 2.0's reference outputs, reading its verdict from first-token logprobs."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import SAMPLE, recipe_from_yaml, sample_records, submit, wait_for_job
from tests.test_eval import JOB_RECIPE, evaluation_of, slimmoa

pytestmark = pytest.mark.vllm


def test_the_embedded_model_judges_with_logprobs(database_url: str, worker: subprocess.Popen[bytes]) -> None:
    job_id = submit(database_url, recipe_from_yaml(JOB_RECIPE % 24), sample_records(3))
    assert wait_for_job(database_url, job_id).status == "succeeded"

    result = slimmoa("eval", job_id, "--reference", str(SAMPLE), "--judge", "embedded")
    assert result.returncode == 0, result.stdout + result.stderr

    evaluation, rows = evaluation_of(database_url, job_id)
    assert (evaluation.status, evaluation.judge, evaluation.judge_spec["engine"]) == (
        "succeeded",
        "embedded:smollm2",
        "vllm",
    )
    assert [j.reference_index for j, _, _ in rows] == [0, 1, 2], "matched to the sample's rows by instruction"
    for judgment, _, _ in rows:
        assert judgment.status == "done" and 0.0 < (judgment.preference or 0.0) < 1.0
        tokens = {token.strip() for token in judgment.verdict_logprobs or {}}
        assert {"m", "M"} & tokens and len(judgment.verdict_logprobs or {}) >= 20
        assert (judgment.prompt_tokens or 0) > 300, "the judge saw the instruction and both outputs"
    assert evaluation.win_rate is not None and evaluation.standard_error is not None
