"""The offline per-model plan: the physical limit a scheduler of one device is measured against.

For each stage in the memory plan's order, each of its models is loaded once (or kept, when the next
stage uses it too), runs every request the stage has for it in ONE offline batch, and is unloaded:
proposer slots of every item first, then the aggregator over prompts the project's own prompt builder
makes from those pools. Loads and unloads are inside the clock, as a scheduler pays for them too.

Two kinds of model: vLLM's offline `LLM.generate` for `engine: vllm`, and the synthetic engine (all
requests awaited at once) standing for it in tests.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.prompts import Tokenizer, build_stage_prompt
from orchestrator.recipes import Recipe, SamplingSpec, SyntheticModel, VllmModel
from workers.engines import ChatRequest

__all__ = ["OfflineLoad", "OfflineRun", "OfflineRunner", "run_offline_plan"]


class OfflineRunner(Protocol):
    """One model, loaded for a batch: its tokenizer, its template's system role, one batch at a time."""

    tokenizer: Tokenizer
    system_supported: bool

    def generate(self, requests: list[ChatRequest]) -> list[tuple[str, int]]:
        """(text, generated tokens) of every request, in order."""

    def close(self) -> None: ...


class VllmOffline:
    """vLLM's offline engine on one recipe model, started with the engine's own arguments."""

    def __init__(self, name: str, spec: VllmModel, cache_dir: Path) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        from orchestrator.prompts import supports_system_role
        from workers.engines.vllm_engine import HFTokenizer, engine_args
        from workers.model_store import resolve_weights

        weights = str(resolve_weights(spec, cache_dir))
        self.on_cpu = current_platform.is_cpu()
        args = engine_args(name, spec, weights, on_cpu=self.on_cpu)
        args.pop("enable_sleep_mode", None)  # loaded for one batch: it never sleeps
        self._hf = AutoTokenizer.from_pretrained(weights)
        self.tokenizer: Tokenizer = HFTokenizer(self._hf)
        self.system_supported = spec.system_role == "supported" or (
            spec.system_role == "auto" and supports_system_role(self._hf.chat_template or "")
        )
        self._llm: Any = LLM(**args)

    def generate(self, requests: list[ChatRequest]) -> list[tuple[str, int]]:
        from vllm import SamplingParams

        from workers.engines.vllm_engine import request_seed

        prompts = [
            self._hf.apply_chat_template(
                [m.model_dump() for m in r.messages], tokenize=False, add_generation_prompt=True
            )
            for r in requests
        ]
        params = [
            SamplingParams(
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_tokens,
                seed=request_seed(r.seed, on_cpu=self.on_cpu),
            )
            for r in requests
        ]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        gc.collect()


class SyntheticOffline:
    """The synthetic engine with every request of the batch in flight at once."""

    def __init__(self, name: str, spec: SyntheticModel) -> None:
        from workers.engines.synthetic import SyntheticEngine

        self._engine = SyntheticEngine(name, spec)
        self.tokenizer: Tokenizer = self._engine.tokenizer
        self.system_supported = self._engine.system_supported

    def generate(self, requests: list[ChatRequest]) -> list[tuple[str, int]]:
        async def batch() -> list[tuple[str, int]]:
            done = await asyncio.gather(*(self._engine.generate(r) for r in requests))
            return [(g.text, g.output_tokens or 0) for g in done]

        return asyncio.run(batch())

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class OfflineLoad:
    model: str
    load_s: float
    unload_s: float


@dataclass
class OfflineRun:
    wall_s: float = 0.0
    output_tokens: int = 0
    generations: int = 0
    loads: list[OfflineLoad] = field(default_factory=list)


def _stages(recipe: Recipe) -> list[tuple[int, str, list[tuple[int | None, str, SamplingSpec]]]]:
    """(layer, model, [(slot or None for the aggregator, model, sampling)]) in the plan's order."""
    stages: list[tuple[int, str, list[tuple[int | None, str, SamplingSpec]]]] = []
    for layer in range(len(recipe.layers)):
        slots = recipe.slots(layer)
        for model in dict.fromkeys(s.model for s in slots):
            stages.append((layer, model, [(s.slot, s.model, s.sampling) for s in slots if s.model == model]))
    aggregator = recipe.aggregator
    stages.append((len(recipe.layers), aggregator.model, [(None, aggregator.model, aggregator.sampling)]))
    return stages


def run_offline_plan(
    recipe: Recipe, instructions: list[str], open_model: Callable[[str], OfflineRunner]
) -> OfflineRun:
    """Run the whole job model by model; `open_model(name)` loads a model (the time it takes is a load)."""
    run = OfflineRun()
    # Per item, per layer: slot -> text (the aggregator reads them in slot order, as the stages do).
    pools: list[dict[int, dict[int, str]]] = [{} for _ in instructions]
    current: tuple[str, OfflineRunner, float] | None = None
    started = time.perf_counter()

    def unload() -> None:
        nonlocal current
        if current is not None:
            name, runner, load_s = current
            began = time.perf_counter()
            runner.close()
            run.loads.append(OfflineLoad(name, load_s, time.perf_counter() - began))
            current = None

    for layer, model, slots in _stages(recipe):
        if current is None or current[0] != model:
            unload()
            began = time.perf_counter()
            opened = open_model(model)
            current = (model, opened, time.perf_counter() - began)
        runner = current[1]
        spec = recipe.model(model)
        requests, keys = [], []
        for index, instruction in enumerate(instructions):
            pool = pools[index].get(layer - 1, {})
            for slot, _, sampling in slots:
                prompt = build_stage_prompt(
                    instruction,
                    references=[pool[s] for s in sorted(pool)],
                    system_supported=runner.system_supported,
                    context_length=spec.context_length,
                    max_tokens=sampling.max_tokens,
                    tokenizer=runner.tokenizer,
                    layer=layer,
                )
                name = f"{index}_{layer}_{'agg' if slot is None else slot}"
                requests.append(ChatRequest.build(name, prompt.messages, sampling))
                keys.append((index, -1 if slot is None else slot))
        for (index, slot), (text, tokens) in zip(keys, runner.generate(requests), strict=True):
            pools[index].setdefault(layer, {})[slot] = text
            run.output_tokens += tokens
        run.generations += len(requests)
    unload()
    run.wall_s = time.perf_counter() - started
    return run
