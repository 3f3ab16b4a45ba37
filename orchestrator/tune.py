"""Choosing a recipe from a model zoo by measurement, the way SlimMoA's ablations were run by hand.

A zoo (YAML) names candidate models by their recipe specs, which of them aggregate, and the sampling
of every recipe built from it. `slimmoa tune` runs each proposer alone, judges the solo answers
against the reference, measures how different the models' answers are, builds a few candidate recipes
by the rule below, runs and judges those, and ranks everything by LC win rate. Every run is an
ordinary job whose idempotency key derives from its request, and every score an ordinary evaluation,
so tuning again with the same inputs finds them instead of generating again.

The rule (`choose_candidates`), with the proposers ranked by their solo score (LC win rate, or the
win rate when there is none), for every aggregator in the zoo's order:

- `diverse`: down the ranking, take a model unless it shares its `vendor` with one already taken or its
  answers are closer (cosine distance) than `min_distance` to a taken one's, until `proposers` are taken;
- `self`: Self-MoA, the best model sampled `proposers` times;
- `top`: the `proposers` best models whatever their sources, only where it differs from `diverse`.

A model alone (`solo`) is the recipe where it proposes once and aggregates its own answer: every job
ends with an aggregator. The budget keeps candidates in the rule's order (every aggregator's
`diverse`, then `self`, then `top`) while their generations fit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.contracts import InputRecord
from orchestrator.errors import InvalidInput, RecipeError
from orchestrator.planning import plan_memory
from orchestrator.recipes import (
    AggregatorSpec,
    ModelSpec,
    Recipe,
    SamplingSpec,
    format_validation_error,
    parse_recipe,
)
from orchestrator.submission import Submission

__all__ = [
    "Candidate",
    "Zoo",
    "check_solo_budget",
    "choose_candidates",
    "generations",
    "idempotency_key",
    "load_zoo",
    "plan_summary",
    "ranked",
    "recipe_yaml",
    "sample_records",
    "score",
    "solo_candidates",
    "within_budget",
]


class ZooSampling(BaseModel):
    """The sampling of every recipe built from the zoo: its proposers' and its aggregator's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    proposers: SamplingSpec = SamplingSpec()
    aggregator: SamplingSpec = AggregatorSpec.model_fields["sampling"].default


class Zoo(BaseModel):
    """Candidate models (recipe model specs), which of them propose and which aggregate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    models: dict[str, ModelSpec] = Field(min_length=1)
    aggregators: list[str] = Field(min_length=1)
    # Default: every model that is not an aggregator.
    proposers: list[str] = []
    sampling: ZooSampling = ZooSampling()
    min_pool: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _proposers_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("proposers"):
            aggregators = data.get("aggregators") or []
            data = {
                **data,
                "proposers": [name for name in data.get("models") or {} if name not in aggregators],
            }
        return data

    @model_validator(mode="after")
    def _names_are_models(self) -> Zoo:
        if not self.proposers:
            raise ValueError("proposers: every model is an aggregator; list the proposers")
        for field in ("aggregators", "proposers"):
            for index, name in enumerate(getattr(self, field)):
                if name not in self.models:
                    raise ValueError(
                        f"{field}[{index}]: unknown model {name!r} (zoo models: {', '.join(self.models)})"
                    )
        return self


def load_zoo(path: Path) -> Zoo:
    """Read a zoo file; RecipeError names the field that is wrong. Its name defaults to the file's."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"zoo {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"zoo {path}: a zoo is a YAML mapping, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        return Zoo.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, str(path))) from exc


@dataclass(frozen=True)
class Candidate:
    """A recipe to measure and the rule that chose it (`solo`, `diverse`, `self`, `top`)."""

    rule: str
    recipe: Recipe

    @property
    def proposers(self) -> str:
        """Who proposes, as the table shows it: `a, b, c`, or `a x3` for Self-MoA."""
        specs = self.recipe.layers[0].proposers
        return ", ".join(p.model + (f" x{p.samples}" if p.samples > 1 else "") for p in specs)

    @property
    def aggregator(self) -> str:
        return self.recipe.aggregator.model


def _recipe(zoo: Zoo, rule: str, label: str, proposers: list[tuple[str, int]], aggregator: str) -> Candidate:
    used = dict.fromkeys([*(model for model, _ in proposers), aggregator])
    slots = sum(samples for _, samples in proposers)
    data: dict[str, Any] = {
        "name": f"{zoo.name}-{rule}-{label}",
        "description": f"slimmoa tune of {zoo.name}: rule {rule}",
        "models": {name: zoo.models[name] for name in used},
        "layers": [
            {
                "proposers": [
                    {"model": model, "samples": samples, "sampling": zoo.sampling.proposers}
                    for model, samples in proposers
                ]
            }
        ],
        "aggregator": {"model": aggregator, "sampling": zoo.sampling.aggregator},
        "min_pool": min(zoo.min_pool, slots),
    }
    return Candidate(rule, parse_recipe(data, source=f"zoo {zoo.name}"))


