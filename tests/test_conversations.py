"""Chat records: a prompt may be a conversation (OpenAI `messages`). Every stage sees the whole
conversation, the aggregator's pool is injected for the turn to answer, and exports keep it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from orchestrator.contracts import InputRecord
from orchestrator.inputs import read_records
from orchestrator.prompts import aggregator_prompt, build_stage_prompt
from orchestrator.recipes import Recipe
from tests.conftest import recipe_from_yaml, submit, wait_for_job
from tests.test_pipeline import SYNTHETIC, job_rows
from workers.engines import ChatRequest
from workers.engines.synthetic import WordTokenizer, prompt_digest

CONVERSATION = [
    {"role": "system", "content": "You answer like a patient teacher."},
    {"role": "user", "content": "What is a prime number?"},
    {"role": "assistant", "content": "A number above 1 whose only divisors are 1 and itself."},
    {"role": "user", "content": "Is 91 one?"},
]
USER = {"role": "user", "content": "a"}


def test_a_conversation_names_its_instruction_and_system() -> None:
    record = InputRecord.model_validate({"id": "c1", "messages": CONVERSATION})
    assert (record.instruction, record.system) == ("Is 91 one?", "You answer like a patient teacher.")
    assert [m.role for m in record.history()] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([USER, {"role": "assistant", "content": "b"}], "last message must be"),
        ([USER, {"role": "system", "content": "s"}, USER], "system message may only come first"),
        ([{"role": "tool", "content": "a"}, USER], "Input should be 'system', 'user' or 'assistant'"),
        ([], "at least 1 item"),
    ],
)
def test_a_bad_conversation_is_refused(messages: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        InputRecord.model_validate({"messages": messages})


def test_the_pool_goes_with_the_turn_it_answers_when_there_is_no_system_role() -> None:
    record = InputRecord.model_validate({"messages": CONVERSATION})
    prompt = build_stage_prompt(
        record.instruction,
        system=record.system,
        history=record.history(),
        references=["first answer", "second answer"],
        system_supported=False,
        context_length=4096,
        max_tokens=64,
        tokenizer=WordTokenizer(),
    )
    roles = [m.role for m in prompt.messages]
    assert roles == ["user", "assistant", "user"]
    first, _, last = prompt.messages
    assert first.content == "You answer like a patient teacher.\n\nWhat is a prime number?"
    assert last.content.startswith(aggregator_prompt()) and last.content.endswith("\n\nIs 91 one?")
    assert "1. first answer\n2. second answer" in last.content
    # With a system role, the pool joins the system message and the turns stay as they were.
    with_system = build_stage_prompt(
        record.instruction,
        system=record.system,
        history=record.history(),
        references=["first answer"],
        context_length=4096,
        max_tokens=64,
        tokenizer=WordTokenizer(),
    )
    assert [m.role for m in with_system.messages] == ["system", "user", "assistant", "user"]
    assert with_system.messages[0].content.startswith("You answer like a patient teacher.\n\n")


def digest(recipe: Recipe, model: str, record: InputRecord, pool: list[str]) -> str:
    """What the synthetic engine reports for the builder's prompt of this stage over the conversation."""
    sampling = (
        recipe.aggregator.sampling
        if model == recipe.aggregator.model
        else next(s.sampling for s in recipe.slots(0) if s.model == model)
    )
    prompt = build_stage_prompt(
        record.instruction,
        system=record.system,
        history=record.history(),
        references=pool,
        context_length=recipe.model(model).context_length,
        max_tokens=sampling.max_tokens,
        tokenizer=WordTokenizer(),
    )
    return prompt_digest(ChatRequest.build("x", prompt.messages, sampling))


def test_every_stage_sees_the_whole_conversation(database_url: str, worker: Any) -> None:
    recipe = recipe_from_yaml(SYNTHETIC)
    records = [
        InputRecord.model_validate({"id": "chat-0", "messages": CONVERSATION}),
        InputRecord.model_validate({"id": "chat-1", "messages": CONVERSATION[1:2]}),
    ]
    job_id = submit(database_url, recipe, records)
    assert wait_for_job(database_url, job_id).status == "succeeded"
    for (item, candidates, output), record in zip(job_rows(database_url, job_id), records, strict=True):
        assert item.messages == [m.model_dump() for m in record.messages or []]
        for candidate in candidates:
            assert (candidate.text or "").startswith(
                f"{candidate.model}:{digest(recipe, candidate.model, record, [])} "
            )
        pool = [c.text or "" for c in candidates]
        assert output is not None and output.text.startswith(
            f"synth-agg:{digest(recipe, 'synth-agg', record, pool)} "
        )


def test_exports_keep_the_conversation(api: httpx.Client, tmp_path: Path) -> None:
    body = {
        "recipe": "api-synthetic",
        "items": [{"id": "chat", "messages": CONVERSATION}, {"id": "plain", "instruction": "Say hi."}],
    }
    job = api.post("/v1/jobs", json=body).json()
    assert wait_until_done(api, job["id"])["status"] == "succeeded"
    sft = [
        json.loads(line)
        for line in api.get(f"/v1/jobs/{job['id']}/results", params={"format": "sft"}).text.splitlines()
    ]
    assert sft[0]["messages"] == CONVERSATION and sft[0]["instruction"] == "Is 91 one?"
    assert "messages" not in sft[1]
    alpaca = api.get(f"/v1/jobs/{job['id']}/results", params={"format": "alpaca_eval"}).json()
    assert [row["instruction"] for row in alpaca] == ["Is 91 one?", "Say hi."]
    pools = [
        json.loads(line)
        for line in api.get(f"/v1/jobs/{job['id']}/results", params={"format": "pools"}).text.splitlines()
    ]
    assert pools[0]["messages"] == CONVERSATION and "messages" not in pools[1]
    parquet = tmp_path / "out.parquet"
    parquet.write_bytes(api.get(f"/v1/jobs/{job['id']}/results", params={"format": "parquet"}).content)
    rows = pq.read_table(parquet).to_pylist()
    assert rows[0]["messages"] == CONVERSATION and rows[1]["messages"] is None


def lines(api: httpx.Client, job_id: str, fmt: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/jobs/{job_id}/results", params={"format": fmt})
    return [json.loads(line) for line in response.text.splitlines()]


def wait_until_done(api: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in {"queued", "running"}:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_chat_records_read_the_same_from_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"id": "c", "messages": CONVERSATION}, {"id": "p", "messages": CONVERSATION[1:2]}]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_jsonl, from_parquet = read_records(jsonl), read_records(parquet)
    assert from_jsonl == from_parquet
    assert [r.instruction for r in from_jsonl] == ["Is 91 one?", "What is a prime number?"]
