"""The CPU engine's top-p (`workers/engines/vllm_cpu_sampling.py`) against vLLM's own, in one script:

    python -m bench.cpu_sampling [--prompts 48] [--runs 2]

The same AsyncLLM, started with the engine's own arguments, once with vLLM's stock CPU worker (its
sampler sorts the whole vocabulary of every row whenever any row asks for top-p) and once with
`NucleusCPUWorker`, alternating `--runs` times. Each run sends every prompt (the AlpacaEval sample)
with each of the `embedded` recipe's four samplings (three proposers at top_p 0.9-0.95, the
aggregator at 1.0) all at once, as a job's stages share the engine, and times them from the first
request to the last answer (engine start excluded, printed). Prints tokens/s of each run, the medians
and the ratio nucleus / stock. Needs the embedded model (`make model`) and a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from bench.engine_throughput import prompts
from orchestrator.recipes import SamplingSpec, VllmModel, load_recipe
from orchestrator.settings import get_settings

# vLLM's own CPU worker: the baseline.
STOCK_WORKER_CLS = "vllm.v1.worker.cpu_worker.CPUWorker"


async def one_run(
    args: dict[str, Any], instructions: list[str], samplings: list[SamplingSpec]
) -> tuple[float, float, int]:
    """(engine start s, generation s, generated tokens) of every prompt with every sampling at once."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    start_s = time.perf_counter() - started
    hf = AutoTokenizer.from_pretrained(args["model"])

    async def generate(request_id: str, instruction: str, sampling: SamplingSpec) -> int:
        prompt = hf.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens
        )
        final = None
        async for output in llm.generate(prompt, params, request_id=request_id):
            final = output
        assert final is not None
        return len(final.outputs[0].token_ids)

    try:
        started = time.perf_counter()
        tokens = await asyncio.gather(
            *(
                generate(f"{i}-{j}", text, sampling)
                for i, text in enumerate(instructions)
                for j, sampling in enumerate(samplings)
            )
        )
        return start_s, time.perf_counter() - started, sum(tokens)
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each; medians are printed")
    options = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm.platforms import current_platform

    from workers.engines.vllm_engine import CPU_WORKER_CLS, engine_args
    from workers.model_store import resolve_weights

    if not current_platform.is_cpu():
        raise SystemExit("bench.cpu_sampling compares CPU workers: run it on a CPU build of vLLM")
    settings = get_settings()
    recipe = load_recipe("embedded", settings.recipes_dir)
    name = recipe.aggregator.model
    spec = recipe.model(name)
    assert isinstance(spec, VllmModel)
    weights = str(resolve_weights(spec, settings.model_cache_dir))
    samplings = [slot.sampling for slot in recipe.slots(0)] + [recipe.aggregator.sampling]
    instructions = prompts(options.prompts)
    print(
        f"cpu_sampling: {options.prompts} prompts x {len(samplings)} samplings (top_p "
        f"{', '.join(str(s.top_p) for s in samplings)}) at once; load average {os.getloadavg()[0]:.2f}"
    )
    rates: dict[str, list[float]] = {"stock": [], "nucleus": []}
    workers = {"stock": STOCK_WORKER_CLS, "nucleus": CPU_WORKER_CLS}
    for run in range(1, options.runs + 1):
        for label, worker in workers.items():
            args = engine_args(name, spec, weights, on_cpu=True, max_num_seqs=settings.engine_max_num_seqs)
            args["worker_cls"] = worker
            start_s, seconds, tokens = asyncio.run(one_run(args, instructions, samplings))
            rates[label].append(tokens / seconds)
            print(
                f"run {run}: {label} worker: {seconds:.2f} s, {tokens} tokens, "
                f"{tokens / seconds:.1f} tokens/s (engine start {start_s:.1f} s excluded)"
            )
    stock, nucleus = (statistics.median(rates[label]) for label in ("stock", "nucleus"))
    print(f"medians of {options.runs} runs: stock {stock:.1f} tokens/s, nucleus {nucleus:.1f} tokens/s")
    print(f"ratio nucleus / stock: {nucleus / stock:.3f}")


if __name__ == "__main__":
    main()
