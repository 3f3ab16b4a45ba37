"""Multi-turn records (MT-Bench's `turns`): one MoA round per user turn, each seeing the answers to the
turns before it; pools and outputs per turn; progress per turn; the MT-Bench answer export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from db import progress
from db.models import Item, Output
from db.session import session_scope
from orchestrator.contracts import ChatMessage, InputRecord
from orchestrator.inputs import FieldMap, read_records
from orchestrator.prompts import build_stage_prompt
from orchestrator.recipes import Recipe
from tests.conftest import recipe_from_yaml, run_cli, submit, wait_for_job
from tests.test_conversations import lines, wait_until_done
from tests.test_pipeline import SYNTHETIC, job_rows
from workers.engines import ChatRequest
from workers.engines.synthetic import WordTokenizer, prompt_digest

# Two questions in the shape of MT-Bench's question.jsonl: the second turn depends on the first answer.
QUESTIONS: list[dict[str, Any]] = [
    {
        "question_id": 81,
        "category": "writing",
        "turns": [
            "Compose a short travel note about a trip to Hawaii.",
            "Rewrite your previous response. Start every sentence with the letter A.",
        ],
    },
    {
        "question_id": 101,
        "category": "reasoning",
        "turns": [
            "You overtake the second person in a race. What is your position now?",
            "What if you overtake the last person instead?",
        ],
    },
]
MT_BENCH_FIELDS = FieldMap.parse(["id=question_id", "dataset=category"])


def mt_bench_file(folder: Path, suffix: str) -> Path:
    path = folder / f"question{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(QUESTIONS), path)
    else:
        path.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    return path


def test_a_multi_turn_record_answers_its_last_turn() -> None:
    record = InputRecord.model_validate({"id": "81", "turns": QUESTIONS[0]["turns"]})
    assert record.instruction == QUESTIONS[0]["turns"][1]
    assert record.history() == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"turns": []}, "at least 1 item"),
        ({"turns": ["a", "  "]}, "turn 2 is empty"),
        ({"turns": ["a", "b\x00"]}, "turn 2 contains a NUL character"),
        ({"turns": ["a"], "messages": [{"role": "user", "content": "a"}]}, "either turns"),
        ({"turns": ["a", "b"], "instruction": "a"}, "the instruction must be the last turn"),
    ],
)
def test_bad_turns_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InputRecord.model_validate(data)


def test_mt_bench_questions_read_the_same_from_jsonl_and_parquet(tmp_path: Path) -> None:
    from_jsonl = read_records(mt_bench_file(tmp_path, ".jsonl"), fields=MT_BENCH_FIELDS)
    from_parquet = read_records(mt_bench_file(tmp_path, ".parquet"), fields=MT_BENCH_FIELDS)
    assert from_jsonl == from_parquet
    assert [(r.id, r.dataset, r.turns) for r in from_jsonl] == [
        ("81", "writing", QUESTIONS[0]["turns"]),
        ("101", "reasoning", QUESTIONS[1]["turns"]),
    ]


def turn_digest(recipe: Recipe, model: str, history: list[ChatMessage], turn: str, pool: list[str]) -> str:
    """What the synthetic engine reports for the builder's prompt of a stage of one turn."""
    sampling = (
        recipe.aggregator.sampling
        if model == recipe.aggregator.model
        else next(s.sampling for s in recipe.slots(0) if s.model == model)
    )
    prompt = build_stage_prompt(
        turn,
        history=history,
        references=pool,
        context_length=recipe.model(model).context_length,
        max_tokens=sampling.max_tokens,
        tokenizer=WordTokenizer(),
    )
    return prompt_digest(ChatRequest.build("x", prompt.messages, sampling))


def outputs_by_turn(database_url: str, item_id: int) -> list[Output]:
    with session_scope(database_url) as session:
        item = session.get_one(Item, item_id)
        return list(item.outputs)


