"""A whole MoA job two ways, on the same prompts, models, sampling and token limits:

    python -m bench.end_to_end [--prompts 48] [--budget-gb 2] [--recipes fits,swaps] [--timeline DIR]
    python -m bench.end_to_end --prompts 4 --synthetic      # the tiny setting: synthetic engines

(a) the offline per-model plan (bench/offline.py): model by model in the memory plan's order, vLLM's
    offline `LLM.generate` over all of the model's requests, loads and unloads included;
(b) SlimMoA as deployed: a control worker, one inference worker with the memory budget, `slimmoa api`;
    the job is POSTed to /v1/jobs and followed until it ends; its loads are read from the record.

Two recipes, both the `embedded` recipe's sampling (three proposer slots, then the aggregator):
  fits   SmolLM2 as every proposer and the aggregator: one model, resident all along (no swaps);
  swaps  SmolLM2 under three names (smol-a for slots 0 and 2, smol-b for slot 1, smol-agg aggregating)
         in a budget that holds one of them at a time.
Prints, per recipe, each side's wall time, generated tokens and tokens/s, its loads, (b)'s timeline
summary (`slimmoa timeline`), and the ratio (a)/(b) of the wall times (SlimMoA's speed as a fraction
of the offline plan's) beside (b)/(a) of the tokens/s. With --synthetic, synthetic engines stand for
the models (same memory, every request at its max_tokens), so both sides generate the same tokens.
Needs DATABASE_URL (Postgres) and REDIS_URL; (b) uses its own schema, queues and processes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil
import yaml

from bench.engine_throughput import prompts
from bench.offline import OfflineRun, OfflineRunner, SyntheticOffline, VllmOffline, run_offline_plan
from bench.services import ROOT, isolated_services, serving, slimmoa_api, start_process, stop

# Latency of a synthetic stand-in's request: long enough that batching, not bookkeeping, is measured.
SYNTHETIC_LATENCY_MS = 50
FINAL = {"succeeded", "partial", "failed", "cancelled"}


def embedded_recipe() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "recipes" / "embedded.yaml").read_text())
    return data


def stand_in(spec: dict[str, Any]) -> dict[str, Any]:
    """A synthetic model with the same memory and context; every answer runs to max_tokens."""
    keep = {key: spec[key] for key in ("memory_gb", "context_length") if key in spec}
    return {"engine": "synthetic", "latency_ms": SYNTHETIC_LATENCY_MS, "output_tokens": 1_000_000} | keep


def bench_recipes(synthetic: bool) -> dict[str, dict[str, Any]]:
    """The two recipes as recipe objects (what (b) POSTs)."""
    embedded = embedded_recipe()
    smollm2 = embedded["models"]["smollm2"]
    model = stand_in(smollm2) if synthetic else smollm2
    fits = copy.deepcopy(embedded) | {"name": "e2e-fits", "models": {"smollm2": model}}
    slots = embedded["layers"][0]["proposers"]
    swaps = {
        "name": "e2e-swaps",
        "models": {name: model for name in ("smol-a", "smol-b", "smol-agg")},
        "layers": [
            {
                "proposers": [
                    p | {"model": name} for p, name in zip(slots, ("smol-a", "smol-b", "smol-a"), strict=True)
                ]
            }
        ],
        "aggregator": embedded["aggregator"] | {"model": "smol-agg"},
        "min_pool": embedded["min_pool"],
    }
    return {"fits": fits, "swaps": swaps}


def offline_side(recipe_data: dict[str, Any], instructions: list[str], budget_gb: float) -> OfflineRun:
    """(a): every model started as the engines are on this budget (the planned KV cache)."""
    from orchestrator.recipes import SyntheticModel, VllmModel, parse_recipe
    from orchestrator.settings import get_settings
    from workers.engine_sizing import planned_spec

    recipe = parse_recipe(recipe_data)

    def open_model(name: str) -> OfflineRunner:
        spec = planned_spec(recipe, name, budget_gb)
        if isinstance(spec, VllmModel):
            return VllmOffline(name, spec, get_settings().model_cache_dir)
        assert isinstance(spec, SyntheticModel)
        return SyntheticOffline(name, spec)

    return run_offline_plan(recipe, instructions, open_model)


class Deployed(NamedTuple):
    wall_s: float
    output_tokens: int
    job_id: str
    # CPU seconds of the inference worker's own process (its engine processes excluded), sampled
    # through the job: what the service spends beside the engines, on the cores they use.
    cpu_samples: list[tuple[datetime, float]]

    @property
    def worker_cpu_s(self) -> float:
        return self.cpu_samples[-1][1] - self.cpu_samples[0][1]

    def cpu_outside(self, spans: list[tuple[datetime, datetime]]) -> float:
        """CPU seconds between samples that overlap none of `spans` (the loads: starting an engine
        is CPU work of its own, not the cost of a generation)."""
        pairs = zip(self.cpu_samples, self.cpu_samples[1:], strict=False)
        return sum(
            after - before
            for (start, before), (end, after) in pairs
            if not any(start < span_end and end > span_start for span_start, span_end in spans)
        )


def _cpu_sample(pid: int) -> tuple[datetime, float]:
    times = psutil.Process(pid).cpu_times()
    return datetime.now(UTC), float(times.user + times.system)


def deployed_side(
    recipe: dict[str, Any], instructions: list[str], budget_gb: float, env: dict[str, str], logs: Path
) -> Deployed:
    """(b): wall seconds from the POST to the job's end, generated tokens, the job's id, and the
    inference worker's CPU over that time."""
    from orchestrator.celery_app import app
    from orchestrator.embedded import free_port

    worker = [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"]
    workers = [
        start_process([*worker, "--role", "control"], env, logs / "e2e-control.log"),
        start_process(
            [*worker, "--role", "inference", "--memory-gb", str(budget_gb)], env, logs / "e2e-inference.log"
        ),
    ]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api_env = {**env, "SLIMMOA_API_TOKEN": ""}
    try:
        with (
            serving(slimmoa_api(port), api_env, logs / "e2e-api.log", f"{url}/healthz"),
            httpx.Client(base_url=url, timeout=600) as client,
        ):
            while len(app.control.ping(timeout=1.0)) < len(workers):
                if any(w.poll() is not None for w in workers):
                    raise RuntimeError(f"a worker exited; see the logs in {logs}")
            started = time.perf_counter()
            samples = [_cpu_sample(workers[1].pid)]
            body = {"recipe": recipe, "items": [{"instruction": text} for text in instructions]}
            response = client.post("/v1/jobs", json=body)
            response.raise_for_status()
            job_id = response.json()["id"]
            while True:
                job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if job["status"] in FINAL:
                    break
                if any(w.poll() is not None for w in workers):
                    raise RuntimeError(f"a worker exited; see the logs in {logs}")
                time.sleep(0.1)
                samples.append(_cpu_sample(workers[1].pid))
            wall = time.perf_counter() - started
            samples.append(_cpu_sample(workers[1].pid))
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return Deployed(wall, int(job["progress"]["output_tokens"]), job_id, samples)
    finally:
        for process in workers:
            stop(process)


LoadLine = tuple[str, str, float, list[str], float]


def _loads(rows: list[LoadLine]) -> str:
    shown = [
        f"{model} {kind} {seconds:.2f} s"
        + (f" (evicted {', '.join(evicted)}: {unload:.2f} s)" if evicted else "")
        for model, kind, seconds, evicted, unload in rows
    ]
    return f"{len(rows)}: " + "; ".join(shown) if rows else "0"


def _side(label: str, wall: float, tokens: int, generations: int, loads: str) -> str:
    return (
        f"  ({label}) : wall {wall:9.3f} s, {generations} generations, {tokens} tokens, "
        f"{tokens / wall:9.1f} tokens/s; loads {loads}"
    )


def compare(
    services: tuple[str, str],
    name: str,
    recipe: dict[str, Any],
    instructions: list[str],
    budget_gb: float,
    logs: Path,
    timeline: Path | None,
) -> None:
    """Run (a) then (b) on one recipe and print both, the loads and the ratios; `services` are the
    machine's Postgres and Redis URLs."""
    from db.session import session_scope
    from db.timeline import job_timeline_rows
    from orchestrator.planning import plan_memory
    from orchestrator.recipes import parse_recipe
    from orchestrator.timeline import build_timeline, headline, plot_timeline

    plan = plan_memory(parse_recipe(recipe), budget_gb)
    placement = ", ".join(f"{m.name} {'resident' if m.resident else 'swaps'}" for m in plan.models)
    print(f"recipe {name} on {budget_gb:g} GB: {placement}; the plan loads {plan.total_loads} times")
    offline = offline_side(recipe, instructions, budget_gb)
    loads_a: list[LoadLine] = [(load.model, "load", load.load_s, [], 0.0) for load in offline.loads]
    unload_a = sum(load.unload_s for load in offline.loads)
    print(
        _side("a", offline.wall_s, offline.output_tokens, offline.generations, _loads(loads_a))
        + f", unloads {unload_a:.2f} s"
    )
    with isolated_services(*services, None) as env:
        deployed = deployed_side(recipe, instructions, budget_gb, env, logs)
        wall, tokens = deployed.wall_s, deployed.output_tokens
        with session_scope(env["DATABASE_URL"]) as session:
            rows = job_timeline_rows(session, deployed.job_id)
        assert rows is not None
        found = build_timeline(rows)
        loads_b = [
            (load.model, load.kind, load.seconds, load.evicted, load.unload_seconds) for load in rows.loads
        ]
        print(_side("b", wall, tokens, found.summary.generations, _loads(loads_b)))
        print(f"      timeline : {headline(found.summary)}")
        generations = max(found.summary.generations, 1)
        spans = [
            (load.recorded_at - timedelta(seconds=load.seconds), load.recorded_at) for load in rows.loads
        ]
        outside = deployed.cpu_outside(spans)
        print(
            f"      worker CPU : {deployed.worker_cpu_s:.2f} s over the job, loads included; "
            f"{outside:.2f} s outside loads, {outside / generations * 1000:.1f} ms a generation "
            f"({outside / wall * 100:.1f} % of one core over the wall time; the inference worker's "
            "own process, its engines' processes excluded)"
        )
        if timeline is not None:
            path = plot_timeline(found, timeline / f"e2e-{name}.png")
            print(f"      timeline plot: {path}")
    print(
        f"  ratio (a)/(b) : {offline.wall_s / wall:.3f} of the wall time; "
        f"(b)/(a) of the tokens/s: {(tokens / wall) / (offline.output_tokens / offline.wall_s):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--budget-gb", type=float, default=2.0, help="the inference worker's memory budget")
    parser.add_argument("--recipes", default="fits,swaps", help="which of fits, swaps to run, in order")
    parser.add_argument("--synthetic", action="store_true", help="synthetic engines stand for the models")
    parser.add_argument("--timeline", type=Path, help="write (b)'s timeline PNG per recipe into this folder")
    args = parser.parse_args()
    logs = Path(os.environ.get("BENCH_LOG_DIR", "/tmp"))
    # vLLM's start-up chatter would bury the figures (its warnings and errors still show).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Read once: each run points DATABASE_URL at a schema of its own.
    services = (os.environ["DATABASE_URL"], os.environ["REDIS_URL"])
    recipes = bench_recipes(args.synthetic)
    instructions = prompts(args.prompts)
    engines = "synthetic engines" if args.synthetic else "vLLM, the embedded SmolLM2"
    print(f"end to end: {args.prompts} prompts, {engines}; load average {os.getloadavg()[0]:.2f}")
    for name in args.recipes.split(","):
        compare(services, name, recipes[name], instructions, args.budget_gb, logs, args.timeline)


if __name__ == "__main__":
    main()
