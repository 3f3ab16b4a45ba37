"""Chat requests idle and under a bulk backlog: time to first token and total latency.

    python -m bench.interactive [--recipes synthetic,embedded] [--requests 6] [--backlog 300]
                                [--max-tokens 32] [--gap 5]

Per recipe, one deployment as in production: a control worker, an inference worker (16 stage
threads), `slimmoa api`. A warm-up request loads the engines (not measured). Then `--requests`
streamed chat requests, `--gap` seconds apart, on the idle service; then a bulk job of `--backlog`
items of the same recipe (the same models and engine) is submitted and, once it is being worked
through, `--requests` more chat requests are sent the same way while it runs (the gap lets the bulk
job fill the engine's batch again before each one arrives). Time to first token is
from sending the request to the first non-empty content delta; total latency to `data: [DONE]`.
Printed: the median and largest of each, idle and busy, the ratio of the medians (busy / idle; the
target is at most 2 for time to first token), and how much of the backlog was done when the last
busy request ended (a backlog that drained before the requests ended measured nothing).

Recipes: `synthetic`, three synthetic proposers and an aggregator whose answer streams over 600 ms;
`embedded`, the shipped recipe on SmolLM2 (vLLM CPU) with every generation cut to `--max-tokens`.
Needs DATABASE_URL (Postgres) and REDIS_URL; everything runs in its own schema, queues and processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.engine_throughput import prompts
from bench.services import ROOT, isolated_services, serving, slimmoa_api, start_process, stop

SYNTHETIC: dict[str, Any] = {
    "name": "synthetic",
    "models": {
        "chat-a": {"engine": "synthetic", "latency_ms": 200, "output_tokens": 24},
        "chat-b": {"engine": "synthetic", "latency_ms": 200, "output_tokens": 24},
        "chat-agg": {"engine": "synthetic", "latency_ms": 600, "output_tokens": 32},
    },
    "layers": [
        {
            "proposers": [
                {"model": "chat-a"},
                {"model": "chat-b"},
                {"model": "chat-a", "sampling": {"seed": 3}},
            ]
        }
    ],
    "aggregator": {"model": "chat-agg"},
}
STAGE_THREADS = 16


def recipe_data(name: str, max_tokens: int) -> dict[str, Any]:
    if name == "synthetic":
        return dict(SYNTHETIC)
    data: dict[str, Any] = yaml.safe_load((ROOT / "recipes" / "embedded.yaml").read_text())
    for proposer in data["layers"][0]["proposers"]:
        proposer["sampling"]["max_tokens"] = max_tokens
    data["aggregator"]["sampling"]["max_tokens"] = max_tokens
    return data


def chat_once(client: httpx.Client, model: str, text: str) -> tuple[float, float]:
    """One streamed request: seconds to its first content and to its end."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
            if '"error":' in line:
                raise RuntimeError(f"the request failed: {line}")
            if line == "data: [DONE]":
                break
    total = time.perf_counter() - started
    return (first if first is not None else total), total


def measure(client: httpx.Client, model: str, texts: list[str], gap_s: float) -> list[tuple[float, float]]:
    """One request after the other, `gap_s` apart: under a backlog, each arrives at an engine whose
    batch the bulk job has filled again since the last one."""
    runs = []
    for text in texts:
        time.sleep(gap_s)
        runs.append(chat_once(client, model, text))
    return runs


def _summary(label: str, runs: list[tuple[float, float]]) -> str:
    firsts, totals = [r[0] for r in runs], [r[1] for r in runs]
    return (
        f"  {label:<6} first token median {statistics.median(firsts):6.3f} s (max {max(firsts):6.3f}); "
        f"total median {statistics.median(totals):6.3f} s (max {max(totals):6.3f})"
    )


def run_recipe(name: str, args: argparse.Namespace, env: dict[str, str], logs: Path) -> None:
    from orchestrator.celery_app import app
    from orchestrator.embedded import free_port

    recipes = Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    (recipes / f"{name}.yaml").write_text(yaml.safe_dump(recipe_data(name, args.max_tokens)))
    env = {**env, "RECIPES_DIR": str(recipes), "SLIMMOA_API_TOKEN": ""}
    worker = [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"]
    workers = [
        start_process([*worker, "--role", "control"], env, logs / f"{name}-control.log"),
        start_process([*worker, "--role", "inference"], env, logs / f"{name}-inference.log"),
    ]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    texts = prompts(args.requests * 2 + 1)
    try:
        with (
            serving(slimmoa_api(port), env, logs / f"{name}-api.log", f"{url}/healthz"),
            httpx.Client(base_url=url, timeout=900) as client,
        ):
            while len(app.control.ping(timeout=1.0)) < len(workers):
                if any(w.poll() is not None for w in workers):
                    raise RuntimeError(f"a worker exited; see the logs in {logs}")
            chat_once(client, name, texts[0])  # loads the engines
            idle = measure(client, name, texts[1 : args.requests + 1], args.gap)
            items = [{"instruction": text} for text in prompts(args.backlog)]
            job = client.post("/v1/jobs", json={"recipe": name, "items": items}).raise_for_status().json()
            while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["stages"][0]["finished"] < 3:
                time.sleep(0.1)
            busy = measure(client, name, texts[args.requests + 1 :], args.gap)
            state = client.get(f"/v1/jobs/{job['id']}").json()
            client.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        for process in workers:
            stop(process)
    ratio = statistics.median(r[0] for r in busy) / statistics.median(r[0] for r in idle)
    total_ratio = statistics.median(r[1] for r in busy) / statistics.median(r[1] for r in idle)
    backlog = f"{args.requests} during a {args.backlog}-item bulk job"
    print(f"{name}: {args.requests} requests idle, {backlog}")
    print(_summary("idle", idle))
    print(_summary("busy", busy))
    print(f"  ratio busy/idle: first token {ratio:.2f} (target <= 2), total {total_ratio:.2f}")
    done = f"{state['status']}, {state['items_done']} of {args.backlog} done"
    print(f"  bulk job when the last busy request ended: {done}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", default="synthetic,embedded")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--backlog", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap", type=float, default=5.0, help="seconds between two requests")
    args = parser.parse_args()
    database_url = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for name in args.recipes.split(","):
        logs = Path(tempfile.mkdtemp(prefix=f"bench-interactive-{name}-"))
        with isolated_services(database_url, redis_url, STAGE_THREADS) as env:
            run_recipe(name, args, env, logs)


if __name__ == "__main__":
    main()
