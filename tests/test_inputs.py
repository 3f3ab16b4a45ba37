"""Prompt files in every input format, and column mapping, through the reader, `slimmoa run`,
`slimmoa submit` and the API.

One list of Arena-Hard-style records (text in `prompt`, id in `uid`) is written as JSONL, a JSON list,
Parquet and CSV; each gives the same records, and the same job. Bad input is refused with the file, the
line or row and the field, and nothing is stored.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.errors import InputError
from orchestrator.inputs import FieldMap, InputFormat, parse_records, read_records
from orchestrator.settings import get_settings
from tests.conftest import run_cli, stored
from tests.prompt_files import (
    ARENA,
    EXPECTED,
    FIELD_ARGS,
    FORMATS,
    MAPPING,
    encode,
    job_rows,
    one_line,
    slimmoa,
    write,
)

# --- Reading: every format, the same records ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "saved"),
    [(name, {}) for name in FORMATS]
    + [(name, {"bom": True, "crlf": True}) for name in FORMATS if not name.endswith(".parquet")],
)
def test_every_format_reads_the_same_records(tmp_path: Path, name: str, saved: dict[str, bool]) -> None:
    path = write(tmp_path / name, ARENA, **saved)
    assert read_records(path, fields=FieldMap.of(MAPPING)) == EXPECTED


@pytest.mark.parametrize(
    ("name", "written_as", "input_format"),
    [
        ("prompts.txt", ".csv", InputFormat.CSV),
        ("prompts.data", ".parquet", InputFormat.PARQUET),
        ("prompts.data", ".parquet", None),  # Parquet says what it is in its first bytes
        ("prompts.jsonl", ".json", None),  # a JSON list is a list whatever the suffix says
        ("prompts.json", ".jsonl", None),
        ("prompts.json", ".jsonl", InputFormat.JSONL),
    ],
)
def test_the_format_comes_from_the_suffix_the_content_or_the_option(
    tmp_path: Path, name: str, written_as: str, input_format: InputFormat | None
) -> None:
    (tmp_path / name).write_bytes(encode(written_as, ARENA))
    records = read_records(tmp_path / name, input_format=input_format, fields=FieldMap.of(MAPPING))
    assert records == EXPECTED


def test_records_without_an_id_get_their_position(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"instruction": "a"},
        {"instruction": "b", "id": "x"},
        {"instruction": "c", "id": 7},
        {"instruction": "d"},
    ]
    for name in FORMATS[:2]:
        assert [r.id for r in read_records(write(tmp_path / name, rows))] == ["0", "x", "7", "3"]


def test_reading_stops_at_the_limit(tmp_path: Path) -> None:
    """The readers stream: what follows the limit is never read (here, text that is not JSON at all)."""
    jsonl = encode(".jsonl", ARENA) + b"\x00 not json\n"
    listed = encode(".json", ARENA).rstrip().removesuffix(b"]") + b", \x00 not json"
    for name, content in (("p.jsonl", jsonl), ("p.json", listed)):
        (tmp_path / name).write_bytes(content)
        assert read_records(tmp_path / name, 3, fields=FieldMap.of(MAPPING)) == EXPECTED[:3]
        with pytest.raises(InputError, match=r"p\.json.?:\d+: (invalid JSON|not UTF-8)"):
            read_records(tmp_path / name, fields=FieldMap.of(MAPPING))


def test_a_json_list_element_may_span_many_lines() -> None:
    element = {"instruction": "x" * 50_000, "id": "big", "dataset": "d", "extra": {"deep": list(range(2000))}}
    text = "[\n" + json.dumps(element, indent=1) + ",\n" + json.dumps({"instruction": "y"}) + "\n]\n"
    records = parse_records(text, "big.json")
    assert [(r.id, len(r.instruction)) for r in records] == [("big", 50_000), ("1", 1)]
    broken = text.replace('"deep": [', '"deep": [,', 1)
    line = text[: text.index('"deep"')].count("\n") + 1
    with pytest.raises(InputError, match=rf"^big\.json:{line}: invalid JSON: Expecting value"):
        parse_records(broken, "big.json")


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["instruction"], "--field 'instruction': expected FIELD=COLUMN, such as instruction=prompt"),
        (
            ["text=prompt"],
            "--field: unknown field 'text' (fields: instruction, id, dataset, system, messages, turns)",
        ),
        (["id=uid", "id=question_id"], "--field: id is mapped twice ('uid', 'question_id')"),
    ],
)
def test_a_bad_field_option_exits_2(tmp_path: Path, specs: list[str], message: str) -> None:
    path = write(tmp_path / "prompts.jsonl", ARENA)
    args = [arg for spec in specs for arg in ("--field", spec)]
    result = run_cli(tmp_path, path.name, "-o", "out.json", "--recipe", "synthetic", *args)
    assert result.returncode == 2 and message in one_line(result.stderr), result.stderr
    submitted = slimmoa("submit", str(path), "--recipe", "synthetic", *args, "--api", "http://127.0.0.1:9")
    assert submitted.exit_code == 2 and message in one_line(submitted.stderr), "refused before the API"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"], "nothing stored or written"


# --- Bad input: the file, the line or row, the field; nothing stored --------------------------------


def _parquet_with_a_null_prompt() -> bytes:
    return encode(".parquet", [*ARENA[:1], {**ARENA[1], "prompt": None}])


BAD = [
    (
        "prompts.jsonl",
        b'{"instruction": "a"}\n\n{"instruction": "caf\xe9 au lait"}\n',
        {},
        "prompts.jsonl:3: not UTF-8 text (invalid continuation byte at column 21)",
    ),
    (
        "prompts.jsonl",
        b"\xff\xfe{\x00}\x00",
        {},
        "prompts.jsonl: not UTF-8 text: it starts with a UTF-16 byte-order mark; save it as UTF-8",
    ),
    (
        "prompts.json",
        b'[\n  {"instruction": "a", "id": "q1"},\n  {"instruction": "b", "id": "q1"}\n]\n',
        {},
        "prompts.json:3: record [1]: field 'id' 'q1' is already the id of line 2 (record [0])",
    ),
    (
        "prompts.jsonl",
        b'{"instruction": "a"}\n{"instruction": "b", "id": "0"}\n',
        {},
        "prompts.jsonl:2: field 'id' '0' is already the id of line 1 (its position; it has no id)",
    ),
    (
        "prompts.csv",
        encode(".csv", [*ARENA, {**ARENA[2], "prompt": "again"}]),
        MAPPING,
        "prompts.csv: row 6: field 'uid' (mapped to id) 'c3d5' is already the id of row 4",
    ),
    (
        "prompts.jsonl",
        encode(".jsonl", ARENA),
        {},
        "prompts.jsonl:1: field 'instruction' is required (the record has: uid, category, prompt, system)",
    ),
    (
        "prompts.parquet",
        encode(".parquet", ARENA),
        {},
        "prompts.parquet: no column 'instruction' (columns: uid, category, prompt, system); "
        "map one with --field instruction=COLUMN (API: fields)",
    ),
    (
        "prompts.csv",
        encode(".csv", ARENA),
        {"instruction": "prompt", "id": "question_id"},
        "prompts.csv: no column 'question_id' (mapped to id); columns: uid, category, prompt, system",
    ),
    (
        "prompts.json",
        encode(".json", ARENA),
        {"instruction": "prompt", "id": "question_id"},
        "prompts.json: no record has 'question_id' (mapped to id); "
        "the records have: category, prompt, system, uid",
    ),
    (
        "prompts.csv",
        b"prompt,uid\r\nfine,1\r\ncaf\xe9 noir,2\r\n",
        {"instruction": "prompt"},
        "prompts.csv: row 3: field 'prompt' (mapped to instruction): "
        "not UTF-8 text (invalid continuation byte at byte 4)",
    ),
    (
        "prompts.csv",
        b'prompt,uid\n"two\nlines",1\nthree,2,3\n',
        {"instruction": "prompt"},
        "prompts.csv: row 3: expected 2 columns (as in the header), got 3",
    ),
    (
        "prompts.parquet",
        _parquet_with_a_null_prompt(),
        MAPPING,
        "prompts.parquet: row 2: field 'prompt' (mapped to instruction) is required",
    ),
]
BAD_IDS = [message.split(": ", 1)[0] + ": " + message.split(": ", 1)[1][:30] for *_, message in BAD]


@pytest.mark.parametrize(("name", "content", "mapping", "message"), BAD, ids=BAD_IDS)
def test_bad_input_exits_2_naming_the_place_and_stores_nothing(
    tmp_path: Path, name: str, content: bytes, mapping: dict[str, str], message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    args = [arg for target, column in mapping.items() for arg in ("--field", f"{target}={column}")]
    result = run_cli(tmp_path, name, "-o", "out.json", "--recipe", "synthetic", *args)
    assert result.returncode == 2, result.stderr
    assert message in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "nothing stored or written"


@pytest.fixture()
def client(services: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(get_settings().model_copy(update={"api_token": ""}))) as test_client:
        yield test_client


@pytest.mark.parametrize(("name", "content", "mapping", "message"), BAD, ids=BAD_IDS)
def test_a_bad_upload_is_422_naming_the_place_and_stores_nothing(
    client: TestClient, database_url: str, name: str, content: bytes, mapping: dict[str, str], message: str
) -> None:
    before = stored(database_url)
    form = {"recipe": "synthetic"} | ({"fields": json.dumps(mapping)} if mapping else {})
    response = client.post("/v1/jobs", files={"file": (name, content)}, data=form)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(message)
    assert stored(database_url) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "items": [
                    {"instruction": "a", "id": "x"},
                    {"instruction": "b"},
                    {"instruction": "c", "id": "x"},
                ]
            },
            "items[2]: field 'id' 'x' is already the id of items[0]",
        ),
        (
            {"items": ARENA * 2, "fields": MAPPING},
            "items[4]: field 'uid' (mapped to id) 'a1f3' is already the id of items[0]",
        ),
        (
            {"items": ARENA, "fields": {"instruction": "question"}},
            "fields.instruction: no item has 'question'; the items have: category, prompt, system, uid",
        ),
        (
            {"items": ARENA, "fields": {"text": "prompt"}},
            "fields: unknown field 'text' (fields: instruction, id, dataset, system, messages, turns)",
        ),
        ({"items": ARENA, "fields": {"instruction": ""}}, "fields.instruction: expected a column name"),
        ({"items": ARENA}, "items[0].instruction: is required"),
    ],
)
def test_json_submit_errors_name_the_items(
    client: TestClient, database_url: str, body: dict[str, Any], message: str
) -> None:
    before = stored(database_url)
    response = client.post("/v1/jobs", json={"recipe": "synthetic"} | body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == message
    assert stored(database_url) == before


@pytest.mark.parametrize(
    ("form", "message"),
    [
        (
            {"fields": "instruction=prompt"},
            'fields: expected a JSON object such as {"instruction": "prompt"}',
        ),
        ({"fields": '{"instruction": 3}'}, "fields.instruction: expected a column name"),
        ({"input_format": "xlsx"}, "input_format: expected one of jsonl, json, parquet, csv"),
        ({"input_format": "json"}, "prompts.jsonl:1: expected a JSON list ('[' first), found '{'"),
    ],
)
def test_upload_options_are_checked(client: TestClient, form: dict[str, str], message: str) -> None:
    files = {"file": ("prompts.jsonl", encode(".jsonl", ARENA))}
    response = client.post("/v1/jobs", files=files, data={"recipe": "synthetic"} | form)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == message


# --- The real stack: every format gives the same job -------------------------------------------------


def test_every_input_format_gives_the_same_job(
    tmp_path: Path, api_url: str, worker: subprocess.Popen[bytes], database_url: str
) -> None:
    jobs: dict[str, str] = {}
    for name in FORMATS:
        path = write(tmp_path / name, ARENA, bom=not name.endswith(".parquet"))
        submitted = slimmoa("submit", str(path), "--recipe", "api-synthetic", *FIELD_ARGS, "--api", api_url)
        assert submitted.exit_code == 0, submitted.output
        jobs[f"submit {name}"] = submitted.stdout.strip()
    renamed = tmp_path / "questions.txt"
    renamed.write_bytes(encode(".csv", ARENA))
    submitted = slimmoa(
        "submit",
        str(renamed),
        "--recipe",
        "api-synthetic",
        "--input-format",
        "csv",
        *FIELD_ARGS,
        "--api",
        api_url,
    )
    assert submitted.exit_code == 0, submitted.output
    jobs["submit --input-format"] = submitted.stdout.strip()
    with httpx.Client(base_url=api_url, timeout=60) as api:
        as_json = api.post("/v1/jobs", json={"recipe": "api-synthetic", "items": ARENA, "fields": MAPPING})
        upload = api.post(
            "/v1/jobs",
            files={"file": ("questions.parquet", encode(".parquet", ARENA))},
            data={"recipe": "api-synthetic", "fields": json.dumps(MAPPING)},
        )
    for label, response in (("API JSON", as_json), ("API upload", upload)):
        assert response.status_code == 201, response.text
        jobs[label] = response.json()["id"]

    expected = [(i, r.id, r.instruction, r.dataset, r.system) for i, r in enumerate(EXPECTED)]
    first = job_rows(database_url, jobs["submit prompts.jsonl"])
    assert [row[:5] for row in first] == expected
    for label, job_id in jobs.items():
        assert job_rows(database_url, job_id) == first, label
