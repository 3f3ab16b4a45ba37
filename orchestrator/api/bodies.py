"""The API's contracts: request and response bodies, separate from the SQLAlchemy tables in `db`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from db.models import FINAL_JOB_STATUSES, Item, Job, JobKind, JobStatus, Output
from db.rows import JobCounts, steps_layer
from orchestrator.contracts import InputRecord, RetryResult, RetryStage
from orchestrator.inputs import InputFormat, map_items
from orchestrator.prompts import step_windows
from orchestrator.recipes import Recipe

__all__ = [
    "NOTICE_HEADER",
    "CandidatePublic",
    "EngineLoadsPublic",
    "HealthPublic",
    "ItemDetailPublic",
    "ItemPublic",
    "ItemsPublic",
    "JobCreate",
    "JobDetailPublic",
    "JobPublic",
    "JobUpload",
    "JobsPublic",
    "LayerPublic",
    "OutputPublic",
    "Problem",
    "ProgressPublic",
    "RecipePublic",
    "RecipesPublic",
    "RetryCreate",
    "RetryResult",
    "StagePublic",
]

# A response header with what a client should know beside the body (a job stored but not yet sent).
NOTICE_HEADER = "SlimMoA-Notice"

# Ids are Postgres BIGINTs.
MAX_ID = 2**63 - 1
ItemId = Annotated[int, Field(ge=1, le=MAX_ID)]


class Problem(BaseModel):
    """An error (RFC 9457 problem details); `errors` lists every problem found, with its field path."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[str] = []


