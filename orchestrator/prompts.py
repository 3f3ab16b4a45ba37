"""The one prompt builder: proposer and aggregator messages, reference injection, fair truncation.

The aggregator prompt is Together MoA's, unchanged; the numbered candidates follow it ("1. ...").
It goes into the system message, or into the user turn when the model's chat template has no
system role (Gemma-2). Proposers of layer k > 1 receive the layer k-1 pool the same way.

A conversation (a chat record) is its earlier turns (`history`) and the user turn to answer (the
instruction): every stage sees the whole conversation, and without a system role the pool goes into
the turn to answer, the user's own system prompt into the first turn.

Sequential aggregation (Self-MoA's sequential variant) reads the pool in windows: step 0 numbers the
first window's candidates, every later step numbers the running synthesis as response 1 and then its
window's candidates. The synthesis is one of the responses, so the aggregator prompt stays Together
MoA's, unchanged, and each step's prompt is built (and, if need be, cut) like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Protocol

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestrator.contracts import ChatMessage, TruncationRecord
from orchestrator.errors import PromptTooLong

__all__ = [
    "StagePrompt",
    "Tokenizer",
    "aggregator_prompt",
    "build_stage_prompt",
    "fit_references",
    "step_references",
    "step_windows",
    "supports_system_role",
]

# Room left for the chat template's own tokens (role markers, separators) around the messages.
TEMPLATE_OVERHEAD_TOKENS = 32
_SYSTEM_PROBE = "slimmoa-system-probe"


class Tokenizer(Protocol):
    """Counts and cuts text in a model's tokens; engines provide one per model."""

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class StagePrompt:
    def __init__(self, messages: list[ChatMessage], truncation: TruncationRecord | None) -> None:
        self.messages = messages
        self.truncation = truncation


@cache
def aggregator_prompt() -> str:
    text = resources.files("orchestrator").joinpath("data/together_moa_aggregator_prompt.txt").read_text()
    return text.rstrip()


def supports_system_role(chat_template: str) -> bool:
    """Render the template with a system message: a template that raises or drops it has no system role."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hello"}]
    try:
        rendered = env.from_string(chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
        )
    except TemplateError:
        return False
    return _SYSTEM_PROBE in rendered


def _references_block(references: list[str]) -> str:
    return aggregator_prompt() + "".join(f"\n{i}. {text}" for i, text in enumerate(references, start=1))


def fit_references(
    references: list[str], budget_tokens: int, tokenizer: Tokenizer, layer: int
) -> tuple[list[str], TruncationRecord | None]:
    """Cut candidates to a shared budget, fairly: short ones stay whole, long ones get equal shares."""
    lengths = [tokenizer.count(text) for text in references]
    if sum(lengths) <= budget_tokens:
        return references, None
    kept = [0] * len(references)
    remaining = max(budget_tokens, 0)
    # Water-filling: serve candidates shortest first; each takes at most an equal share of what is left.
    order = sorted(range(len(references)), key=lambda i: lengths[i])
    for position, index in enumerate(order):
        share = remaining // (len(order) - position)
        kept[index] = min(lengths[index], share)
        remaining -= kept[index]
    cut = [
        text if kept[i] == lengths[i] else tokenizer.truncate(text, kept[i])
        for i, text in enumerate(references)
    ]
    record = TruncationRecord(
        layer=layer, budget_tokens=budget_tokens, original_tokens=lengths, kept_tokens=kept
    )
    return cut, record


def build_stage_prompt(
    instruction: str,
    *,
    system: str | None = None,
    history: Sequence[ChatMessage] = (),
    references: list[str] | None = None,
    system_supported: bool = True,
    context_length: int,
    max_tokens: int,
    tokenizer: Tokenizer,
    layer: int = 0,
) -> StagePrompt:
    """Messages for one generation: the item's own turns, with the pool injected when there is one.

    `history` holds a conversation's turns before the instruction. `references` is the previous
    layer's pool (for the aggregator: the last layer's). Candidates are truncated fairly when prompt +
    pool + `max_tokens` would not fit `context_length`.
    """
    messages: list[ChatMessage] = []
    if system:
        messages.append(ChatMessage(role="system", content=system))
    messages += [*history, ChatMessage(role="user", content=instruction)]
    if not references:
        return StagePrompt(_merge_system(messages) if not system_supported else messages, None)

    fixed = tokenizer.count(aggregator_prompt()) + tokenizer.count(instruction)
    fixed += sum(tokenizer.count(turn.content) for turn in history)
    fixed += tokenizer.count(system or "") + TEMPLATE_OVERHEAD_TOKENS
    numbering = sum(tokenizer.count(f"\n{i}. ") for i in range(1, len(references) + 1))
    budget = context_length - max_tokens - fixed - numbering
    if budget < len(references):
        raise PromptTooLong(
            f"instruction needs {fixed} tokens; with max_tokens={max_tokens} nothing of the "
            f"{len(references)} candidates fits the {context_length}-token context"
        )
    fitted, truncation = fit_references(references, budget, tokenizer, layer)
    block = _references_block(fitted)
    if history and not system_supported:
        # The pool belongs with the turn it answers, not with the conversation's first turn.
        turns = _merge_system(messages)
        last = ChatMessage(role="user", content=block + "\n\n" + turns[-1].content)
        return StagePrompt([*turns[:-1], last], truncation)
    if messages[0].role == "system":
        messages[0] = ChatMessage(role="system", content=messages[0].content + "\n\n" + block)
    else:
        messages.insert(0, ChatMessage(role="system", content=block))
    return StagePrompt(messages if system_supported else _merge_system(messages), truncation)


def step_windows(count: int, window: int) -> list[range]:
    """The pool positions each step of a sequential aggregation reads: `window` candidates a step, in
    slot order, every candidate in exactly one step (one step for an empty pool)."""
    return [range(start, min(start + window, count)) for start in range(0, count, window)] or [range(0)]


def step_references(references: list[str], window: int, step: int, synthesis: str | None) -> list[str]:
    """The responses a sequential step numbers: the running synthesis (the previous step's output) as
    response 1 from step 1 on, then the step's window of candidates."""
    chosen = [references[i] for i in step_windows(len(references), window)[step]]
    return chosen if step == 0 or synthesis is None else [synthesis, *chosen]


def _merge_system(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Fold a system message into the first user turn, for templates without a system role."""
    if not messages or messages[0].role != "system":
        return messages
    system, first, *rest = messages
    merged = ChatMessage(role="user", content=system.content + "\n\n" + first.content)
    return [merged, *rest]
