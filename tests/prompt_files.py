"""Prompt files for the input and output tests: one list of records, written in every input format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner, Result

from db import results
from db.session import session_scope
from orchestrator.cli import cli
from orchestrator.contracts import InputRecord
from tests.conftest import wait_for_job

# Arena-Hard's question.jsonl names the text `prompt` and the id `uid`; the texts carry what breaks
# naive readers: a line break and quotes inside a CSV cell, commas, non-ASCII, an id that looks numeric.
ARENA: list[dict[str, Any]] = [
    {"uid": "a1f3", "category": "hard_prompt", "prompt": "Name three primes.", "system": "Answer briefly."},
    {"uid": "b2e4", "category": "hard_prompt", "prompt": 'Line one,\nline "two".', "system": None},
    {"uid": "c3d5", "category": "creative", "prompt": "Écris un haïku sur le café ☕", "system": None},
    {"uid": "17", "category": "coding", "prompt": "Reverse a list in Python.", "system": "Be terse."},
]
MAPPING = {"instruction": "prompt", "id": "uid", "dataset": "category"}
FIELD_ARGS = [arg for target, column in MAPPING.items() for arg in ("--field", f"{target}={column}")]
EXPECTED = [
    InputRecord(instruction=r["prompt"], id=r["uid"], dataset=r["category"], system=r["system"])
    for r in ARENA
]
FORMATS = ["prompts.jsonl", "prompts.json", "prompts.parquet", "prompts.csv"]


def encode(suffix: str, records: list[dict[str, Any]], *, bom: bool = False, crlf: bool = False) -> bytes:
    """`records` in the format a suffix names, saved as editors and spreadsheet tools may save them:
    with a UTF-8 byte-order mark and CRLF line ends (JSONL also gets blank lines between records)."""
    if suffix == ".parquet":
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), sink)
        return sink.getvalue()
    eol = "\r\n" if crlf else "\n"
    if suffix == ".csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator=eol)
        writer.writeheader()
        writer.writerows(records)
        body = text.getvalue()
    elif suffix == ".json":
        body = json.dumps(records, indent=2, ensure_ascii=False).replace("\n", eol) + eol
    else:
        body = (eol * 2).join(json.dumps(record, ensure_ascii=False) for record in records) + eol
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode()


def write(path: Path, records: list[dict[str, Any]], **saved: bool) -> Path:
    path.write_bytes(encode(path.suffix, records, **saved))
    return path


def slimmoa(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200", "SLIMMOA_API_TOKEN": ""})


def one_line(text: str) -> str:
    return " ".join(text.split())


def job_rows(database_url: str, job_id: str) -> list[tuple[Any, ...]]:
    """What a job stored per item, in input order: the prompt's fields and the aggregated output."""
    job = wait_for_job(database_url, job_id)
    assert job.status == "succeeded", job.error
    with session_scope(database_url) as session:
        return [
            (item.position, item.external_id, item.instruction, item.dataset, item.system, output.text)
            for item, output in results.job_outputs(session, job_id)
            if output is not None
        ]
