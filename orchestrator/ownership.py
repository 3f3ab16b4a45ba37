"""Which models an inference worker serves: `slimmoa worker --models` (or WORKER_MODELS).

A second GPU host joins by starting a worker with its model list against the same Redis and Postgres;
its affinity scheduler consumes only those models' queues (`workers.affinity`), so every stage runs on
a worker that holds its model, and the other hosts never load it.

An entry of the list is a model name (`llama-3.1-70b`), a glob (`gemma-*`), or the name of a recipe
(`slimmoa-a100`, or a path to its YAML file), which stands for the models that recipe defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from orchestrator.errors import RecipeError
from orchestrator.recipes import load_recipe

__all__ = ["EVERY_MODEL", "ModelSelection", "SelectionError"]

_GLOB = frozenset("*?[")


class SelectionError(ValueError):
    """A model list that names nothing, or a recipe that does not load; the message says which."""


@dataclass(frozen=True)
class ModelSelection:
    """Model names and globs; no patterns means every model (a worker without a list)."""

    patterns: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not self.patterns

    def serves(self, model: str) -> bool:
        return self.everything or any(fnmatchcase(model, pattern) for pattern in self.patterns)

    def describe(self) -> str:
        return ", ".join(self.patterns) if self.patterns else "every model"

    @classmethod
    def parse(cls, spec: str, recipes_dir: Path) -> ModelSelection:
        """Read a comma-separated list; recipe names become the models their recipe defines."""
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        if not entries:
            if spec.strip():
                raise SelectionError(f"model list {spec!r} names no model")
            return EVERY_MODEL
        patterns: list[str] = []
        for entry in entries:
            for pattern in _expand(entry, recipes_dir):
                if pattern not in patterns:
                    patterns.append(pattern)
        return cls(tuple(patterns))


def _expand(entry: str, recipes_dir: Path) -> list[str]:
    if _GLOB & set(entry):
        return [entry]
    path = Path(entry)
    is_recipe = (recipes_dir / f"{entry}.yaml").is_file() or (
        path.suffix in (".yaml", ".yml") and path.is_file()
    )
    if not is_recipe:
        return [entry]
    try:
        recipe = load_recipe(entry, recipes_dir)
    except RecipeError as exc:
        raise SelectionError(f"model list entry {entry!r}: {exc}") from None
    return sorted(recipe.models)


EVERY_MODEL = ModelSelection()
