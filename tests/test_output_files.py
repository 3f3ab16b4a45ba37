"""Output files the next tool reads: `slimmoa run -o FILE` and `slimmoa export -o FILE` choose the format
by suffix (or `--format`); AlpacaEval's own loader reads the `.json`, pyarrow the `.parquet`, and SlimMoA
the `.jsonl` as input again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from orchestrator.inputs import read_records
from tests.conftest import run_cli, wait_for_job
from tests.prompt_files import (
    ARENA,
    EXPECTED,
    FIELD_ARGS,
    MAPPING,
    job_rows,
    one_line,
    slimmoa,
    write,
)


def alpaca_eval_frame(path: Path) -> Any:
    """The file as `alpaca_eval evaluate --model_outputs FILE` loads it."""
    from alpaca_eval.utils import load_or_convert_to_dataframe

    return load_or_convert_to_dataframe(path)


def test_run_maps_csv_columns_and_writes_what_alpaca_eval_reads(tmp_path: Path) -> None:
    write(tmp_path / "questions.csv", ARENA, bom=True, crlf=True)
    result = run_cli(
        tmp_path, "questions.csv", *FIELD_ARGS, "-o", "outputs.json", "--recipe", "synthetic", "--show"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    frame = alpaca_eval_frame(tmp_path / "outputs.json")
    assert list(frame["instruction"]) == [r.instruction for r in EXPECTED]
    assert set(frame["generator"]) == {"slimmoa-synthetic"}
    assert all(output.startswith("synth-agg:") for output in frame["output"])
    listed = json.loads((tmp_path / "outputs.json").read_text(encoding="utf-8"))
    assert [(o["id"], o["dataset"]) for o in listed] == [(r.id, r.dataset) for r in EXPECTED]
    metadata = json.loads((tmp_path / "outputs.json.metadata.json").read_text())
    assert metadata["format"] == "alpaca_eval"
    assert len((tmp_path / "outputs.pools.jsonl").read_text().splitlines()) == len(ARENA)
    shown = one_line(result.stdout)
    assert all(one_line(o["output"])[:40] in shown for o in listed), "--show prints every answer"


def test_run_writes_parquet_by_suffix_and_refuses_a_contradicting_format(tmp_path: Path) -> None:
    write(tmp_path / "prompts.parquet", ARENA)
    refused = run_cli(
        tmp_path,
        "prompts.parquet",
        *FIELD_ARGS,
        "-o",
        "out.parquet",
        "--format",
        "jsonl",
        "--recipe",
        "synthetic",
    )
    assert refused.returncode == 2
    assert "--format: jsonl writes JSON Lines, but out.parquet is a .parquet file (Parquet)" in one_line(
        refused.stderr
    )
    unknown = run_cli(tmp_path, "prompts.parquet", *FIELD_ARGS, "-o", "out.txt", "--recipe", "synthetic")
    assert unknown.returncode == 2 and "--output: cannot tell the format of out.txt" in one_line(
        unknown.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.parquet"], "nothing stored or written"

    result = run_cli(tmp_path, "prompts.parquet", *FIELD_ARGS, "-o", "out.parquet", "--recipe", "synthetic")
    assert result.returncode == 0, result.stdout + result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == [r.id for r in EXPECTED]
    assert table.column("system").to_pylist() == [r.system for r in EXPECTED]
    assert json.loads(table.schema.metadata[b"slimmoa"])["format"] == "parquet"


@pytest.fixture(scope="module")
def arena_job(api_url: str, worker: subprocess.Popen[bytes], database_url: str) -> str:
    with httpx.Client(base_url=api_url, timeout=60) as api:
        response = api.post("/v1/jobs", json={"recipe": "api-synthetic", "items": ARENA, "fields": MAPPING})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    wait_for_job(database_url, job_id)
    return job_id


def test_export_chooses_the_format_by_suffix(tmp_path: Path, api_url: str, arena_job: str) -> None:
    for name in ("out.json", "out.jsonl", "out.parquet"):
        result = slimmoa("export", arena_job, "-o", str(tmp_path / name), "--api", api_url)
        assert result.exit_code == 0, result.output
    frame = alpaca_eval_frame(tmp_path / "out.json")
    assert list(frame["instruction"]) == [r.instruction for r in EXPECTED]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert list(frame["output"]) == [line["output"] for line in lines]
    assert pq.read_table(tmp_path / "out.parquet").column("output").to_pylist() == list(frame["output"])
    metadata = {
        name: json.loads((tmp_path / f"{name}.metadata.json").read_text())["format"]
        for name in ("out.json", "out.jsonl", "out.parquet")
    }
    assert metadata == {"out.json": "alpaca_eval", "out.jsonl": "jsonl", "out.parquet": "parquet"}


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        (
            "out.json",
            "jsonl",
            "--format: jsonl writes JSON Lines, but out.json is a .json file (a JSON list)",
        ),
        (
            "out.jsonl",
            "alpaca_eval",
            "--format: alpaca_eval writes a JSON list, but out.jsonl is a .jsonl file",
        ),
        (
            "out.jsonl",
            "parquet",
            "--format: parquet writes Parquet, but out.jsonl is a .jsonl file (JSON Lines)",
        ),
        ("out.txt", None, "--output: cannot tell the format of out.txt: use a suffix .json (alpaca_eval)"),
    ],
)
def test_export_refuses_a_suffix_that_contradicts_the_format(
    tmp_path: Path, arena_job: str, api_url: str, name: str, fmt: str | None, message: str
) -> None:
    result = slimmoa(
        "export", arena_job, "-o", str(tmp_path / name), *(["--format", fmt] if fmt else []), "--api", api_url
    )
    assert result.exit_code == 2 and message in one_line(result.stderr), result.output
    assert not list(tmp_path.iterdir()), "nothing written"


def test_a_jsonl_output_round_trips_as_input(
    tmp_path: Path, api_url: str, arena_job: str, database_url: str
) -> None:
    path = tmp_path / "outputs.jsonl"
    assert slimmoa("export", arena_job, "-o", str(path), "--api", api_url).exit_code == 0
    expected = [r.model_copy(update={"system": None}) for r in EXPECTED]  # answers carry no system prompt
    assert read_records(path) == expected
    submitted = slimmoa("submit", str(path), "--recipe", "api-synthetic", "--api", api_url)
    assert submitted.exit_code == 0, submitted.output
    again = job_rows(database_url, submitted.stdout.strip())
    assert [row[:5] for row in again] == [
        (i, r.id, r.instruction, r.dataset, None) for i, r in enumerate(expected)
    ]