class JobCreate(BaseModel):
    """A job as JSON: a recipe (by name, or inline) and its prompts."""

    model_config = ConfigDict(extra="forbid")

    recipe: str | dict[str, Any] = Field(
        description="A recipe name (see GET /v1/recipes) or a recipe object."
    )
    items: list[InputRecord] = Field(min_length=1)
    name: str | None = Field(default=None, max_length=200)
    priority: int = Field(default=0, ge=0, le=9, description="0 (lowest) to 9; recorded with the job.")
    fields: dict[str, str] | None = Field(
        default=None,
        description='Which key of the items holds each field: {"instruction": "prompt", "id": "uid"}.',
    )

    @model_validator(mode="before")
    @classmethod
    def _mapped(cls, data: object) -> object:
        return map_items(data)

    @field_validator("name")
    @classmethod
    def _name_storable(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("recipe", mode="before")
    @classmethod
    def _name_or_object(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if not isinstance(value, str | dict):
            raise ValueError("must be a recipe name or a recipe object")
        return value


class JobUpload(BaseModel):
    """A job as a multipart upload: a prompt file (JSONL, JSON list, Parquet or CSV) and a recipe name."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    recipe: str
    name: str | None = None
    priority: int = Field(default=0, ge=0, le=9)
    fields: str | None = Field(
        default=None, description='A JSON object: which column holds each field, {"instruction": "prompt"}.'
    )
    input_format: InputFormat | None = Field(default=None, description="Default: by the file name's suffix.")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str | None
    recipe_name: str
    status: JobStatus
    kind: JobKind = Field(
        default=JobKind.BULK, description="`bulk` for a submitted job, `chat` for a chat completion request."
    )
    priority: int
    total_items: int
    items_done: int
    items_succeeded: int
    items_degraded: int
    items_failed: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class StagePublic(BaseModel):
    """One stage of a job: `expected` rows when done, `finished` stored, `failed` recorded as failures.
    For `aggregator steps` (a sequential aggregator's intermediate steps) `expected` is the most there
    can be: a smaller pool takes fewer steps, and an `auto` aggregator steps only through pools that
    overflow its context."""

    stage: str
    layer: int | None
    expected: int
    finished: int
    failed: int
    turn: int | None = Field(
        default=None, description="The user turn (from 0) of a job with multi-turn items; null otherwise."
    )


class ProgressPublic(BaseModel):
    items: dict[str, int] = Field(description="Items by status.")
    stages: list[StagePublic]
    prompt_tokens: int
    output_tokens: int
    items_per_second: float | None = Field(description="Observed since the job started.")
    eta_seconds: float | None = Field(description="Time left at the observed rate; null until known.")
    latest_error: str | None = Field(
        default=None, description="The most recent stage failure (a candidate's or a failed item's)."
    )

    @classmethod
    def of(cls, job: Job, counts: JobCounts, now: datetime | None = None) -> ProgressPublic:
        recipe = Recipe.model_validate(job.recipe)
        turns = sorted(counts.items_per_turn) or [0]
        multi_turn = len(turns) > 1
        stages: list[StagePublic] = []
        for turn in turns:
            reaching = counts.items_per_turn.get(turn, job.total_items)
            stages += [
                StagePublic(
                    stage="proposers",
                    layer=layer,
                    expected=reaching * len(recipe.slots(layer)),
                    finished=counts.candidates.get((turn, layer), (0, 0))[0],
                    failed=counts.candidates.get((turn, layer), (0, 0))[1],
                    turn=turn if multi_turn else None,
                )
                for layer in range(len(recipe.layers))
            ]
            if recipe.aggregator.mode != "single":
                windows = step_windows(len(recipe.slots(len(recipe.layers) - 1)), recipe.aggregator.window)
                stages.append(
                    StagePublic(
                        stage="aggregator steps",
                        layer=None,
                        expected=reaching * (len(windows) - 1),
                        finished=counts.steps.get(turn, 0),
                        failed=0,
                        turn=turn if multi_turn else None,
                    )
                )
            # A turn's aggregator failures end the item; they are counted at the item's last turn.
            stages.append(
                StagePublic(
                    stage="aggregator",
                    layer=None,
                    expected=reaching,
                    finished=counts.answers.get(turn, 0) if multi_turn else counts.outputs,
                    failed=job.items_failed if turn == turns[-1] else 0,
                    turn=turn if multi_turn else None,
                )
            )
        rate = eta = None
        if job.started_at is not None and job.items_done:
            end = job.finished_at or now or datetime.now(UTC)
            elapsed = max((end - job.started_at).total_seconds(), 1e-6)
            rate = job.items_done / elapsed
            if job.status not in FINAL_JOB_STATUSES:
                eta = (job.total_items - job.items_done) / rate
        items = {
            status: counts.items.get(status, 0) for status in ("pending", "succeeded", "degraded", "failed")
        }
        return cls(
            items=items,
            stages=stages,
            prompt_tokens=counts.prompt_tokens,
            output_tokens=counts.output_tokens,
            items_per_second=rate,
            eta_seconds=eta,
            latest_error=counts.latest_error,
        )


class EngineLoadsPublic(BaseModel):
    """Model loads this job caused on inference workers; swaps are loads that evicted another model."""

    loads: int
    load_seconds: float
    swaps: int
    unload_seconds: float
    per_model: dict[str, int] = Field(description="Loads (or wakes) per model.")
    failed: dict[str, str] = Field(
        default_factory=dict, description="Models whose load failed, with the loader's latest message."
    )


class JobDetailPublic(JobPublic):
    progress: ProgressPublic
    engine: EngineLoadsPublic
    unserved_models: list[str] = Field(
        default=[],
        description="While the job runs: its models that no live inference worker serves (their stages "
        "wait until a worker with that model joins). Empty once the job has ended.",
    )


class ItemPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    position: int
    external_id: str | None
    dataset: str | None
    instruction: str
    system: str | None
    turns: list[str] | None = Field(
        default=None, description="The user turns of a multi-turn item (the instruction is the last)."
    )
    status: str
    error: str | None
    finished_at: datetime | None


class ItemsPublic(BaseModel):
    data: list[ItemPublic]
    count: int


class CandidatePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    slot: int
    model: str
    text: str | None
    error: str | None
    prompt_tokens: int | None
    output_tokens: int | None
    latency_ms: float | None
    finish_reason: str | None
    attempt: int
    worker: str | None = Field(default=None, description="The worker node that ran the stage.")


class LayerPublic(BaseModel):
    layer: int
    stage: Literal["proposers", "aggregator steps"] = Field(
        default="proposers",
        description="aggregator steps: a sequential aggregator's intermediate syntheses (slot = step), "
        "stored after the last proposer layer; the last step's is the output.",
    )
    turn: int = Field(default=0, description="The user turn the layer answers (0 for a one-turn item).")
    candidates: list[CandidatePublic]


class OutputPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    turn: int = 0
    model: str
    text: str
    pool_size: int
    prompt_tokens: int | None
    output_tokens: int | None
    latency_ms: float | None
    finish_reason: str | None
    worker: str | None = Field(default=None, description="The worker node that ran the aggregator.")


class ItemDetailPublic(ItemPublic):
    """An item with its whole candidate pool, turn by turn and layer by layer, and its output."""

    layers: list[LayerPublic]
    output: OutputPublic | None
    outputs: list[OutputPublic] = Field(
        default=[], description="Every turn's aggregated answer of a multi-turn item, in turn order."
    )
    truncation: list[Any] | None

    @classmethod
    def of(cls, item: Item, output: Output | None) -> ItemDetailPublic:
        layers: dict[tuple[int, int], list[CandidatePublic]] = {}
        for candidate in item.candidates:
            key = (candidate.turn, candidate.layer)
            layers.setdefault(key, []).append(CandidatePublic.model_validate(candidate))
        step_layer = steps_layer(item.job.recipe)
        return cls(
            **ItemPublic.model_validate(item).model_dump(),
            layers=[
                LayerPublic(
                    turn=t,
                    layer=k,
                    stage="aggregator steps" if k == step_layer else "proposers",
                    candidates=v,
                )
                for (t, k), v in sorted(layers.items())
            ],
            output=OutputPublic.model_validate(output) if output else None,
            outputs=[OutputPublic.model_validate(o) for o in item.outputs] if item.turns is not None else [],
            truncation=item.truncation,
        )


class RecipePublic(BaseModel):
    name: str
    description: str = ""
    models: dict[str, str] = Field(default={}, description="Model name -> engine.")
    layers: list[list[str]] = Field(default=[], description="Per layer, the model of every proposer slot.")
    aggregator: str | None = None
    min_pool: int | None = None
    error: str | None = Field(default=None, description="Why the recipe file cannot be used.")

    @classmethod
    def of(cls, recipe: Recipe) -> RecipePublic:
        return cls(
            name=recipe.name,
            description=recipe.description,
            models={name: spec.engine for name, spec in recipe.models.items()},
            layers=[[slot.model for slot in recipe.slots(li)] for li in range(len(recipe.layers))],
            aggregator=recipe.aggregator.model,
            min_pool=recipe.min_pool,
        )


class RecipesPublic(BaseModel):
    data: list[RecipePublic]
    count: int


class RetryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: RetryStage = RetryStage.ALL
    items: list[ItemId] | None = Field(default=None, description="Item ids; default: every failed one.")


class HealthPublic(BaseModel):
    status: str
    database: str
    broker: str
