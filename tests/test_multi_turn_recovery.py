"""Multi-turn items under failure: a worker killed between two turns, and a retry of a failed turn.

Each turn's answer is kept once stored: the sweep and a retry resume at the first turn without one,
and the turns before it are never generated again.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from db import progress
from db.models import Candidate, Item, Output
from db.session import session_scope
from orchestrator.contracts import InputRecord
from orchestrator.submission import enqueue_job
from tests.conftest import store
from tests.killable import finish_with_sweeps, retry_aggregators, run_with_flaky_model
from tests.test_reliability import recipe

TURNS = ["Name a prime number.", "Now name a larger one.", "And the sum of both?"]


def three_turn_records(count: int) -> list[InputRecord]:
    return [
        InputRecord.model_validate({"id": f"q{i}", "turns": [f"{turn} ({i})" for turn in TURNS]})
        for i in range(count)
    ]


def answers(database_url: str, job_id: str) -> dict[tuple[int, int], tuple[int, str]]:
    """(item, turn) -> (output row id, text) of every stored answer of the job."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Output.item_id, Output.turn, Output.id, Output.text)
            .join(Item, Item.id == Output.item_id)
            .where(Item.job_id == job_id)
        )
        return {(item, turn): (row_id, text) for item, turn, row_id, text in rows}


def candidate_keys(database_url: str, job_id: str) -> list[tuple[int, int, int, int]]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Candidate.item_id, Candidate.turn, Candidate.layer, Candidate.slot)
            .join(Item, Item.id == Candidate.item_id)
            .where(Item.job_id == job_id)
        )
        return sorted(tuple(row) for row in rows)  # type: ignore[misc]


def assert_every_turn_answered_once(database_url: str, job_id: str, items: int) -> None:
    stored = answers(database_url, job_id)
    assert len(stored) == items * len(TURNS)
    keys = candidate_keys(database_url, job_id)
    assert len(keys) == len(set(keys)) == items * len(TURNS) * 3
    with session_scope(database_url) as session:
        assert progress.count_rows(session, job_id)["outputs"] == items * len(TURNS)
        outputs = session.scalars(select(Item).where(Item.job_id == job_id)).all()
        assert all(item.output is not None and item.output.turn == 2 for item in outputs)


def test_a_worker_killed_between_turns_resumes_at_the_next_turn(
    database_url: str, worker_factory: Any
) -> None:
    worker = worker_factory()
    worker.start()
    job_id = store(database_url, recipe(400), three_turn_records(6))
    enqueue_job(job_id)
    deadline = time.monotonic() + 120
    while not any(turn == 0 for _, turn in answers(database_url, job_id)):
        assert time.monotonic() < deadline, "no first turn was answered"
        time.sleep(0.05)
    worker.kill()
    before = answers(database_url, job_id)
    waiting = [item for item, turn in before if turn == 0 and (item, 1) not in before]
    assert waiting, f"the kill landed between turns of some item: {sorted(before)}"

    worker.start()
    job, resent = finish_with_sweeps(database_url, job_id)
    assert job.status == "succeeded" and job.items_succeeded == 6
    assert resent > 0, "the turns lost with the killed worker were re-sent by the sweep"
    after = answers(database_url, job_id)
    # Answers stored before the kill are the ones the next turns were built on: never redone.
    assert {key: after[key] for key in before} == before
    assert_every_turn_answered_once(database_url, job_id, 6)


def test_a_retry_resumes_each_item_at_its_failed_turn(database_url: str, worker_factory: Any) -> None:
    job_id, failed = run_with_flaky_model(
        database_url, worker_factory, recipe(0), three_turn_records(24), "synth-agg"
    )
    before = answers(database_url, job_id)
    later = [item for item in failed if (item, 0) in before]
    assert later, "some item failed after its first turn was answered"
    for item, error in failed.items():
        answered = len({turn for answered_item, turn in before if answered_item == item})
        assert f"turn {answered + 1} of 3: aggregator" in error, error

    # A turn whose aggregator failed gets its aggregator alone: its pool is complete.
    retry_aggregators(database_url, worker_factory, job_id, failed)
    after = answers(database_url, job_id)
    assert {key: after[key] for key in before} == before
    assert_every_turn_answered_once(database_url, job_id, 24)
