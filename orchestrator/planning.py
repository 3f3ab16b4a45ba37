"""The memory plan of a recipe on one device: which models stay resident, which take turns.

Every model's `memory_gb` (weights + KV cache) must fit the budget when it runs. The aggregator runs
last for every item, so it is kept resident first if it fits beside the largest model that swaps:
then finished pools are aggregated while proposals go on. Proposers are added to the resident set in
order of use while the models left outside still fit, one at a time, in the room that remains (the
swap slot). A model outside the set is loaded (or woken)
once per layer that uses it, so a job costs about one load per swapped model per layer, not one per item.
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator.recipes import Recipe

__all__ = ["MemoryPlan", "ModelPlan", "plan_memory"]


class ModelPlan(BaseModel):
    name: str
    memory_gb: float
    weights_gb: float | None
    kv_cache_gb: float | None
    resident: bool
    used_in: list[str]


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

    @property
    def total_loads(self) -> int:
        return sum(len(models) for _, models in self.loads)


def _stages(recipe: Recipe) -> list[tuple[str, list[str]]]:
    stages = []
    for index in range(len(recipe.layers)):
        models = list(dict.fromkeys(slot.model for slot in recipe.slots(index)))
        stages.append((f"layer {index}", models))
    stages.append(("aggregator", [recipe.aggregator.model]))
    return stages


def plan_memory(recipe: Recipe, budget_gb: float) -> MemoryPlan:
    """Plan residency for `budget_gb` of device memory; `fits` is False with the reasons otherwise."""
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
    for name in order:
        if memory[name] > budget_gb:
            problems.append(f"{name} needs {memory[name]:g} GB alone, more than the {budget_gb:g} GB budget")

    aggregator = recipe.aggregator.model
    resident: list[str] = []
    # The aggregator first, then proposers in order of use: each stays resident if the models left
    # outside can still take turns, one at a time, in the room that remains.
    for name in [aggregator, *order]:
        if name in resident:
            continue
        outside = [m for m in order if m not in resident and m != name]
        slot = max((memory[m] for m in outside), default=0.0)
        if sum(memory[m] for m in resident) + memory[name] + slot <= budget_gb:
            resident.append(name)
    outside = [m for m in order if m not in resident]
    resident_gb = sum(memory[m] for m in resident)
    slot_gb = max((memory[m] for m in outside), default=0.0)
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
    plans = []
    for name in order:
        spec = recipe.model(name)
        kv = memory[name] - spec.weights_gb if spec.weights_gb is not None else None
        used = [stage for stage, models in stages if name in models]
        plans.append(
            ModelPlan(
                name=name,
                memory_gb=memory[name],
                weights_gb=spec.weights_gb,
                kv_cache_gb=kv,
                resident=name in resident,
                used_in=used,
            )
        )
    return MemoryPlan(
        budget_gb=budget_gb,
        fits=not problems,
        problems=problems,
        warnings=warnings,
        models=plans,
        resident_gb=resident_gb,
        swap_slot_gb=slot_gb,
        loads=loads,
    )
