"""Where stage tasks go: per model, one queue for its proposals and one for its aggregations.

An inference worker consumes the queues of the models it holds and swaps a model in only when those
are drained (`workers.affinity`), so a job whose models do not all fit costs about one load per model
per layer instead of one per item. Aggregations have queues of their own: the broker serves a worker's
queues in turn, so items whose pools are complete finish while proposals of later items still wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.recipes import Recipe
from orchestrator.settings import get_settings

__all__ = ["ModelQueues", "aggregator_queue", "model_queues", "proposer_queue"]


def proposer_queue(model: str) -> str:
    return f"{get_settings().queue_inference}.{model}"


def aggregator_queue(model: str) -> str:
    return f"{get_settings().queue_inference}.{model}.aggregate"


@dataclass(frozen=True)
class ModelQueues:
    """A model's queues and the device memory it needs (0 when unknown or not on this device)."""

    model: str
    memory_gb: float
    proposals: str
    aggregations: str

    @property
    def queues(self) -> tuple[str, str]:
        return (self.proposals, self.aggregations)


def model_queues(recipes: list[Recipe]) -> dict[str, ModelQueues]:
    """The queues of every model the recipes use; a name defined twice counts its larger estimate."""
    found: dict[str, ModelQueues] = {}
    for recipe in recipes:
        used = {s.model for layer in range(len(recipe.layers)) for s in recipe.slots(layer)}
        used.add(recipe.aggregator.model)
        for name in used:
            memory = float(recipe.model(name).memory_gb or 0.0)
            known = found.get(name)
            if known is None or memory > known.memory_gb:
                found[name] = ModelQueues(name, memory, proposer_queue(name), aggregator_queue(name))
    return found
