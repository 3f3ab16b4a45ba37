"""Every export format, downloaded with `slimmoa export` from the live API, read back and checked against
the record: a two-layer synthetic job run by the session worker."""

from __future__ import annotations

import io
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import update
from typer.testing import CliRunner, Result

from db import results
from db.models import Candidate, Item, Job, Output
from db.session import session_scope
from orchestrator import exports
from orchestrator.cli import cli
from orchestrator.exports import ExportFormat, open_export
from tests.conftest import recipe_from_yaml, sample_records, submit, wait_for_job

# Two layers, so "the final layer's pool" is not the only pool; the final layer samples exp-a twice and
# has a slot that always fails (the session worker injects the fault). `remote` is never used: it is
# there for a model id in the metadata.
RECIPE = """
name: exports
models:
  exp-a: {engine: synthetic, output_tokens: 8}
  exp-b: {engine: synthetic, output_tokens: 40}
  exp-agg: {engine: synthetic, output_tokens: 20}
  always-fails: {engine: synthetic}
  remote: {engine: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-4-1106-preview}
layers:
  - proposers: [{model: exp-a, sampling: {seed: 1}}, {model: exp-b, sampling: {seed: 2}}]
  - proposers:
      - {model: exp-a, samples: 2, sampling: {seed: 3}}
      - {model: exp-b, sampling: {seed: 5}}
      - {model: always-fails}
aggregator: {model: exp-agg, sampling: {seed: 0}}
"""
FINAL_LAYER = 1
SYSTEM = "Answer in one paragraph."
ITEMS = 6
# p1: every final-layer candidate says what the output says (one with white space around it), so a
# preference pair has nothing to reject. p2: only exp-b's does, so `model:exp-b` has nothing to reject.
NOTHING_TO_REJECT = "p1"
NOTHING_FROM_EXP_B = "p2"
METADATA_MODELS = [
    {"name": "exp-a", "engine": "synthetic", "model_id": None},
    {"name": "exp-b", "engine": "synthetic", "model_id": None},
    {"name": "exp-agg", "engine": "synthetic", "model_id": None},
    {"name": "always-fails", "engine": "synthetic", "model_id": None},
    {"name": "remote", "engine": "openai", "model_id": "gpt-4-1106-preview"},
]


def slimmoa(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200", "SLIMMOA_API_TOKEN": ""})


@pytest.fixture(scope="module")
def job_id(database_url: str, worker: subprocess.Popen[bytes]) -> str:
    records = [
        r.model_copy(update={"system": SYSTEM}) if i % 3 == 0 else r
        for i, r in enumerate(sample_records(ITEMS))
    ]
    job_id = submit(database_url, recipe_from_yaml(RECIPE), records)
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_degraded) == ("succeeded", ITEMS), "the failing slot degrades every item"
    with session_scope(database_url) as session:
        for item, output in results.job_outputs(session, job_id):
            assert output is not None
            final = update(Candidate).where(
                Candidate.item_id == item.id, Candidate.layer == FINAL_LAYER, Candidate.error.is_(None)
            )
            if item.external_id == NOTHING_TO_REJECT:
                session.execute(final.values(text=output.text))
                session.execute(final.where(Candidate.slot == 0).values(text=f"\n{output.text}  "))
            elif item.external_id == NOTHING_FROM_EXP_B:
                session.execute(final.where(Candidate.model == "exp-b").values(text=output.text))
    return job_id


def stored(database_url: str, job_id: str) -> list[tuple[Item, list[Candidate], Output]]:
    """The job's items in input order with their candidates and outputs, as the record has them."""
    with session_scope(database_url) as session:
        rows = [
            (item, list(item.candidates), output) for item, output in results.job_outputs(session, job_id)
        ]
    assert len(rows) == ITEMS and all(output is not None for _, _, output in rows)
    return [(item, candidates, output) for item, candidates, output in rows if output is not None]


def download(tmp_path: Path, api_url: str, job_id: str, fmt: str, *extra: str) -> Path:
    path = tmp_path / f"{job_id}.{fmt}"
    result = slimmoa("export", job_id, "-o", str(path), "--format", fmt, *extra, "--api", api_url)
    assert result.exit_code == 0, result.output
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_metadata(metadata: dict[str, Any], job_id: str, fmt: str, rejected: str | None = None) -> None:
    assert metadata == {
        "job_id": job_id,
        "job_name": "test",
        "recipe": "exports",
        "generator": "slimmoa-exports",
        "format": fmt,
        "models": METADATA_MODELS,
        "aggregator": "exp-agg",
        "rejected": rejected,
    }


