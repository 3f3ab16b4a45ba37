"""The text writers of exports: one function per line format, and which candidate a preference pair
rejects. `orchestrator.exports` chooses among them (and writes Parquet itself)."""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from db.models import Candidate, Item, Output
from orchestrator.errors import ExportError

if TYPE_CHECKING:
    from orchestrator.exports import ExportMetadata

__all__ = [
    "ExportContext",
    "Rejected",
    "RejectedRule",
    "Rows",
    "alpaca_eval_lines",
    "conversation",
    "item_id",
    "jsonl_lines",
    "mt_bench_lines",
    "pool_records",
    "pools_lines",
    "preference_lines",
    "sft_lines",
    "step_records",
]

Rows = Iterator[tuple[Item, Output | None]]


class RejectedRule(enum.StrEnum):
    SHORTEST = "shortest"
    LONGEST = "longest"
    RANDOM = "random"  # seeded by the item's id: the same export twice rejects the same candidates
    MODEL = "model"  # `model:NAME`: that model's candidate (its lowest slot when it samples several)


@dataclass(frozen=True)
class Rejected:
    """Which candidate of the final layer's pool a preference pair rejects.

    Eligible are the candidates that succeeded and whose text differs from the aggregated output
    (ignoring surrounding white space); an item with none is left out of the export. Ties go to the
    lowest slot.
    """

    rule: RejectedRule = RejectedRule.SHORTEST
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> Rejected:
        """`shortest`, `longest`, `random` or `model:NAME`; ExportError naming the choices otherwise."""
        name, colon, model = text.partition(":")
        if name == RejectedRule.MODEL and colon and model:
            return cls(RejectedRule.MODEL, model)
        if not colon and name in set(RejectedRule) - {RejectedRule.MODEL}:
            return cls(RejectedRule(name))
        raise ExportError("rejected", f"expected shortest, longest, random or model:NAME, got {text!r}")

    def __str__(self) -> str:
        return f"{self.rule}:{self.model}" if self.rule == RejectedRule.MODEL else str(self.rule)

    def choose(self, item_id: int, pool: Sequence[Candidate], output: str) -> Candidate | None:
        """The rejected candidate of one item's final-layer pool (in slot order), or None."""
        eligible = sorted(
            (c for c in pool if c.ok and c.text is not None and c.text.strip() != output.strip()),
            key=lambda c: c.slot,
        )
        if self.rule == RejectedRule.MODEL:
            eligible = [c for c in eligible if c.model == self.model]
        if not eligible:
            return None
        if self.rule == RejectedRule.SHORTEST:
            return min(eligible, key=lambda c: len(c.text or ""))
        if self.rule == RejectedRule.LONGEST:
            return max(eligible, key=lambda c: len(c.text or ""))
        if self.rule == RejectedRule.RANDOM:
            return random.Random(item_id).choice(eligible)
        return eligible[0]


@dataclass(frozen=True)
class ExportContext:
    """What a writer needs besides the rows."""

    metadata: ExportMetadata
    final_layer: int = 0
    rejected: Rejected = field(default_factory=Rejected)


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def item_id(item: Item) -> str:
    return item.external_id or str(item.position)


def _answer(item: Item, output: Output, generator: str) -> dict[str, Any]:
    return {
        "id": item_id(item),
        "instruction": item.instruction,
        "output": output.text,
        "generator": generator,
        "dataset": item.dataset or "",
    }


def conversation(item: Item) -> list[dict[str, str]] | None:
    """The conversation the item's output answers, in OpenAI's `messages` format: a chat record's
    messages, or a multi-turn item's turns with the answers to every turn but the last (the system
    prompt first, if any); None for a one-turn prompt. Needs the item's outputs loaded."""
    if item.turns is None:
        return item.messages
    answers = {output.turn: output.text for output in item.outputs}
    messages = [{"role": "system", "content": item.system}] if item.system is not None else []
    for turn, text in enumerate(item.turns):
        messages.append({"role": "user", "content": text})
        if turn < item.last_turn and turn in answers:
            messages.append({"role": "assistant", "content": answers[turn]})
    return messages


