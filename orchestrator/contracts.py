"""Contracts shared by the CLI, the API, the planner and the stage tasks."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatMessage", "InputRecord", "RetryResult", "RetryStage", "TruncationRecord"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class InputRecord(BaseModel):
    """One prompt of a job. AlpacaEval files carry more keys (output, generator): they are ignored."""

    model_config = ConfigDict(extra="ignore")

    instruction: str
    id: str | None = Field(default=None, max_length=200)
    dataset: str | None = Field(default=None, max_length=200)
    system: str | None = None

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


class RetryStage(enum.StrEnum):
    ALL = "all"
    PROPOSERS = "proposers"
    AGGREGATOR = "aggregator"


class RetryResult(BaseModel):
    job_id: str
    items_reopened: int
    proposer_items: list[int]
    aggregator_items: list[int]
