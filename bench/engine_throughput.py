"""Generated tokens per second: the same N requests through the SlimMoA pipeline vs vLLM's own
offline batch API, same model (the embedded SmolLM2), same sampling, in one script run.

    python -m bench.engine_throughput [--requests 48] [--max-tokens 64] [--concurrency 48]

(a) `vllm.LLM.chat` on all N conversations at once: the engine alone, batching everything.
(b) N items through dispatch -> proposer (the same model, the same per-request seeds; on a CPU neither
    run is seeded, as the engine drops seeds there) -> a synthetic
    aggregator (zero latency, so the aggregation costs no model time), on a worker whose engine is
    warmed up first; the clock runs from enqueue until the last candidate is stored.
Prints tokens/s for each and the ratio (b)/(a). Needs DATABASE_URL (Postgres) and REDIS_URL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from bench.services import isolated_services

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "alpaca_eval_sample.jsonl"


def prompts(count: int) -> list[str]:
    lines = [json.loads(line)["instruction"] for line in SAMPLE.read_text().splitlines()]
    return [
        lines[i % len(lines)] + ("" if i < len(lines) else f" (variant {i // len(lines)})")
        for i in range(count)
    ]


def offline(instructions: list[str], max_tokens: int, model_dir: Path) -> float:
    """Tokens/s of vLLM's offline batch API on all requests at once (load time excluded)."""
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from workers.engines.vllm_engine import CPU_WORKER_CLS, DEFAULT_CPU_KV_CACHE_GB, cpu_dtype, request_seed

    on_cpu = current_platform.is_cpu()
    llm = LLM(
        model=str(model_dir),
        max_model_len=2048,
        enforce_eager=True,
        dtype=cpu_dtype("auto"),
        kv_cache_memory_bytes=int(DEFAULT_CPU_KV_CACHE_GB * 2**30),
        # The engine's own sampler, so that both sides sample alike.
        **({"worker_cls": CPU_WORKER_CLS} if on_cpu else {}),
    )
    conversations = [[{"role": "user", "content": text}] for text in instructions]
    params = [
        # The same seeds as the pipeline's requests, dropped on a CPU as the engine drops them.
        SamplingParams(
            temperature=0.7,
            top_p=0.95,
            max_tokens=max_tokens,
            seed=request_seed(1000 + i, on_cpu=on_cpu),
        )
        for i in range(len(instructions))
    ]
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return tokens / elapsed


def pipeline(
    instructions: list[str], max_tokens: int, concurrency: int, database_url: str, redis_url: str
) -> float:
    with isolated_services(database_url, redis_url, concurrency) as env:
        return _through_pipeline(instructions, max_tokens, env)


def _through_pipeline(instructions: list[str], max_tokens: int, env: dict[str, str]) -> float:
    from db.models import Candidate, Item
    from db.session import session_scope
    from orchestrator.celery_app import app
    from orchestrator.contracts import InputRecord
    from orchestrator.recipes import Recipe, parse_recipe
    from orchestrator.submission import Submission, enqueue_job, store_job

    url = env["DATABASE_URL"]

    def recipe_for(seed: int) -> Recipe:
        sampling = {"temperature": 0.7, "top_p": 0.95, "max_tokens": max_tokens, "seed": seed}
        return parse_recipe(
            {
                "name": "engine-bench",
                "models": {
                    "smollm2": {"engine": "vllm", "weights": "embedded:smollm2", "context_length": 2048},
                    "agg": {"engine": "synthetic"},
                },
                "layers": [{"proposers": [{"model": "smollm2", "sampling": sampling}]}],
                "aggregator": {"model": "agg"},
            }
        )

    log = open("/tmp/bench-engine-worker.log", "wb")  # noqa: SIM115  (closed with the worker below)
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        while not app.control.ping(timeout=1.0):
            time.sleep(0.5)

        def run(texts: list[str]) -> tuple[float, int]:
            # Each item is its own job so that every request gets the recipe's seed (1000 + i).
            with session_scope(url) as session:
                jobs = [
                    store_job(session, Submission(recipe_for(1000 + i), [InputRecord(instruction=text)])).id
                    for i, text in enumerate(texts)
                ]
            started = time.perf_counter()
            for job_id in jobs:
                enqueue_job(job_id)
            while True:
                with session_scope(url) as session:
                    done = session.scalar(
                        select(func.count()).select_from(Candidate).join(Item).where(Item.job_id.in_(jobs))
                    )
                    tokens = session.scalar(
                        select(func.sum(Candidate.output_tokens)).join(Item).where(Item.job_id.in_(jobs))
                    )
                if done == len(texts):
                    return time.perf_counter() - started, int(tokens or 0)
                if worker.poll() is not None:
                    raise RuntimeError("worker exited: see /tmp/bench-engine-worker.log")
                time.sleep(0.05)

        run(instructions[:2])  # load the engine before the clock starts
        elapsed, tokens = run(instructions)
        return tokens / elapsed
    finally:
        worker.terminate()
        worker.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=48, help="worker threads (requests in flight)")
    args = parser.parse_args()
    from orchestrator.settings import get_settings
    from workers.model_store import ensure_embedded_model

    model_dir = ensure_embedded_model("smollm2", get_settings().model_cache_dir)
    instructions = prompts(args.requests)
    alone = offline(instructions, args.max_tokens, model_dir)
    through = pipeline(
        instructions, args.max_tokens, args.concurrency, os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    )
    print(f"requests={args.requests} max_tokens={args.max_tokens} worker threads={args.concurrency}")
    print(f"(a) vLLM offline batch : {alone:8.1f} generated tokens/s")
    print(f"(b) SlimMoA pipeline   : {through:8.1f} generated tokens/s")
    print(f"ratio (b)/(a)          : {through / alone:8.2f}")


if __name__ == "__main__":
    main()
