"""`slimmoa submit / status / export / cancel / retry` against a live `slimmoa api` on a loopback port."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from orchestrator.cli import cli
from orchestrator.embedded import free_port
from tests.conftest import SAMPLE, api_server

SAMPLE_LINES = SAMPLE.read_text().splitlines()


def slimmoa(*args: str, **env: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200", "SLIMMOA_API_TOKEN": "", **env})


def prompts(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join((SAMPLE_LINES * 20)[:count]) + "\n")
    return path


def test_submit_watch_export(tmp_path: Path, api_url: str, worker: subprocess.Popen[bytes]) -> None:
    submitted = slimmoa("submit", str(prompts(tmp_path, 6)), "--recipe", "api-synthetic", "--api", api_url)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32 and f"job {job_id}: 6 items, recipe api-synthetic" in submitted.stderr

    watched = slimmoa("status", job_id, "--watch", "--interval", "0.2", SLIMMOA_API_URL=api_url)
    assert watched.exit_code == 0, watched.output
    assert f"job {job_id} (api-synthetic): succeeded" in watched.stdout
    assert "proposers L0" in watched.stdout and "aggregator" in watched.stdout

    for fmt, name in (("alpaca_eval", "out.json"), ("jsonl", "out.jsonl"), ("pools", "pools.jsonl")):
        exported = slimmoa("export", job_id, "-o", str(tmp_path / name), "--format", fmt, "--api", api_url)
        assert exported.exit_code == 0, exported.output
    alpaca = json.loads((tmp_path / "out.json").read_text())
    sample = [json.loads(line) for line in SAMPLE_LINES[:6]]
    assert [a["instruction"] for a in alpaca] == [s["instruction"] for s in sample]
    assert {a["generator"] for a in alpaca} == {"slimmoa-api-synthetic"}
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["output"] for line in lines] == [a["output"] for a in alpaca]
    pools = [json.loads(line) for line in (tmp_path / "pools.jsonl").read_text().splitlines()]
    assert [len(p["candidates"]) for p in pools] == [3] * 6
    assert not list(tmp_path.glob("*.partial"))

    shown = slimmoa("status", job_id, "--api", api_url)
    assert shown.exit_code == 0 and "succeeded" in shown.stdout and "tokens:" in shown.stdout
    retried = slimmoa("retry", job_id, "--stage", "all", "--api", api_url)
    assert retried.exit_code == 0 and f"job {job_id}: 0 items reopened" in retried.stdout
    refused = slimmoa("cancel", job_id, "--api", api_url)
    assert refused.exit_code == 1
    assert f"409 job {job_id} already ended succeeded" in refused.stderr


def test_cancel_a_running_job(tmp_path: Path, api_url: str, worker: subprocess.Popen[bytes]) -> None:
    submitted = slimmoa("submit", str(prompts(tmp_path, 300)), "--recipe", "api-synthetic", "--api", api_url)
    job_id = submitted.stdout.strip()
    cancelled = slimmoa("cancel", job_id, "--api", api_url)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"job {job_id}: cancelled" in cancelled.stdout
    watched = slimmoa("status", job_id, "--watch", "--api", api_url)
    assert watched.exit_code == 1 and "cancelled" in watched.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "{prompts}", "--recipe", "nope"], "422 recipe: unknown recipe 'nope'"),
        (["status", "0" * 32], f"404 job '{'0' * 32}' not found"),
        (["export", "0" * 32, "-o", "{out}"], f"404 job '{'0' * 32}' not found"),
        (["retry", "0" * 32, "--items", "1,x"], "--items: comma-separated item ids, got '1,x'"),
    ],
)
def test_errors_exit_nonzero_with_the_api_message(
    tmp_path: Path, api_url: str, args: list[str], message: str
) -> None:
    values = {"prompts": str(prompts(tmp_path, 1)), "out": str(tmp_path / "out.jsonl")}
    result = slimmoa(*[a.format(**values) for a in args], "--api", api_url)
    assert result.exit_code in (1, 2) and message in result.stderr, result.output
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("*.partial"))


def test_an_unreachable_api(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = slimmoa("status", "0" * 32, "--api", url)
    assert result.exit_code == 1 and f"cannot reach the API at {url}" in result.stderr


@pytest.fixture(scope="module")
def secured_url(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("api-token") / "api.log"
    with api_server(services, log, SLIMMOA_API_TOKEN="cli-test-token") as url:
        yield url


def test_the_token_comes_from_the_flag_or_the_environment(tmp_path: Path, secured_url: str) -> None:
    job = "0" * 32
    without = slimmoa("status", job, "--api", secured_url)
    assert without.exit_code == 1 and "401 a valid bearer token is required" in without.stderr
    flagged = slimmoa("status", job, "--api", secured_url, "--token", "cli-test-token")
    assert flagged.exit_code == 1 and "404 job" in flagged.stderr, "authorised: the job is looked up"
    from_env = slimmoa("status", job, SLIMMOA_API_URL=secured_url, SLIMMOA_API_TOKEN="cli-test-token")
    assert "404 job" in from_env.stderr
