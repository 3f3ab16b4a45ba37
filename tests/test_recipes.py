"""Recipes: the shipped ones load, and invalid ones fail at load with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import RecipeError
from orchestrator.recipes import VllmModel, available_recipes, load_recipe, parse_recipe
from orchestrator.settings import PROJECT_ROOT

RECIPES = PROJECT_ROOT / "recipes"


def base_recipe(**overrides: object) -> dict[str, object]:
    recipe: dict[str, object] = {
        "name": "t",
        "models": {
            "a": {"engine": "synthetic"},
            "b": {"engine": "synthetic"},
        },
        "layers": [{"proposers": [{"model": "a"}, {"model": "b"}]}],
        "aggregator": {"model": "b"},
    }
    recipe.update(overrides)
    return recipe


def test_shipped_recipes_load() -> None:
    assert {"embedded", "synthetic", "slimmoa-a100"} <= set(available_recipes(RECIPES))
    embedded = load_recipe("embedded", RECIPES)
    assert [s.model for s in embedded.slots(0)] == ["smollm2"] * 3
    assert len({(s.sampling.seed, s.sampling.temperature) for s in embedded.slots(0)}) == 3

    a100 = load_recipe("slimmoa-a100", RECIPES)
    proposers = [a100.model(s.model) for s in a100.slots(0)]
    assert all(isinstance(m, VllmModel) and m.quantization for m in proposers)
    assert len({m.vendor for m in proposers}) == 3, "proposers come from different vendors"
    assert a100.aggregator.sampling.temperature == 0.5
    assert a100.aggregator.sampling.max_tokens == 4096


def test_self_moa_is_one_model_sampled_k_times() -> None:
    recipe = parse_recipe(
        base_recipe(layers=[{"proposers": [{"model": "a", "samples": 4, "sampling": {"seed": 10}}]}])
    )
    slots = recipe.slots(0)
    assert [s.slot for s in slots] == [0, 1, 2, 3]
    assert {s.model for s in slots} == {"a"}
    assert [s.sampling.seed for s in slots] == [10, 11, 12, 13]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"layers": [{"proposers": [{"model": "a"}, {"model": "zz"}]}]},
            "layers[0].proposers[1].model: unknown model 'zz'",
        ),
        ({"aggregator": {"model": "nope"}}, "aggregator.model: unknown model 'nope'"),
        (
            {"layers": [{"proposers": [{"model": "a", "sampling": {"temperature": 3}}]}]},
            "layers.0.proposers.0.sampling.temperature: Input should be less than or equal to 2",
        ),
        ({"min_pool": 3}, "min_pool: 3 exceeds the 2 candidates of layer 0"),
        ({"layers": []}, "layers: List should have at least 1 item"),
        ({"models": {"a": {"engine": "tpu"}}}, "models.a: Input tag 'tpu' found using 'engine'"),
        (
            {"models": {"a": {"engine": "vllm", "weights": "embedded:llama"}, "b": {"engine": "synthetic"}}},
            "models.a.vllm.weights: unknown embedded model 'llama'",
        ),
        ({"extra_field": 1}, "extra_field: Extra inputs are not permitted"),
    ],
)
def test_invalid_recipes_name_the_field(overrides: dict[str, object], expected: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(base_recipe(**overrides), source="inline")
    assert f"inline: {expected}" in str(caught.value)


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(RecipeError, match=r"recipe 'nope': not found .*known recipes: .*embedded"):
        load_recipe("nope", RECIPES)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodels:\n  a: {engine: synthetic\nlayers: []\n")
    with pytest.raises(RecipeError, match=rf"{path}:\d+: invalid YAML"):
        load_recipe(path, RECIPES)


def test_field_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "models: {a: {engine: synthetic}}\n"
        "layers: [{proposers: [{model: a, sampling: {max_tokens: 0}}]}]\n"
        "aggregator: {model: a}\n"
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, RECIPES)
    assert f"{path}: layers.0.proposers.0.sampling.max_tokens: Input should be greater than 0" in str(
        caught.value
    )
