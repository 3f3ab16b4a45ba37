"""The prompt builder: Together MoA's aggregator prompt, both template kinds, layers, fair truncation."""

from __future__ import annotations

import pytest

from orchestrator.errors import PromptTooLong
from orchestrator.prompts import (
    aggregator_prompt,
    build_stage_prompt,
    fit_references,
    supports_system_role,
)
from orchestrator.settings import PROJECT_ROOT
from workers.engines.synthetic import WordTokenizer

# SmolLM2-Instruct's ChatML template (system role allowed).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma-2-it's template: raises on a system message.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# A template that silently ignores system messages also has no system role.
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
)

TOKENS = WordTokenizer()
POOL = ["Paris is the capital.", "The capital of France is Paris.", "Lyon."]


def test_aggregator_prompt_is_together_moa_verbatim() -> None:
    shipped = (PROJECT_ROOT / "orchestrator" / "data" / "together_moa_aggregator_prompt.txt").read_text()
    assert aggregator_prompt() == shipped.rstrip()
    assert aggregator_prompt().startswith("You have been provided with a set of responses from various")
    assert aggregator_prompt().endswith("Responses from models:")
    shared = PROJECT_ROOT.parent / "shared" / "data" / "together_moa_aggregator_prompt.txt"
    if shared.is_file():
        assert shipped == shared.read_text()


def test_system_role_is_read_from_the_template() -> None:
    assert supports_system_role(CHATML) is True
    assert supports_system_role(GEMMA2) is False
    assert supports_system_role(DROPS_SYSTEM) is False


def test_aggregator_prompt_goes_into_the_system_message() -> None:
    prompt = build_stage_prompt(
        "What is the capital of France?",
        references=POOL,
        context_length=4096,
        max_tokens=256,
        tokenizer=TOKENS,
    )
    system, user = prompt.messages
    assert system.role == "system"
    assert system.content == (
        aggregator_prompt() + "\n1. Paris is the capital.\n2. The capital of France is Paris.\n3. Lyon."
    )
    assert (user.role, user.content) == ("user", "What is the capital of France?")
    assert prompt.truncation is None


def test_without_system_role_the_prompt_is_merged_into_the_user_turn() -> None:
    prompt = build_stage_prompt(
        "What is the capital of France?",
        references=POOL,
        system_supported=supports_system_role(GEMMA2),
        context_length=4096,
        max_tokens=256,
        tokenizer=TOKENS,
    )
    assert [m.role for m in prompt.messages] == ["user"]
    content = prompt.messages[0].content
    assert content.startswith(aggregator_prompt() + "\n1. Paris is the capital.")
    assert content.endswith("3. Lyon.\n\nWhat is the capital of France?")


def test_item_system_prompt_is_kept_before_the_references() -> None:
    prompt = build_stage_prompt(
        "Q?",
        system="Answer in French.",
        references=POOL[:1],
        context_length=4096,
        max_tokens=64,
        tokenizer=TOKENS,
    )
    assert (
        prompt.messages[0].content
        == "Answer in French.\n\n" + aggregator_prompt() + "\n1. Paris is the capital."
    )
    merged = build_stage_prompt(
        "Q?",
        system="Answer in French.",
        references=POOL[:1],
        system_supported=False,
        context_length=4096,
        max_tokens=64,
        tokenizer=TOKENS,
    )
    assert [m.role for m in merged.messages] == ["user"]
    assert merged.messages[0].content.startswith("Answer in French.\n\n" + aggregator_prompt())
    assert merged.messages[0].content.endswith("\n\nQ?")


def test_first_layer_proposers_get_the_plain_turns() -> None:
    prompt = build_stage_prompt("Q?", context_length=4096, max_tokens=64, tokenizer=TOKENS)
    assert [(m.role, m.content) for m in prompt.messages] == [("user", "Q?")]
    with_system = build_stage_prompt(
        "Q?", system="Be brief.", system_supported=False, context_length=4096, max_tokens=64, tokenizer=TOKENS
    )
    assert [(m.role, m.content) for m in with_system.messages] == [("user", "Be brief.\n\nQ?")]


def test_later_layer_proposers_see_the_previous_pool_the_same_way() -> None:
    layer1 = build_stage_prompt(
        "Q?", references=POOL, context_length=4096, max_tokens=64, tokenizer=TOKENS, layer=1
    )
    aggregator = build_stage_prompt(
        "Q?", references=POOL, context_length=4096, max_tokens=64, tokenizer=TOKENS
    )
    assert layer1.messages == aggregator.messages


def test_fair_truncation_keeps_short_candidates_whole_and_splits_the_rest() -> None:
    short = "one two three"
    long_a = " ".join(f"a{i}" for i in range(100))
    long_b = " ".join(f"b{i}" for i in range(60))
    fitted, record = fit_references([long_a, short, long_b], budget_tokens=43, tokenizer=TOKENS, layer=1)
    assert record is not None
    assert record.original_tokens == [100, 3, 60]
    assert record.kept_tokens == [20, 3, 20]
    assert sum(record.kept_tokens) <= 43
    assert fitted[1] == short
    assert fitted[0] == " ".join(f"a{i}" for i in range(20))
    assert fitted[2] == " ".join(f"b{i}" for i in range(20))


def test_pool_that_fits_is_not_truncated() -> None:
    fitted, record = fit_references(POOL, budget_tokens=100, tokenizer=TOKENS, layer=1)
    assert fitted == POOL
    assert record is None


def test_overflowing_pool_is_truncated_to_the_context_and_recorded() -> None:
    pool = [" ".join(["word"] * 3000), " ".join(["other"] * 3000)]
    prompt = build_stage_prompt(
        "Q?", references=pool, context_length=2048, max_tokens=256, tokenizer=TOKENS, layer=1
    )
    assert prompt.truncation is not None
    kept = prompt.truncation.kept_tokens
    assert min(kept) > 0
    assert abs(kept[0] - kept[1]) <= 1, "equal shares, up to integer rounding"
    total = sum(TOKENS.count(m.content) for m in prompt.messages)
    assert total + 256 <= 2048
    assert prompt.truncation.layer == 1


def test_instruction_too_long_for_the_context_is_a_clear_error() -> None:
    with pytest.raises(PromptTooLong, match="nothing of the 3 candidates fits the 512-token context"):
        build_stage_prompt(
            " ".join(["x"] * 600), references=POOL, context_length=512, max_tokens=64, tokenizer=TOKENS
        )
