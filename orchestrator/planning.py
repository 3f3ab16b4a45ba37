"""The memory plan of a recipe on one device: which models stay resident, which take turns, and how
much KV cache each gets.

Placement. Every model's `memory_gb` (weights + the KV cache it needs at least) must fit the budget
when it runs. The aggregator runs last for every item, so it is kept resident first if it fits beside
the largest model that swaps: then finished pools are aggregated while proposals go on. Proposers are
added to the resident set in order of use while the models left outside still fit, one at a time, in
the room that remains (the swap slot). A model outside the set is loaded (or woken) once per layer that
uses it, so a job costs about one load per swapped model per layer, not one per item.

Sizing. Each vLLM engine on a GPU also keeps `context_gb` beside its weights and KV cache (its CUDA
context and runtime buffers), and a sleeping engine keeps it too. The room left once the resident set
and every engine's context are counted is not left idle: the swap slot gets all of it, so each swapped
model's KV cache is the slot less its weights; with no model outside the set, the resident models share
what is left in proportion to the KV cache their recipe gives them. Engines are started with exactly
that KV cache (`planned_memory_gb` - `weights_gb`), so the device is full when the plan peaks.
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator.kv_cache import aggregator_passes, kv_bytes_per_token, kv_tokens, sequence_tokens
from orchestrator.recipes import Recipe, VllmModel

__all__ = ["CUDA_CONTEXT_GB", "FEW_SEQUENCES", "MemoryPlan", "ModelPlan", "plan_memory"]

# What a vLLM engine keeps on a GPU beside its weights and KV cache, awake or asleep: its CUDA
# context, the allocator's buffers and CUDA graphs. An estimate; the engine reports what it took.
CUDA_CONTEXT_GB = 1.0
# A KV cache that holds fewer of the model's longest sequences than this keeps its batches small.
FEW_SEQUENCES = 4


class ModelPlan(BaseModel):
    name: str
    memory_gb: float
    weights_gb: float | None
    # The KV cache the recipe's estimate gives (memory_gb - weights_gb), and the one the plan gives.
    kv_cache_gb: float | None
    planned_kv_gb: float | None = None
    # weights + planned KV cache: the memory the engine is started with.
    planned_memory_gb: float | None = None
    resident: bool
    used_in: list[str]
    kv_bytes_per_token: int | None = None
    kv_tokens: int | None = None
    # The model's longest sequence (instruction, pool read, new tokens) and how many fit the KV cache.
    sequence_tokens: int | None = None
    sequences: int | None = None


class MemoryPlan(BaseModel):
    budget_gb: float
    fits: bool
    problems: list[str]
    # The plan works, at a cost worth knowing (e.g. the aggregator swaps, so no item streams out early).
    warnings: list[str] = []
    models: list[ModelPlan]
    resident_gb: float
    swap_slot_gb: float
    # Per stage in order of use ("layer 0", ..., "aggregator"): the models loaded or woken for it.
    loads: list[tuple[str, list[str]]]
    context_gb: float = 0.0
    # Device memory at the plan's peak with the planned KV caches and every engine's context.
    peak_gb: float = 0.0
    # Aggregator generations per item (per turn): more than one for a sequential aggregation, whose
    # steps run one after the other on the model loaded for the first.
    aggregator_passes: int = 1

    @property
    def total_loads(self) -> int:
        return sum(len(models) for _, models in self.loads)

    def model(self, name: str) -> ModelPlan:
        return next(m for m in self.models if m.name == name)


def _stages(recipe: Recipe) -> list[tuple[str, list[str]]]:
    stages = []
    for index in range(len(recipe.layers)):
        models = list(dict.fromkeys(slot.model for slot in recipe.slots(index)))
        stages.append((f"layer {index}", models))
    stages.append(("aggregator", [recipe.aggregator.model]))
    return stages


def plan_memory(recipe: Recipe, budget_gb: float, *, context_gb: float = 0.0) -> MemoryPlan:
    """Plan residency and KV caches for `budget_gb` of device memory, each vLLM engine keeping
    `context_gb` beside them (0 on a CPU); `fits` is False with the reasons otherwise."""
    stages = _stages(recipe)
    order = list(dict.fromkeys(model for _, models in stages for model in models))
    problems = [
        f"models.{name}.memory_gb: needed to plan memory"
        for name in order
        if recipe.model(name).memory_gb is None
    ]
    if problems:
        return MemoryPlan(
            budget_gb=budget_gb,
            fits=False,
            problems=problems,
            models=[],
            resident_gb=0,
            swap_slot_gb=0,
            loads=[],
        )
    memory = {name: float(recipe.model(name).memory_gb or 0) for name in order}
    context = {name: context_gb if isinstance(recipe.model(name), VllmModel) else 0.0 for name in order}
    for name in order:
        if memory[name] > budget_gb:
            problems.append(f"{name} needs {memory[name]:g} GB alone, more than the {budget_gb:g} GB budget")
        elif memory[name] + context[name] > budget_gb:
            problems.append(
                f"{name} needs {memory[name]:g} GB and its engine's {context[name]:g} GB context alone, "
                f"more than the {budget_gb:g} GB budget"
            )

    def held(resident: list[str], outside: list[str]) -> float:
        """Device memory at the peak: the resident set awake, the largest outside model awake in the
        slot, and every engine's context (sleeping ones keep theirs)."""
        slot = max((memory[m] for m in outside), default=0.0)
        return sum(memory[m] for m in resident) + slot + sum(context[m] for m in (*resident, *outside))

    aggregator = recipe.aggregator.model
    resident: list[str] = []
    # The aggregator first, then proposers in order of use: each stays resident if the models left
    # outside can still take turns, one at a time, in the room that remains.
    for name in [aggregator, *order]:
        if name in resident:
            continue
        outside = [m for m in order if m not in resident and m != name]
        if held([*resident, name], outside) <= budget_gb:
            resident.append(name)
    outside = [m for m in order if m not in resident]
    resident_gb = sum(memory[m] for m in resident)
    slot_gb = max((memory[m] for m in outside), default=0.0)
    if not problems and held(resident, outside) > budget_gb:
        problems.append(
            f"the swap slot ({slot_gb:g} GB) does not fit beside the engines' contexts "
            f"({sum(context.values()):g} GB) in the {budget_gb:g} GB budget"
        )
    warnings = []
    if not problems and aggregator not in resident:
        largest = max((m for m in outside if m != aggregator), key=lambda m: memory[m], default=None)
        beside = f" beside {largest} ({memory[largest]:g} GB)" if largest else ""
        warnings.append(
            f"the aggregator {aggregator} ({memory[aggregator]:g} GB) does not fit{beside}: it takes "
            "turns too, so items finish only after the proposers' backlog is drained"
        )

    loads: list[tuple[str, list[str]]] = []
    loaded: set[str] = set()
    for stage, models in stages:
        # Resident models load once, at their first use; the others at every stage that uses them.
        due = [m for m in models if m not in resident or m not in loaded]
        loaded.update(due)
        loads.append((stage, due))
    planned = {} if problems else _planned_memory(recipe, budget_gb, memory, context, resident, outside)
    plans = []
    for name in order:
        spec = recipe.model(name)
        kv = memory[name] - spec.weights_gb if spec.weights_gb is not None else None
        plan = ModelPlan(
            name=name,
            memory_gb=memory[name],
            weights_gb=spec.weights_gb,
            kv_cache_gb=kv,
            resident=name in resident,
            used_in=[stage for stage, models in stages if name in models],
        )
        plans.append(_with_kv(plan, recipe, planned.get(name)))
        if plan.name in planned:
            warnings += _few_sequences(plans[-1])
    started = {m: planned.get(m, memory[m]) for m in order}
    peak = sum(started[m] for m in resident) + max((started[m] for m in outside), default=0.0)
    return MemoryPlan(
        budget_gb=budget_gb,
        fits=not problems,
        problems=problems,
        warnings=warnings,
        models=plans,
        resident_gb=resident_gb,
        swap_slot_gb=slot_gb,
        loads=loads,
        context_gb=context_gb,
        peak_gb=peak + sum(context.values()),
        aggregator_passes=len(aggregator_passes(recipe)),
    )


