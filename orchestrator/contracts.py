"""Contracts shared by the CLI, the API, the planner and the stage tasks."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatMessage", "InputRecord", "RetryResult", "RetryStage", "TruncationRecord"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class InputRecord(BaseModel):
    """One prompt of a job: an `instruction` (with an optional `system`), a conversation in OpenAI's
    `messages` format ending with a user turn, whose last user turn is then the instruction, or the
    user `turns` of a multi-turn record (MT-Bench), answered one after the other, whose last turn is
    then the instruction (an item's instruction is always the turn its output answers). AlpacaEval
    files carry more keys (output, generator): they are ignored."""

    model_config = ConfigDict(extra="ignore")

    instruction: str
    id: str | None = Field(default=None, max_length=200)
    dataset: str | None = Field(default=None, max_length=200)
    system: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    turns: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _instruction_of_a_conversation(cls, data: object) -> object:
        # Multi-turn records and conversations name their instruction by their last user turn;
        # conversations their system prompt by a leading system turn.
        if not isinstance(data, dict) or "instruction" in data:
            return data
        if isinstance(data.get("turns"), list) and data["turns"] and "messages" not in data:
            return data | {"instruction": data["turns"][-1]}
        if not isinstance(data.get("messages"), list):
            return data
        turns = [m for m in data["messages"] if isinstance(m, dict)]
        derived = dict(data)
        if turns and turns[-1].get("role") != "user":
            raise ValueError("messages: the last message must be the user's (the turn to answer)")
        if turns:
            derived["instruction"] = turns[-1].get("content")
        if turns and turns[0].get("role") == "system":
            derived.setdefault("system", turns[0].get("content"))
        return derived

    @model_validator(mode="after")
    def _a_conversation_ends_with_its_instruction(self) -> InputRecord:
        if self.turns is not None:
            if self.messages is not None:
                raise ValueError("turns: give either turns (a multi-turn record) or messages, not both")
            if self.turns[-1] != self.instruction:
                raise ValueError("turns: the instruction must be the last turn (give one of the two)")
            return self
        if self.messages is None:
            return self
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (the turn to answer)")
        if any(m.role == "system" for m in self.messages[1:]):
            raise ValueError("messages: a system message may only come first")
        if self.messages[-1].content != self.instruction:
            raise ValueError("messages: the instruction must be the last user message (give one of the two)")
        leading = self.messages[0].content if self.messages[0].role == "system" else None
        if self.system is not None and leading != self.system:
            raise ValueError("messages: the system prompt must be the leading system message (give one)")
        return self

    def history(self) -> list[ChatMessage]:
        """The turns before the instruction, without the system prompt: what a proposer sees before it."""
        return [m for m in (self.messages or [])[:-1] if m.role != "system"]

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("turns")
    @classmethod
    def _turns_are_text(cls, value: list[str] | None) -> list[str] | None:
        for index, turn in enumerate(value or []):
            if not turn.strip():
                raise ValueError(f"turn {index + 1} is empty")
            if "\x00" in turn:
                raise ValueError(f"turn {index + 1} contains a NUL character")
        return value

    @field_validator("instruction", "id", "dataset", "system")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold NUL; refuse it here rather than fail at the insert.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class TruncationRecord(BaseModel):
    """How a candidate pool was cut to fit a model's context; stored on the item."""

    layer: int
    budget_tokens: int = Field(description="Tokens left for the numbered candidates.")
    original_tokens: list[int]
    kept_tokens: list[int]
    step: int | None = Field(default=None, description="The step of a sequential aggregation that was cut.")


class RetryStage(enum.StrEnum):
    ALL = "all"
    PROPOSERS = "proposers"
    AGGREGATOR = "aggregator"


class RetryResult(BaseModel):
    job_id: str
    items_reopened: int
    proposer_items: list[int]
    aggregator_items: list[int]