def _prompt(item: Item) -> dict[str, Any]:
    """The fields of an example's prompt: `system` and the conversation (`messages`) only where the
    item has them."""
    record = {"id": item_id(item), "instruction": item.instruction}
    record |= {"system": item.system} if item.system is not None else {}
    messages = conversation(item)
    return record | ({"messages": messages} if messages is not None else {})


def jsonl_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """One JSON object a line per item with an output (failed items have none)."""
    for item, output in rows:
        if output is not None:
            yield _dump(_answer(item, output, context.metadata.generator))


def alpaca_eval_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """AlpacaEval's model-outputs file: a JSON list, one element a line."""
    yield "["
    separator = "\n"
    for line in jsonl_lines(rows, context):
        yield separator + line.rstrip("\n")
        separator = ",\n"
    yield "\n]\n"


def pool_records(item: Item, final_layer: int) -> list[dict[str, Any]]:
    """The item's proposer candidates, every turn and layer up to `final_layer`."""
    return [
        {"turn": c.turn, "layer": c.layer, "slot": c.slot, "model": c.model, "text": c.text, "error": c.error}
        for c in item.candidates
        if c.layer <= final_layer
    ]


def step_records(item: Item, final_layer: int) -> list[dict[str, Any]]:
    """The intermediate steps of the item's sequential aggregations (stored past `final_layer`), per
    turn in step order, with what each cost."""
    return [
        {
            "turn": c.turn,
            "step": c.slot,
            "model": c.model,
            "text": c.text,
            "prompt_tokens": c.prompt_tokens,
            "output_tokens": c.output_tokens,
            "latency_ms": c.latency_ms,
        }
        for c in item.candidates
        if c.layer > final_layer
    ]


def pools_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Every finished item with its whole candidate pool (per turn, layer and slot), its status and
    output (and, for a multi-turn item, its turns and every turn's output; for a sequential
    aggregation, its intermediate steps)."""
    for item, output in rows:
        messages = conversation(item)
        steps = step_records(item, context.final_layer)
        record = {
            "id": item_id(item),
            "instruction": item.instruction,
            **({"messages": messages} if messages is not None else {}),
            **({"turns": item.turns, "outputs": _turn_answers(item)} if item.turns is not None else {}),
            "status": item.status,
            "error": item.error,
            "candidates": pool_records(item, context.final_layer),
            **({"steps": steps} if steps else {}),
            "output": output.text if output else None,
            "truncation": item.truncation,
        }
        yield _dump(record)


def _turn_answers(item: Item) -> list[str]:
    return [output.text for output in item.outputs]


def mt_bench_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """FastChat's MT-Bench answer file: one answer a line, every turn's output in `choices[0].turns`,
    per item with an output. A numeric id is written as a number, as MT-Bench's question ids are."""
    for item, output in rows:
        if output is None:
            continue
        question = item_id(item)
        record = {
            "question_id": int(question) if question.isdigit() else question,
            "answer_id": f"{context.metadata.job_id}-{item.position}",
            "model_id": context.metadata.generator,
            "choices": [{"index": 0, "turns": _turn_answers(item)}],
            "tstamp": output.created_at.timestamp(),
        }
        yield _dump(record)


def sft_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Supervised fine-tuning examples: the prompt and the aggregated output, per item with an output."""
    for item, output in rows:
        if output is not None:
            yield _dump(_prompt(item) | {"output": output.text})


def preference_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Preference pairs: the aggregated output as chosen, a final-layer candidate (by the rule) rejected."""
    for item, output in rows:
        if output is None:
            continue
        pool = [c for c in item.candidates if c.turn == item.last_turn and c.layer == context.final_layer]
        rejected = context.rejected.choose(item.id, pool, output.text)
        if rejected is None:
            continue
        yield _dump(
            _prompt(item)
            | {
                "chosen": output.text,
                "rejected": rejected.text,
                "rejected_model": rejected.model,
                "rejected_slot": rejected.slot,
            }
        )
