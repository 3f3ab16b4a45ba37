"""KV-cache arithmetic: what one token costs a model, and how many tokens and sequences fit a room.

Per token a decoder keeps a key and a value per layer and KV head: 2 x layers x KV heads x head
dimension x bytes per element. Llama-3.1-70B (80 layers, 8 KV heads, head dimension 128, 16-bit):
327,680 bytes, about 0.33 MB a token. Decode throughput is made by batching many sequences at once, so
the memory plan reports how many of a model's longest sequences its KV cache holds together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.prompts import step_windows
from orchestrator.recipes import Architecture, Recipe

__all__ = [
    "BLOCK_TOKENS",
    "aggregator_passes",
    "architecture_from_config",
    "kv_bytes_per_token",
    "kv_tokens",
    "sequence_tokens",
]

# Bytes per element of the KV cache by the model's dtype: "auto" is 16-bit on a GPU (AWQ and GPTQ
# models compute in float16); vLLM CPU's float32 on CPUs without bf16 is 4.
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
# vLLM hands the KV cache out in blocks of this many tokens.
BLOCK_TOKENS = 16
# An instruction and its chat template, as the plan counts a sequence's length (AlpacaEval's are
# shorter on average; the long ones are those that fill the cache).
INSTRUCTION_TOKENS = 256
# Together MoA's aggregator prompt (92 words) and the numbering of the candidates.
REFERENCES_PROMPT_TOKENS = 160


def architecture_from_config(config: Mapping[str, Any]) -> Architecture:
    """The KV-cache counts of a Hugging Face `config.json`: a head's dimension is `head_dim` when the
    config says it, else the hidden size split over the attention heads; without
    `num_key_value_heads` every attention head has its own keys and values."""
    heads = int(config["num_attention_heads"])
    return Architecture(
        num_layers=int(config["num_hidden_layers"]),
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
    )


def kv_bytes_per_token(architecture: Architecture, dtype: str) -> int:
    """Bytes of KV cache one token takes: key and value, every layer and KV head."""
    return (
        2 * architecture.num_layers * architecture.num_kv_heads * architecture.head_dim * DTYPE_BYTES[dtype]
    )


def kv_tokens(kv_gb: float, bytes_per_token: int) -> int:
    """Tokens a KV cache of `kv_gb` GiB holds, in whole blocks."""
    blocks = int(kv_gb * 2**30) // (bytes_per_token * BLOCK_TOKENS)
    return max(blocks, 0) * BLOCK_TOKENS


def aggregator_passes(recipe: Recipe) -> list[int]:
    """The pool tokens each aggregator pass of an item reads, as the plan counts them (every candidate
    at its max_tokens): one pass over the whole pool, or one per step of a sequential aggregation, a
    step after the first also reading the running synthesis. `auto` steps when the pool overflows."""
    aggregator = recipe.aggregator
    pool = [slot.sampling.max_tokens for slot in recipe.slots(len(recipe.layers) - 1)]
    room = recipe.model(aggregator.model).context_length - aggregator.sampling.max_tokens
    overflows = INSTRUCTION_TOKENS + REFERENCES_PROMPT_TOKENS + sum(pool) > room
    if aggregator.mode == "single" or (aggregator.mode == "auto" and not overflows):
        return [sum(pool)]
    windows = step_windows(len(pool), aggregator.window)
    synthesis = aggregator.sampling.max_tokens
    return [sum(pool[i] for i in window) + (synthesis if step else 0) for step, window in enumerate(windows)]


def sequence_tokens(recipe: Recipe, model: str) -> int:
    """The longest sequence a model's stages make: the instruction, the pool it reads (later layers
    and the aggregator, whose longest pass counts) and its new tokens, at most its context length."""
    longest = 0
    for layer in range(len(recipe.layers)):
        for slot in recipe.slots(layer):
            if slot.model != model:
                continue
            pool = sum(earlier.sampling.max_tokens for earlier in recipe.slots(layer - 1)) if layer else 0
            prompt = INSTRUCTION_TOKENS + (REFERENCES_PROMPT_TOKENS + pool if pool else 0)
            longest = max(longest, prompt + slot.sampling.max_tokens)
    if recipe.aggregator.model == model:
        prompt = INSTRUCTION_TOKENS + REFERENCES_PROMPT_TOKENS + max(aggregator_passes(recipe))
        longest = max(longest, prompt + recipe.aggregator.sampling.max_tokens)
    return min(longest, recipe.model(model).context_length)
