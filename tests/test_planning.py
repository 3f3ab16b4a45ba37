"""`slimmoa plan`: the memory plan of a recipe on one device."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.planning import plan_memory
from orchestrator.recipes import load_recipe, parse_recipe
from orchestrator.settings import PROJECT_ROOT

RECIPES = PROJECT_ROOT / "recipes"


def test_a100_plan_keeps_the_aggregator_resident_and_swaps_proposers() -> None:
    plan = plan_memory(load_recipe("slimmoa-a100", RECIPES), 80)
    assert plan.fits and plan.problems == []
    placement = {m.name: m.resident for m in plan.models}
    assert placement == {
        "llama-3.1-70b": False,
        "qwen2.5-72b": False,
        "nemotron-70b": False,
        "gemma-2-9b-it-simpo": True,
    }
    assert (plan.resident_gb, plan.swap_slot_gb) == (22, 44)
    assert plan.loads == [
        ("layer 0", ["llama-3.1-70b", "qwen2.5-72b", "nemotron-70b"]),
        ("aggregator", ["gemma-2-9b-it-simpo"]),
    ]
    assert {m.name: m.kv_cache_gb for m in plan.models}["gemma-2-9b-it-simpo"] == 3.5


def test_a_bigger_device_keeps_a_proposer_resident() -> None:
    plan = plan_memory(load_recipe("slimmoa-a100", RECIPES), 141)
    assert [m.name for m in plan.models if m.resident] == ["llama-3.1-70b", "gemma-2-9b-it-simpo"]


def test_two_layers_swap_once_per_layer_not_per_item() -> None:
    recipe = parse_recipe(
        {
            "name": "two-layers",
            "models": {
                "a": {"engine": "synthetic", "memory_gb": 10},
                "b": {"engine": "synthetic", "memory_gb": 10},
                "agg": {"engine": "synthetic", "memory_gb": 5},
            },
            "layers": [{"proposers": [{"model": "a"}, {"model": "b"}]}] * 2,
            "aggregator": {"model": "agg"},
        }
    )
    plan = plan_memory(recipe, 20)
    assert [m.name for m in plan.models if m.resident] == ["agg"]
    assert plan.loads == [("layer 0", ["a", "b"]), ("layer 1", ["a", "b"]), ("aggregator", ["agg"])]
    assert plan.total_loads == 5
    roomy = plan_memory(recipe, 25)
    assert all(m.resident for m in roomy.models)
    assert roomy.loads == [("layer 0", ["a", "b"]), ("layer 1", []), ("aggregator", ["agg"])]


def plan_cli(gpu_memory_gb: int) -> subprocess.CompletedProcess[str]:
    command = ["plan", "slimmoa-a100", "--gpu-memory-gb", str(gpu_memory_gb)]
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *command],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_on_a_smaller_device_the_aggregator_takes_turns_too() -> None:
    plan = plan_memory(load_recipe("slimmoa-a100", RECIPES), 60)
    assert plan.fits and not any(m.resident for m in plan.models)
    assert (plan.resident_gb, plan.swap_slot_gb, plan.total_loads) == (0, 44, 4)
    assert plan.warnings == [
        "the aggregator gemma-2-9b-it-simpo (22 GB) does not fit beside llama-3.1-70b (44 GB): it takes "
        "turns too, so items finish only after the proposers' backlog is drained"
    ]


def test_plan_explains_why_a_recipe_does_not_fit() -> None:
    result = plan_cli(40)
    assert result.returncode == 1
    assert "llama-3.1-70b needs 44 GB alone, more than the 40 GB budget" in result.stderr
    missing = plan_memory(load_recipe("synthetic", RECIPES), 80)
    assert not missing.fits and "models.synth-a.memory_gb: needed to plan memory" in missing.problems


def test_plan_command_prints_the_plan() -> None:
    result = plan_cli(80)
    assert result.returncode == 0, result.stderr
    assert "peak: 66 of 80 GB" in result.stdout
    assert "layer 0: load llama-3.1-70b, qwen2.5-72b, nemotron-70b" in result.stdout
    assert "loads per job: 4" in result.stdout