def test_sft_is_one_example_per_output(tmp_path: Path, api_url: str, database_url: str, job_id: str) -> None:
    path = download(tmp_path, api_url, job_id, "sft")
    expected = [
        {"id": item.external_id, "instruction": item.instruction}
        | ({"system": SYSTEM} if position % 3 == 0 else {})
        | {"output": output.text}
        for position, (item, _, output) in enumerate(stored(database_url, job_id))
    ]
    assert read_lines(path) == expected
    assert sum("system" in line for line in expected) == 2
    check_metadata(json.loads(exports.metadata_path(path).read_text()), job_id, "sft")


def _eligible(candidates: list[Candidate], output: Output) -> list[Candidate]:
    """What may be rejected: final-layer candidates that succeeded and differ from the output."""
    return [
        c
        for c in candidates
        if c.layer == FINAL_LAYER and c.error is None and (c.text or "").strip() != output.text.strip()
    ]


@pytest.mark.parametrize("rule", ["shortest", "longest", "random", "model:exp-b"])
def test_preference_pairs_reject_a_final_layer_candidate_by_the_rule(
    tmp_path: Path, api_url: str, database_url: str, job_id: str, rule: str
) -> None:
    path = download(tmp_path, api_url, job_id, "preference", "--rejected", rule)
    pairs = {pair["id"]: pair for pair in read_lines(path)}
    rows = stored(database_url, job_id)
    skipped = {NOTHING_TO_REJECT} | ({NOTHING_FROM_EXP_B} if rule == "model:exp-b" else set())
    assert list(pairs) == [item.external_id for item, _, _ in rows if item.external_id not in skipped]
    for item, candidates, output in rows:
        if item.external_id in skipped:
            continue
        pair = pairs[item.external_id]
        assert (pair["instruction"], pair["chosen"]) == (item.instruction, output.text)
        assert pair.get("system") == item.system
        eligible = _eligible(candidates, output)
        assert len(eligible) >= 1 and all(c.model != "always-fails" for c in eligible)
        [rejected] = [c for c in eligible if c.slot == pair["rejected_slot"]]
        assert (pair["rejected"], pair["rejected_model"]) == (rejected.text, rejected.model)
        lengths = [len(c.text or "") for c in eligible]
        if rule == "shortest":
            assert len(pair["rejected"]) == min(lengths)
        elif rule == "longest":
            assert len(pair["rejected"]) == max(lengths)
        elif rule == "random":
            assert rejected is random.Random(item.id).choice(sorted(eligible, key=lambda c: c.slot))
        else:
            assert (rejected.model, rejected.slot) == ("exp-b", 2)
    models = {p["rejected_model"] for p in pairs.values()}
    assert models == {"shortest": {"exp-a"}, "longest": {"exp-a", "exp-b"}}.get(rule, models), "8 vs 40 words"
    check_metadata(json.loads(exports.metadata_path(path).read_text()), job_id, "preference", rule)
    (tmp_path / "again").mkdir()
    again = download(tmp_path / "again", api_url, job_id, "preference", "--rejected", rule)
    assert again.read_bytes() == path.read_bytes(), "the same rule rejects the same candidates"


def test_parquet_round_trips_with_the_metadata_in_the_file(
    tmp_path: Path, api_url: str, database_url: str, job_id: str
) -> None:
    path = download(tmp_path, api_url, job_id, "parquet")
    assert path.read_bytes()[:4] == b"PAR1", "the file is written unchanged"
    table = pq.read_table(path)
    expected: list[dict[str, Any]] = [
        {
            "id": item.external_id,
            "instruction": item.instruction,
            "system": item.system,
            "messages": item.messages,
            "dataset": item.dataset,
            "output": output.text,
            "status": "degraded",
            "candidates": [
                {
                    "turn": 0,
                    "layer": c.layer,
                    "slot": c.slot,
                    "model": c.model,
                    "text": c.text,
                    "error": c.error,
                }
                for c in candidates
            ],
        }
        for item, candidates, output in stored(database_url, job_id)
    ]
    assert table.to_pylist() == expected
    assert [len(row["candidates"]) for row in expected] == [2 + 4] * ITEMS
    in_file = json.loads(table.schema.metadata[b"slimmoa"])
    check_metadata(in_file, job_id, "parquet")
    assert json.loads(exports.metadata_path(path).read_text()) == in_file