def _planned_memory(
    recipe: Recipe,
    budget_gb: float,
    memory: dict[str, float],
    context: dict[str, float],
    resident: list[str],
    outside: list[str],
) -> dict[str, float]:
    """Weights + KV cache each model with known weights is started with, filling the budget."""
    weights = {name: recipe.model(name).weights_gb for name in memory}
    sized = [name for name in memory if weights[name] is not None]
    fixed = sum(memory[m] + context[m] for m in resident) + sum(context[m] for m in outside)
    if outside:
        # The slot takes everything beside the resident set; resident models keep their estimate.
        slot = budget_gb - fixed
        return {m: (slot if m in outside else memory[m]) for m in sized}
    spare = budget_gb - fixed
    shares = {m: memory[m] - float(weights[m] or 0.0) for m in sized}
    total = sum(shares.values())
    return {m: memory[m] + spare * (shares[m] / total if total > 0 else 1 / len(sized)) for m in sized}


def _with_kv(plan: ModelPlan, recipe: Recipe, planned_memory: float | None) -> ModelPlan:
    """The plan of one model with its planned KV cache, in GB, tokens and concurrent sequences."""
    if planned_memory is None or plan.weights_gb is None:
        return plan
    kv = planned_memory - plan.weights_gb
    update: dict[str, float | int] = {"planned_memory_gb": planned_memory, "planned_kv_gb": kv}
    spec = recipe.model(plan.name)
    if isinstance(spec, VllmModel) and spec.architecture is not None:
        per_token = kv_bytes_per_token(spec.architecture, spec.dtype)
        tokens = kv_tokens(kv, per_token)
        length = sequence_tokens(recipe, plan.name)
        update |= {
            "kv_bytes_per_token": per_token,
            "kv_tokens": tokens,
            "sequence_tokens": length,
            "sequences": tokens // length,
        }
    return plan.model_copy(update=update)


def _few_sequences(plan: ModelPlan) -> list[str]:
    if plan.sequences is None or plan.sequences >= FEW_SEQUENCES:
        return []
    return [
        f"{plan.name}: its {plan.planned_kv_gb:g} GB KV cache holds {plan.sequences} of its longest "
        f"sequences ({plan.sequence_tokens} tokens) at once, so its batches stay small: give it more "
        "memory_gb"
    ]
