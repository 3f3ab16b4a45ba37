"""Streaming on the real vLLM CPU engine and the embedded SmolLM2 (one engine for the module): the
deltas add up to the text `generate` gives, and a cancelled stream is aborted in the engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.contracts import ChatMessage
from orchestrator.recipes import SamplingSpec, VllmModel
from orchestrator.routing import BULK_PRIORITY, INTERACTIVE_PRIORITY
from orchestrator.settings import Settings
from workers.engine_host import EngineHost
from workers.engines import ChatRequest, Engine, Generation
from workers.outcomes import Failure

pytestmark = pytest.mark.vllm

SPEC = VllmModel(
    engine="vllm", weights="embedded:smollm2", context_length=2048, weights_gb=0.55, memory_gb=1.5
)
# Greedy SmolLM2 counts on for hundreds of tokens: a stream long enough to cancel midway.
MESSAGES = [ChatMessage(role="user", content="Count from 1 to 1000, separated by commas.")]


@pytest.fixture(scope="module")
def host() -> Iterator[EngineHost]:
    host = EngineHost(Settings())
    try:
        with host.lease("smollm2", SPEC):
            pass
        yield host
    finally:
        host.shutdown()


def greedy(request_id: str, max_tokens: int, priority: int = BULK_PRIORITY) -> Any:
    def prepare(_: Engine) -> ChatRequest:
        sampling = SamplingSpec(temperature=0.0, max_tokens=max_tokens)
        return ChatRequest.build(request_id, MESSAGES, sampling, priority=priority)

    return prepare


def unfinished(host: EngineHost) -> int:
    with host.lease("smollm2", SPEC) as engine:
        return int(engine._llm.get_num_unfinished_requests())  # type: ignore[attr-defined]


def test_the_deltas_add_up_to_the_text_generate_gives(host: EngineHost) -> None:
    received: list[str] = []
    streamed = host.attempt_stream("smollm2", SPEC, greedy("stream-1", 24), received.append)
    whole = host.attempt("smollm2", SPEC, greedy("whole-1", 24))
    assert isinstance(streamed, Generation) and isinstance(whole, Generation)
    assert len(received) > 1, "the answer came in pieces"
    assert "".join(received) == streamed.text == whole.text
    assert (streamed.prompt_tokens, streamed.output_tokens, streamed.finish_reason) == (
        whole.prompt_tokens,
        whole.output_tokens,
        whole.finish_reason,
    )
    assert streamed.output_tokens == 24 and streamed.finish_reason == "length"


def test_a_cancelled_stream_is_aborted_in_the_engine(host: EngineHost) -> None:
    received: list[str] = []
    outcome = host.attempt_stream(
        "smollm2", SPEC, greedy("cancel-1", 1024), received.append, cancelled=lambda: len(received) >= 3
    )
    assert isinstance(outcome, Failure) and "cancelled by the caller" in outcome.message
    deadline = time.monotonic() + 5
    while unfinished(host):
        assert time.monotonic() < deadline, "the cancelled request still runs in the engine"
        time.sleep(0.1)
    # The engine serves the next request as before.
    after = host.attempt_stream("smollm2", SPEC, greedy("after-1", 8), lambda _: None)
    assert isinstance(after, Generation) and after.output_tokens == 8


def test_an_interactive_request_has_the_engine_to_itself_and_bulk_requests_resume(host: EngineHost) -> None:
    bulk: dict[str, list[float]] = {f"bulk-{i}": [] for i in range(6)}
    outcomes: dict[str, Generation | Failure] = {}

    def run(request_id: str) -> None:
        stamps = bulk[request_id]
        outcomes[request_id] = host.attempt_stream(
            "smollm2", SPEC, greedy(request_id, 160), lambda _: stamps.append(time.monotonic())
        )

    threads = [threading.Thread(target=run, args=(request_id,)) for request_id in bulk]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not all(len(stamps) >= 3 for stamps in bulk.values()):
        assert time.monotonic() < deadline, "the bulk requests did not start"
        time.sleep(0.05)
    chat: list[float] = []
    answer = host.attempt_stream(
        "smollm2", SPEC, greedy("chat-1", 32, INTERACTIVE_PRIORITY), lambda _: chat.append(time.monotonic())
    )
    ended = time.monotonic()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(answer, Generation) and answer.output_tokens == 32
    # From the chat request's first token to its end, only its own steps ran: no bulk request moved.
    during = [t for stamps in bulk.values() for t in stamps if chat[0] < t < ended]
    assert not during, f"{len(during)} bulk deltas while the chat request ran"
    assert all(stamps[-1] > ended for stamps in bulk.values()), "every bulk request went on afterwards"
    # Held, not restarted: each ends as the same request run alone does (greedy).
    alone = host.attempt("smollm2", SPEC, greedy("alone-1", 160))
    assert isinstance(alone, Generation)
    for request_id, outcome in outcomes.items():
        assert isinstance(outcome, Generation), outcome
        assert (outcome.text, outcome.output_tokens) == (alone.text, alone.output_tokens), request_id
