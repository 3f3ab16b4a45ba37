"""The plan fills the device: KV caches sized to the room each placement leaves, in tokens and
sequences from the models' own layer, KV-head and head-dimension counts; engines get that size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.kv_cache import architecture_from_config, kv_bytes_per_token, kv_tokens, sequence_tokens
from orchestrator.planning import plan_memory
from orchestrator.recipes import VllmModel, load_recipe, parse_recipe
from orchestrator.settings import PROJECT_ROOT, get_settings
from workers.engine_sizing import device_context_gb, planned_spec
from workers.engines.vllm_engine import engine_args

RECIPES = PROJECT_ROOT / "recipes"

# The fields of each model's config.json that size its KV cache (Hugging Face, as published).
CONFIGS = {
    "llama-3.1-70b": {
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
    },
    "qwen2.5-72b": {
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
    },
    "nemotron-70b": {
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
    },
    # Gemma-2 states its head dimension: 256, not hidden_size / heads (224).
    "gemma-2-9b-it-simpo": {
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_size": 3584,
        "head_dim": 256,
    },
}


def vllm_spec(recipe_name: str, model: str) -> VllmModel:
    spec = load_recipe(recipe_name, RECIPES).model(model)
    assert isinstance(spec, VllmModel)
    return spec


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_the_recipe_states_each_models_config_counts(model: str) -> None:
    assert vllm_spec("slimmoa-a100", model).architecture == architecture_from_config(CONFIGS[model])


def test_the_embedded_recipe_states_its_models_config_counts() -> None:
    config = get_settings().model_cache_dir / "smollm2" / "config.json"
    if not config.is_file():
        pytest.skip("the embedded model is not prepared (make model)")
    found = architecture_from_config(json.loads(config.read_text()))
    assert vllm_spec("embedded", "smollm2").architecture == found


def test_bytes_per_token_from_layers_heads_and_dimension() -> None:
    llama = architecture_from_config(CONFIGS["llama-3.1-70b"])
    # key + value, 80 layers, 8 KV heads of 128, two bytes each: about 0.33 MB a token.
    assert kv_bytes_per_token(llama, "bfloat16") == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(llama, "float32") == 655_360
    gemma = architecture_from_config(CONFIGS["gemma-2-9b-it-simpo"])
    assert kv_bytes_per_token(gemma, "bfloat16") == 2 * 42 * 8 * 256 * 2
    # Whole blocks of 16 tokens: 1 GiB of Llama's KV holds 3,276.8 tokens, so 204 blocks.
    assert kv_tokens(1.0, 327_680) == 204 * 16


def test_on_80_gb_the_swap_slot_takes_every_gb_beside_the_aggregator() -> None:
    recipe = load_recipe("slimmoa-a100", RECIPES)
    plan = plan_memory(recipe, 80, context_gb=1.0)
    assert plan.fits
    # The aggregator (22 GB) and four engine contexts (1 GB each, sleeping ones too) leave 54 GB.
    slot = 80 - 22 - 4 * 1.0
    planned = {m.name: m for m in plan.models}
    for name, weights in (("llama-3.1-70b", 37.5), ("qwen2.5-72b", 39.5), ("nemotron-70b", 37.5)):
        model = planned[name]
        assert (model.planned_memory_gb, model.planned_kv_gb) == (slot, slot - weights)
        per_token = 2 * 80 * 8 * 128 * 2
        tokens = int((slot - weights) * 2**30) // (per_token * 16) * 16
        assert (model.kv_bytes_per_token, model.kv_tokens) == (per_token, tokens)
        # A proposer's longest sequence: the instruction (256) and 2,048 new tokens.
        assert model.sequence_tokens == 256 + 2048
        assert model.sequences == tokens // 2304
    assert planned["llama-3.1-70b"].kv_tokens == 54_064, "16.5 GB instead of 6.5: ~54k tokens, not ~21k"
    aggregator = planned["gemma-2-9b-it-simpo"]
    assert aggregator.planned_kv_gb == 3.5, "resident models keep what the recipe gives them"
    assert aggregator.kv_tokens == int(3.5 * 2**30) // (2 * 42 * 8 * 256 * 2 * 16) * 16
    assert aggregator.sequences == 1 and aggregator.sequence_tokens == 8192
    assert any("gemma-2-9b-it-simpo: its 3.5 GB KV cache holds 1" in w for w in plan.warnings)
    assert plan.peak_gb == 80


def test_with_everything_resident_the_spare_room_is_shared_by_kv_cache() -> None:
    recipe = parse_recipe(
        {
            "name": "roomy",
            "models": {
                "a": {"engine": "vllm", "weights": "/m/a", "memory_gb": 10, "weights_gb": 6},
                "b": {"engine": "vllm", "weights": "/m/b", "memory_gb": 5, "weights_gb": 4},
            },
            "layers": [{"proposers": [{"model": "a"}]}],
            "aggregator": {"model": "b"},
        }
    )
    plan = plan_memory(recipe, 20, context_gb=0.5)
    assert all(m.resident for m in plan.models)
    # 20 - 15 - 2 contexts = 4 GB spare, shared 4:1 as the recipe's KV caches (4 and 1 GB) are.
    assert {m.name: m.planned_kv_gb for m in plan.models} == {
        "a": pytest.approx(7.2),
        "b": pytest.approx(1.8),
    }
    assert plan.peak_gb == pytest.approx(20)
    assert sequence_tokens(recipe, "b") == 256 + 160 + 512 + 4096


def test_the_plan_command_prints_kv_tokens_and_sequences() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "slimmoa-a100", "--gpu-memory-gb", "80"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "220", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "│ 6.5 → 16.5  │ 0.328 MB     │ 54,064    │ 23 x 2,304 tokens │ swaps" in result.stdout
    assert "peak 80 of 80 GB with 4 engine contexts of 1 GB" in result.stdout


def test_engines_are_started_with_the_planned_kv_cache() -> None:
    recipe = load_recipe("slimmoa-a100", RECIPES)
    spec = planned_spec(recipe, "qwen2.5-72b", 80)
    assert isinstance(spec, VllmModel)
    # The slot beside the 22 GB aggregator and four engines' contexts (none on a CPU).
    assert spec.memory_gb == 80 - 22 - 4 * device_context_gb()
    args = engine_args("qwen2.5-72b", spec, "/models/qwen", on_cpu=False)
    assert args["kv_cache_memory_bytes"] == int((spec.memory_gb - 39.5) * 2**30)
    assert "gpu_memory_utilization" not in args and args["enable_sleep_mode"]
    assert planned_spec(recipe, "qwen2.5-72b", None) is recipe.model("qwen2.5-72b"), "no budget: as written"
    # Without a plan (no budget), the recipe's own KV cache: memory_gb - weights_gb.
    unplanned = engine_args("qwen2.5-72b", vllm_spec("slimmoa-a100", "qwen2.5-72b"), "/m", on_cpu=False)
    assert unplanned["kv_cache_memory_bytes"] == int(4.5 * 2**30)
