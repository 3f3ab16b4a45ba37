"""Streaming on the real vLLM CPU engine and the embedded SmolLM2 (one engine for the module): the
deltas add up to the text `generate` gives, and a cancelled stream is aborted in the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.contracts import ChatMessage
from orchestrator.recipes import SamplingSpec, VllmModel
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


def greedy(request_id: str, max_tokens: int) -> Any:
    def prepare(_: Engine) -> ChatRequest:
        return ChatRequest.build(request_id, MESSAGES, SamplingSpec(temperature=0.0, max_tokens=max_tokens))

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
