"""`slimmoa run`, the all-in-one mode: bad input exits 2 naming file, line and field, storing nothing;
a good run (synthetic engine, private Redis, SQLite) writes outputs and pools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, run_cli

BAD_RECIPE = """
models: {a: {engine: synthetic}}
layers: [{proposers: [{model: a}, {model: ghost}]}]
aggregator: {model: a}
"""
MISSING_WEIGHTS = """
models: {big: {engine: vllm, weights: /nonexistent/Llama-70B-AWQ}}
layers: [{proposers: [{model: big}]}]
aggregator: {model: big}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instruction": "a"}\n{"instruction": "b"\n', "prompts.jsonl:2: invalid JSON"),
        (
            '{"instruction": "a"}\n\n{"id": 3, "dataset": "x"}\n',
            "prompts.jsonl:3: field 'instruction' is required",
        ),
        ('{"instruction": "   "}\n', "prompts.jsonl:1: field 'instruction' must not be empty"),
        ('{"instruction": 5}\n', "prompts.jsonl:1: field 'instruction' Input should be a valid string"),
        ('["not an object"]\n', "prompts.jsonl:1: record [0]: a record must be a JSON object, got str"),
        ("", "prompts.jsonl: the file is empty"),
        ("\n  \n", "prompts.jsonl: the file is empty"),
        ("[]", "prompts.jsonl: the JSON list is empty"),
        (
            '[\n  {"instruction": "a"},\n  {"output": "b"}\n]',
            "prompts.jsonl:3: record [1]: field 'instruction' is required",
        ),
        ('[{"instruction": "a"} {"instruction": "b"}]', "prompts.jsonl:1: invalid JSON: expected ',' or ']'"),
    ],
)
def test_bad_input_exits_2_and_stores_nothing(tmp_path: Path, content: str, expected: str) -> None:
    write(tmp_path / "prompts.jsonl", content)
    result = run_cli(tmp_path, "prompts.jsonl", "-o", "out.jsonl", "--recipe", "synthetic")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"], "nothing stored or written"


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("nope", "recipe 'nope': not found"),
        ("bad.yaml", "bad.yaml: layers[0].proposers[1].model: unknown model 'ghost'"),
        ("weights.yaml", "models.big.weights: no model folder at /nonexistent/Llama-70B-AWQ"),
    ],
)
def test_unknown_recipe_or_model_exits_2_and_stores_nothing(
    tmp_path: Path, recipe: str, expected: str
) -> None:
    write(tmp_path / "bad.yaml", BAD_RECIPE)
    write(tmp_path / "weights.yaml", MISSING_WEIGHTS)
    write(tmp_path / "prompts.jsonl", '{"instruction": "hi"}\n')
    result = run_cli(tmp_path, "prompts.jsonl", "-o", "out.jsonl", "--recipe", recipe)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.replace("\n", "")
    assert not (tmp_path / "slimmoa.db").exists() and not (tmp_path / "out.jsonl").exists()


def test_missing_input_file_exits_2(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "absent.jsonl", "-o", "out.jsonl", "--recipe", "synthetic")
    assert result.returncode == 2
    assert "absent.jsonl: no such file" in result.stderr


def test_a_synthetic_run_writes_outputs_and_pools(tmp_path: Path) -> None:
    result = run_cli(tmp_path, str(SAMPLE), "-o", "out.jsonl", "--recipe", "synthetic", "--limit", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    sample = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:4]]
    assert [o["instruction"] for o in outputs] == [s["instruction"] for s in sample]
    assert [o["dataset"] for o in outputs] == [s["dataset"] for s in sample]
    assert {o["generator"] for o in outputs} == {"slimmoa-synthetic"}
    assert all(set(o) == {"id", "instruction", "output", "generator", "dataset"} for o in outputs)
    assert all(o["output"].startswith("synth-agg:") for o in outputs)
    pools = [json.loads(line) for line in (tmp_path / "out.pools.jsonl").read_text().splitlines()]
    assert [len(p["candidates"]) for p in pools] == [3, 3, 3, 3]
    assert [p["output"] for p in pools] == [o["output"] for o in outputs]
    for name, fmt in (("out.jsonl", "jsonl"), ("out.pools.jsonl", "pools")):
        metadata = json.loads((tmp_path / f"{name}.metadata.json").read_text())
        assert (metadata["recipe"], metadata["format"], metadata["aggregator"]) == (
            "synthetic",
            fmt,
            "synth-agg",
        )
        assert [m["name"] for m in metadata["models"]] == ["synth-a", "synth-b", "synth-c", "synth-agg"]
    assert "4 items, 12 candidates, 4 outputs stored in sqlite:///" in result.stdout.replace("\n", "")
    assert (tmp_path / "slimmoa.db").is_file()