def solo_candidates(zoo: Zoo) -> list[Candidate]:
    """Every proposer alone: it proposes once and aggregates its own answer."""
    return [_recipe(zoo, "solo", model, [(model, 1)], model) for model in zoo.proposers]


def _too_close(
    zoo: Zoo, model: str, taken: list[str], distances: dict[frozenset[str], float], least: float
) -> bool:
    vendor = zoo.models[model].vendor
    if vendor is not None and any(zoo.models[other].vendor == vendor for other in taken):
        return True
    return any(distances.get(frozenset((model, other)), least) < least for other in taken)


def choose_candidates(
    zoo: Zoo,
    ranking: Sequence[str],
    distances: dict[frozenset[str], float],
    *,
    proposers: int,
    min_distance: float = 0.0,
) -> list[Candidate]:
    """The candidate recipes by the module's rule, from the proposers best first and the distance
    between every two models' answers; a recipe two rules build is listed once, by the first."""
    diverse: list[str] = []
    for model in ranking:
        if len(diverse) < proposers and not _too_close(zoo, model, diverse, distances, min_distance):
            diverse.append(model)
    rules = [
        ("diverse", [(model, 1) for model in diverse]),
        ("self", [(ranking[0], proposers)]),
        ("top", [(model, 1) for model in ranking[:proposers]]),
    ]
    chosen: list[Candidate] = []
    seen: set[tuple[tuple[tuple[str, int], ...], str]] = set()
    for rule, pool in rules:
        for aggregator in zoo.aggregators:
            key = (tuple(pool), aggregator)
            if key not in seen:
                seen.add(key)
                chosen.append(_recipe(zoo, rule, aggregator, pool, aggregator))
    return chosen


def generations(recipe: Recipe, items: int) -> int:
    """Generations a job of the recipe runs: every proposer slot of every layer and one aggregation,
    per item."""
    slots = sum(len(recipe.slots(layer)) for layer in range(len(recipe.layers)))
    return (slots + 1) * items


def within_budget(
    candidates: Sequence[Candidate], items: int, budget: int | None
) -> tuple[list[Candidate], list[Candidate]]:
    """The candidates kept in order while their generations fit the budget, and those left out."""
    if budget is None:
        return list(candidates), []
    kept, dropped, spent = [], [], 0
    for candidate in candidates:
        cost = generations(candidate.recipe, items)
        if spent + cost <= budget:
            kept.append(candidate)
            spent += cost
        else:
            dropped.append(candidate)
    return kept, dropped


def check_solo_budget(solos: Sequence[Candidate], items: int, budget: int | None) -> int:
    """Generations the solo runs need; InvalidInput when they alone exceed the budget."""
    needed = sum(generations(c.recipe, items) for c in solos)
    if budget is not None and needed > budget:
        raise InvalidInput(
            f"--max-generations {budget}: the solo runs alone need {needed} generations "
            f"({len(solos)} models x 2 x {items} prompts); sample fewer prompts or raise the budget"
        )
    return needed


def sample_records(records: Sequence[InputRecord], size: int | None, seed: int) -> list[InputRecord]:
    """`size` records drawn with the seed, in file order (all of them without a size)."""
    if size is None or size >= len(records):
        return list(records)
    picked = sorted(random.Random(seed).sample(range(len(records)), size))
    return [records[index] for index in picked]


def idempotency_key(submission: Submission) -> str:
    """The same recipe on the same prompts is the same job: tuning again finds it."""
    return f"tune-{submission.digest()}"


def score(summary: dict[str, Any] | None) -> float | None:
    """What tuning ranks by: the LC win rate, or the win rate when the LC fit has none."""
    if not summary:
        return None
    value = summary.get("lc_win_rate")
    if value is None:
        value = summary.get("win_rate")
    return None if value is None else float(value)


def ranked(summaries: Sequence[dict[str, Any] | None]) -> list[int]:
    """Indices of the evaluations' summaries best first: by score, then win rate; unscored ones last,
    in their order."""

    def key(index: int) -> tuple[bool, float, float, int]:
        value = score(summaries[index])
        win = float((summaries[index] or {}).get("win_rate") or 0.0)
        return (value is None, -(value or 0.0), -win, index)

    return sorted(range(len(summaries)), key=key)


def plan_summary(recipe: Recipe, gpu_memory_gb: float, context_gb: float) -> str:
    """One line of `slimmoa plan` for the recipe: peak memory and loads, or why it does not fit."""
    memory_plan = plan_memory(recipe, gpu_memory_gb, context_gb=context_gb)
    if memory_plan.fits:
        return f"{memory_plan.peak_gb:.4g}/{gpu_memory_gb:g} GB, loads: {memory_plan.total_loads}"
    if any("memory_gb: needed" in problem for problem in memory_plan.problems):
        return "unknown (no memory_gb)"
    return f"does not fit: {memory_plan.problems[0]}"


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a file `slimmoa run --recipe FILE` reads back to the same recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
