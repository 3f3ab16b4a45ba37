"""The weighted pairwise judge, AlpacaEval 2.0 style: what the judge is asked and how its answer is read.

The judge sees the instruction and two outputs labelled `m` (shown first) and `M` (shown second) and
answers with one token. Its verdict is a probability, read from the logprobs of those two tokens; which
output is shown first is drawn per item from the evaluation's seed, so position bias cancels out.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources

from orchestrator.contracts import ChatMessage
from orchestrator.errors import NoVerdict, RecipeError
from orchestrator.recipes import (
    OpenAIModel,
    SamplingSpec,
    SyntheticModel,
    VllmModel,
    load_recipe,
)
from orchestrator.settings import Settings

__all__ = [
    "FIRST_TOKEN",
    "JUDGE_LOGPROBS",
    "JUDGE_SAMPLING",
    "SECOND_TOKEN",
    "JudgeSpec",
    "judge_messages",
    "resolve_judge",
    "shown_outputs",
    "shows_model_first",
    "verdict_preference",
]

FIRST_TOKEN, SECOND_TOKEN = "m", "M"
# Top logprobs asked of the judge: AlpacaEval asks GPT-4-Turbo for 5; small local judges often rank
# other tokens above the two verdicts, so ask for the most an OpenAI-compatible endpoint allows.
JUDGE_LOGPROBS = 20
# One token is the whole answer. The probabilities come from logprobs, which sampling does not change,
# so there is no seed to fix.
JUDGE_SAMPLING = SamplingSpec(temperature=1.0, top_p=1.0, max_tokens=1, seed=None)

ModelSpec = VllmModel | OpenAIModel | SyntheticModel


@cache
def _prompt(part: str) -> str:
    return resources.files("orchestrator").joinpath(f"data/alpaca_eval_judge_{part}.txt").read_text().rstrip()


def judge_messages(instruction: str, first: str, second: str, *, system_supported: bool) -> list[ChatMessage]:
    """The judge's chat: AlpacaEval's system and user prompts with the two outputs in the given order."""
    user = (
        _prompt("user")
        .replace("{instruction}", instruction)
        .replace("{output_1}", first)
        .replace("{output_2}", second)
    )
    if not system_supported:
        return [ChatMessage(role="user", content=_prompt("system") + "\n\n" + user)]
    return [ChatMessage(role="system", content=_prompt("system")), ChatMessage(role="user", content=user)]


def shown_outputs(user_prompt: str) -> tuple[str, str] | None:
    """The two outputs of a judge's user prompt, in the order shown (the text after each model
    identifier); None for a prompt that is not the judge's."""
    first = f'"model_identifier": "{FIRST_TOKEN}"'
    second = f'"model_identifier": "{SECOND_TOKEN}"'
    start, middle = user_prompt.find(first), user_prompt.find(second)
    if start < 0 or middle < start:
        return None
    return user_prompt[start + len(first) : middle], user_prompt[middle + len(second) :]


def shows_model_first(seed: int, item_id: int) -> bool:
    """Whether the job's output is shown first for this item: a fair coin drawn from (seed, item)."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()
    return random.Random(digest).random() < 0.5


def _probability(top_logprobs: dict[str, float], token: str) -> float:
    # Tokenizers differ on leading spaces (" m"): a verdict token is its text without them.
    return sum(math.exp(logprob) for text, logprob in top_logprobs.items() if text.strip() == token)


def verdict_preference(top_logprobs: dict[str, float], *, model_first: bool) -> float:
    """P(the job's output is better), from the judge's first-token logprobs of `m` and `M`.

    As in AlpacaEval, a verdict token missing from the top logprobs has probability 0; if both are
    missing there is no verdict.
    """
    first, second = _probability(top_logprobs, FIRST_TOKEN), _probability(top_logprobs, SECOND_TOKEN)
    if first + second == 0:
        shown = ", ".join(sorted(top_logprobs)) or "none"
        raise NoVerdict(f"neither {FIRST_TOKEN!r} nor {SECOND_TOKEN!r} among the top tokens ({shown})")
    first_wins = first / (first + second)
    return first_wins if model_first else 1.0 - first_wins


@dataclass(frozen=True)
class JudgeSpec:
    """A judge: how the user named it (part of the evaluation's key), its engine name and model spec."""

    label: str
    name: str
    spec: ModelSpec


def resolve_judge(judge: str, settings: Settings) -> JudgeSpec:
    """A judge from `--judge`: an endpoint URL (OpenAI-compatible), or a recipe's model (`RECIPE:MODEL`;
    `RECIPE` alone means its aggregator). Raises RecipeError naming what is wrong."""
    if judge.startswith(("http://", "https://")):
        spec = OpenAIModel(
            engine="openai",
            base_url=judge,
            model=settings.eval_judge_model,
            api_key_env=settings.eval_judge_key_env or None,
        )
        return JudgeSpec(f"{judge}#{settings.eval_judge_model}", f"judge:{settings.eval_judge_model}", spec)
    recipe_name, _, model = judge.partition(":")
    recipe = load_recipe(recipe_name, settings.recipes_dir)
    model = model or recipe.aggregator.model
    if model not in recipe.models:
        raise RecipeError(
            f"judge {judge!r}: recipe {recipe.name} has no model {model!r} "
            f"(its models: {', '.join(sorted(recipe.models))})"
        )
    return JudgeSpec(f"{recipe.name}:{model}", model, recipe.model(model))