def test_each_turn_sees_the_answers_to_the_turns_before_it(database_url: str, worker: Any) -> None:
    recipe = recipe_from_yaml(SYNTHETIC)
    records = [
        InputRecord.model_validate({"id": str(q["question_id"]), "turns": q["turns"]}) for q in QUESTIONS
    ]
    records.append(InputRecord.model_validate({"id": "one-turn", "instruction": "Say hi."}))
    job_id = submit(database_url, recipe, records)
    job = wait_for_job(database_url, job_id)
    assert (job.status, job.items_succeeded) == ("succeeded", 3)

    for (item, candidates, output), record in zip(job_rows(database_url, job_id), records, strict=True):
        turns = record.turns or [record.instruction]
        answers = outputs_by_turn(database_url, item.id)
        assert [a.turn for a in answers] == list(range(len(turns)))
        assert item.last_turn == len(turns) - 1 and output is not None and output.id == answers[-1].id
        history: list[ChatMessage] = []
        for turn, text in enumerate(turns):
            pool = [c for c in candidates if c.turn == turn]
            assert [(c.layer, c.slot) for c in pool] == [(0, 0), (0, 1), (0, 2)]
            for candidate in pool:
                digest = turn_digest(recipe, candidate.model, history, text, [])
                assert (candidate.text or "").startswith(f"{candidate.model}:{digest} ")
            digest = turn_digest(recipe, "synth-agg", history, text, [c.text or "" for c in pool])
            assert answers[turn].text.startswith(f"synth-agg:{digest} ")
            assert answers[turn].pool_size == 3
            # The next turn's proposers see this turn's aggregated answer, not a candidate.
            history += [
                ChatMessage(role="user", content=text),
                ChatMessage(role="assistant", content=answers[turn].text),
            ]

    with session_scope(database_url) as session:
        counts = progress.job_counts(session, job_id)
    assert counts.items_per_turn == {0: 3, 1: 2}
    assert counts.answers == {0: 3, 1: 2} and counts.outputs == 3
    assert counts.candidates == {(0, 0): (9, 0), (1, 0): (6, 0)}


def test_the_api_takes_turns_and_exports_mt_bench_answers(api: httpx.Client, tmp_path: Path) -> None:
    upload = mt_bench_file(tmp_path, ".jsonl")
    with upload.open("rb") as handle:
        response = api.post(
            "/v1/jobs",
            files={"file": ("question.jsonl", handle, "application/x-ndjson")},
            data={"recipe": "api-synthetic", "fields": json.dumps({"id": "question_id"})},
        )
    assert response.status_code == 201, response.text
    job = wait_until_done(api, response.json()["id"])
    assert job["status"] == "succeeded"

    stages = job["progress"]["stages"]
    assert [(s["turn"], s["stage"], s["expected"], s["finished"]) for s in stages] == [
        (0, "proposers", 6, 6),
        (0, "aggregator", 2, 2),
        (1, "proposers", 6, 6),
        (1, "aggregator", 2, 2),
    ]
    items = api.get(f"/v1/jobs/{job['id']}/items").json()["data"]
    detail = api.get(f"/v1/jobs/{job['id']}/items/{items[0]['id']}").json()
    assert detail["turns"] == QUESTIONS[0]["turns"] and detail["instruction"] == QUESTIONS[0]["turns"][1]
    assert [(layer["turn"], layer["layer"]) for layer in detail["layers"]] == [(0, 0), (1, 0)]
    answers = [output["text"] for output in detail["outputs"]]
    assert len(answers) == 2 and detail["output"]["text"] == answers[1]

    mt_bench = lines(api, job["id"], "mt_bench")
    assert [row["question_id"] for row in mt_bench] == [81, 101]
    assert mt_bench[0]["choices"] == [{"index": 0, "turns": answers}]
    assert mt_bench[0]["model_id"] == "slimmoa-api-synthetic" and mt_bench[0]["tstamp"] > 0
    assert len({row["answer_id"] for row in mt_bench}) == 2

    # Fine-tuning exports carry the conversation the last answer follows.
    sft = lines(api, job["id"], "sft")
    first, second = QUESTIONS[0]["turns"]
    assert sft[0]["messages"] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": second},
    ]
    assert sft[0]["output"] == answers[1]
    pools = lines(api, job["id"], "pools")
    assert pools[0]["outputs"] == answers and pools[0]["turns"] == QUESTIONS[0]["turns"]
    assert sorted({c["turn"] for c in pools[0]["candidates"]}) == [0, 1]
    parquet = tmp_path / "out.parquet"
    parquet.write_bytes(api.get(f"/v1/jobs/{job['id']}/results", params={"format": "parquet"}).content)
    rows = pq.read_table(parquet).to_pylist()
    assert rows[0]["messages"] == sft[0]["messages"] and rows[0]["output"] == answers[1]


def test_run_answers_mt_bench_questions_in_fastchat_answer_format(tmp_path: Path) -> None:
    mt_bench_file(tmp_path, ".jsonl")
    args = ("--field", "id=question_id", "--field", "dataset=category", "--recipe", "synthetic")
    result = run_cli(tmp_path, "question.jsonl", *args, "--format", "mt_bench", "-o", "slimmoa.jsonl")
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [json.loads(line) for line in (tmp_path / "slimmoa.jsonl").read_text().splitlines()]
    assert [(a["question_id"], len(a["choices"][0]["turns"])) for a in answers] == [(81, 2), (101, 2)]
    assert all(turn.startswith("synth-agg:") for a in answers for turn in a["choices"][0]["turns"])
    pools = [json.loads(line) for line in (tmp_path / "slimmoa.pools.jsonl").read_text().splitlines()]
    assert [p["turns"] for p in pools] == [q["turns"] for q in QUESTIONS]
    assert [p["outputs"] for p in pools] == [a["choices"][0]["turns"] for a in answers]