def test_parquet_streams_a_row_group_per_page(
    database_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exports, "PAGE_SIZE", 4)
    with session_scope(database_url) as session:
        export = open_export(session, session.get_one(Job, job_id), ExportFormat.PARQUET)
        first = next(export.chunks)
        assert first[:4] == b"PAR1", "the first row group leaves before the rest is read"
        body = first + b"".join(export.chunks)
    parquet = pq.ParquetFile(io.BytesIO(body))
    assert parquet.num_row_groups == 2
    assert parquet.read().column("id").to_pylist() == [f"p{i}" for i in range(ITEMS)]


@pytest.mark.parametrize(
    ("fmt", "media_type", "suffix"),
    [
        ("alpaca_eval", "application/json", "json"),
        ("jsonl", "application/x-ndjson", "jsonl"),
        ("pools", "application/x-ndjson", "jsonl"),
        ("sft", "application/x-ndjson", "jsonl"),
        ("preference", "application/x-ndjson", "jsonl"),
        ("parquet", "application/vnd.apache.parquet", "parquet"),
    ],
)
def test_every_format_sends_its_metadata_record(
    api: httpx.Client, job_id: str, fmt: str, media_type: str, suffix: str
) -> None:
    response = api.get(f"/v1/jobs/{job_id}/results", params={"format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}.{suffix}"'
    rejected = "shortest" if fmt == "preference" else None
    check_metadata(json.loads(response.headers["slimmoa-metadata"]), job_id, fmt, rejected)


def test_alpaca_eval_stays_a_plain_list_and_jsonl_has_no_metadata_line(
    tmp_path: Path, api_url: str, database_url: str, job_id: str
) -> None:
    alpaca = json.loads(download(tmp_path, api_url, job_id, "alpaca_eval").read_text())
    expected: list[dict[str, Any]] = [
        {
            "id": item.external_id,
            "instruction": item.instruction,
            "output": output.text,
            "generator": "slimmoa-exports",
            "dataset": item.dataset,
        }
        for item, _, output in stored(database_url, job_id)
    ]
    assert alpaca == expected
    assert read_lines(download(tmp_path, api_url, job_id, "jsonl")) == expected
    pools = read_lines(download(tmp_path, api_url, job_id, "pools"))
    assert [(p["id"], p["output"], len(p["candidates"])) for p in pools] == [
        (e["id"], e["output"], 6) for e in expected
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--format", "preference", "--rejected", "worst"],
            2,
            "expected shortest, longest, random or model:NAME, got 'worst'",
        ),
        (["--format", "csv"], 2, "'csv' is not one of"),
        (
            ["--format", "preference", "--rejected", "model:ghost"],
            1,
            "422 rejected: model 'ghost' is not a proposer of the final layer "
            "(proposers: always-fails, exp-a, exp-b)",
        ),
    ],
)
def test_a_bad_format_or_rule_is_a_clear_error(
    tmp_path: Path, api_url: str, job_id: str, args: list[str], code: int, message: str
) -> None:
    out = tmp_path / "out.jsonl"
    result = slimmoa("export", job_id, "-o", str(out), *args, "--api", api_url)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_export_into_a_missing_folder_is_a_clear_error(tmp_path: Path, api_url: str, job_id: str) -> None:
    out = tmp_path / "missing" / "out.jsonl"
    result = slimmoa("export", job_id, "-o", str(out), "--api", api_url)
    assert result.exit_code == 2, result.output
    assert f"--output: no folder {out.parent}" in " ".join(result.stderr.replace("│", " ").split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        (
            {"format": "preference", "rejected": "model:"},
            "rejected: expected shortest, longest, random or model:NAME, got 'model:'",
        ),
        ({"format": "xml"}, "query.format: Input should be 'alpaca_eval', 'jsonl', 'pools', 'sft', "),
    ],
)
def test_the_api_refuses_a_bad_format_or_rule_with_422(
    api: httpx.Client, job_id: str, params: dict[str, str], detail: str
) -> None:
    response = api.get(f"/v1/jobs/{job_id}/results", params=params)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(detail), response.json()
