"""Orchestration overhead: SlimMoA's pipeline against a bare Celery chord of the same shape.

    python -m bench.orchestration [--items 2000] [--proposers 3] [--concurrency 16] [--single-worker]

In ONE run, on the same Redis and the same worker set-up (the chords' tasks run in one worker
process with a threads pool of `--concurrency`; the chords are sent from another process), it
measures:
  (a) bare Celery: per item a chord of N no-op proposers + 1 no-op aggregator (bench/bare_chord.py),
      sent by this script;
  (b) SlimMoA: the same items through dispatch -> proposer chord -> aggregator, on the synthetic engine
      at zero latency, with every candidate and output stored in Postgres; as deployed, the job's
      dispatch task runs in a control worker (`slimmoa worker --role control`) and the stages in one
      inference worker (`--role inference`). With `--single-worker`, one `--role all` worker does
      both (as `slimmoa run` does), so it also pays for sending the chords that (a)'s worker does not;
and prints items/s for each and the ratio (b)/(a). It also reports the peak RSS of the workers, the
time to read the finished job back (a `pools` export: every item with every candidate), and
  (c) the submit of a `--submit-items` job (default 10,000) to the real API (`slimmoa api` in a
      subprocess): seconds for the POST /v1/jobs and the API's peak RSS meanwhile (the job is then
      cancelled, so the pipeline's worker only finds it cancelled).
Needs DATABASE_URL (Postgres) and REDIS_URL; uses its own schema, Redis database and queues.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from bench.services import isolated_services, serving, slimmoa_api, start_process


def _peak_rss(process: psutil.Process, peak: int) -> int:
    try:
        rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
    except psutil.Error:
        return peak
    return max(peak, int(rss))


def _wait(
    done: Callable[[], int], total: int, processes: list[subprocess.Popen[bytes]], timeout: float
) -> tuple[float, list[int]]:
    """Seconds until done() reaches total, and each worker's peak RSS meanwhile."""
    watched = [psutil.Process(process.pid) for process in processes]
    started, peaks = time.perf_counter(), [0] * len(processes)
    while done() < total:
        if any(process.poll() is not None for process in processes):
            raise RuntimeError("a worker exited; see its log")
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"not finished after {timeout:.0f} s ({done()}/{total})")
        peaks = [_peak_rss(process, peak) for process, peak in zip(watched, peaks, strict=True)]
        time.sleep(0.05)
    return time.perf_counter() - started, peaks


@contextmanager
def _sampled_rss(process: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """Sample the process tree's RSS every 20 ms while the block runs; yields [peak] (filled at exit)."""
    watched, peak, stop = psutil.Process(process.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = _peak_rss(watched, peak[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak[0] = _peak_rss(watched, peak[0])


def bare(items: int, proposers: int, concurrency: int, redis_url: str, log_dir: Path) -> tuple[float, int]:
    queue = f"bench.bare.{uuid.uuid4().hex[:6]}"
    env = {"BENCH_REDIS_URL": redis_url, "BENCH_QUEUE": queue, "BENCH_PROPOSERS": str(proposers)}
    os.environ.update(env)
    from bench import bare_chord

    bare_chord.QUEUE, bare_chord.DONE_KEY = queue, f"{queue}.done"
    bare_chord.app.conf.update(broker_url=redis_url, result_backend=redis_url, task_default_queue=queue)
    client = redis.Redis.from_url(redis_url)
    worker = start_process(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.bare_chord",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "-Q",
            queue,
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "warning",
        ],
        env,
        log_dir / "bare-worker.log",
    )
    try:
        while not bare_chord.app.control.ping(timeout=1.0):
            time.sleep(0.2)
        started = time.perf_counter()
        bare_chord.send(items, proposers)
        _, peaks = _wait(lambda: int(client.get(bare_chord.DONE_KEY) or 0), items, [worker], timeout=1800)
        return items / (time.perf_counter() - started), peaks[0]
    finally:
        worker.terminate()
        worker.wait()


# Every item a different prompt: the same text would hit the same synthetic output each time.
PROMPT = "Benchmark prompt number {i}: say something."


def _recipe(proposers: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "models": {"p": {"engine": "synthetic", "output_tokens": 32}, "agg": {"engine": "synthetic"}},
        "layers": [{"proposers": [{"model": "p", "samples": proposers, "sampling": {"seed": 1}}]}],
        "aggregator": {"model": "agg"},
    }


@dataclass(frozen=True)
class PipelineRun:
    items_per_s: float
    # Peak RSS of the worker running the stages, and of the control worker (0: the same worker).
    stage_worker_rss: int
    control_worker_rss: int
    submit_s: float
    # Reading the finished job back: a `pools` export (every item with every candidate).
    export_s: float
    export_bytes: int


def slimmoa(
    items: int,
    proposers: int,
    concurrency: int,
    database_url: str,
    redis_url: str,
    log_dir: Path,
    submit_items: int = 0,
    single_worker: bool = False,
) -> tuple[PipelineRun, tuple[float, int] | None]:
    """(b), and (c) first when `submit_items`: (API submit seconds, API peak RSS)."""
    with isolated_services(database_url, redis_url, concurrency) as env:
        submitted = api_submit(submit_items, proposers, env, log_dir) if submit_items else None
        return _through_pipeline(items, proposers, env, log_dir, single_worker), submitted


def api_submit(items: int, proposers: int, env: dict[str, str], log_dir: Path) -> tuple[float, int]:
    """Seconds for POST /v1/jobs with `items` items to a live `slimmoa api`, and the API's peak RSS."""
    from orchestrator.embedded import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {
        "recipe": _recipe(proposers),
        "items": [{"instruction": PROMPT.format(i=i)} for i in range(items)],
    }
    api_env = {**env, "SLIMMOA_API_TOKEN": ""}
    with (
        serving(slimmoa_api(port), api_env, log_dir / "slimmoa-api.log", f"{url}/healthz") as (api, _),
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        with _sampled_rss(api) as peak:
            started = time.perf_counter()
            response = client.post("/v1/jobs", json=body)
            seconds = time.perf_counter() - started
        response.raise_for_status()
        client.post(f"/v1/jobs/{response.json()['id']}/cancel").raise_for_status()
    return seconds, peak[0]


def _through_pipeline(
    items: int, proposers: int, env: dict[str, str], log_dir: Path, single_worker: bool
) -> PipelineRun:
    from db.session import session_scope
    from orchestrator.celery_app import app
    from orchestrator.contracts import InputRecord
    from orchestrator.recipes import parse_recipe
    from orchestrator.submission import Submission, enqueue_job, store_job

    url = env["DATABASE_URL"]
    recipe = parse_recipe(_recipe(proposers))
    records = [InputRecord(instruction=PROMPT.format(i=i)) for i in range(items)]
    command = [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"]
    roles = ["all"] if single_worker else ["inference", "control"]
    workers = [
        start_process([*command, "--role", role], env, log_dir / f"slimmoa-worker-{role}.log")
        for role in roles
    ]
    try:
        while len(app.control.ping(timeout=1.0)) < len(workers):
            time.sleep(0.2)
        started = time.perf_counter()
        with session_scope(url) as session:
            job_id = store_job(session, Submission(recipe, records)).id
        submitted = time.perf_counter() - started
        enqueue_job(job_id)

        def done() -> int:
            from db.progress import get_job

            with session_scope(url) as session:
                job = get_job(session, job_id)
                return job.items_done if job else 0

        _, peaks = _wait(done, items, workers, timeout=3600)
        rate = items / (time.perf_counter() - started)
        export_s, export_bytes = _export(url, job_id)
        return PipelineRun(
            rate, peaks[0], peaks[1] if len(peaks) > 1 else 0, submitted, export_s, export_bytes
        )
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait()


def _export(url: str, job_id: str) -> tuple[float, int]:
    """Seconds to read a finished job's `pools` export to the end, and its size in bytes."""
    from db.models import Job
    from db.session import session_scope
    from orchestrator.exports import ExportFormat, open_export

    started = time.perf_counter()
    with session_scope(url) as session:
        export = open_export(session, session.get_one(Job, job_id), ExportFormat.POOLS)
        size = sum(len(chunk) for chunk in export.chunks)
    return time.perf_counter() - started, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--submit-items", type=int, default=10_000, help="(c)'s job size; 0 skips (c).")
    parser.add_argument(
        "--single-worker", action="store_true", help="(b) in one --role all worker: dispatch included."
    )
    args = parser.parse_args()
    database_url = os.environ["DATABASE_URL"]
    redis_url = os.environ["REDIS_URL"]
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp"))
    bare_rate, bare_rss = bare(args.items, args.proposers, args.concurrency, redis_url, log_dir)
    run, api = slimmoa(
        args.items,
        args.proposers,
        args.concurrency,
        database_url,
        redis_url,
        log_dir,
        args.submit_items,
        args.single_worker,
    )
    workers = "one worker (--role all)" if args.single_worker else "control + inference workers"
    control = "" if args.single_worker else f", control worker {run.control_worker_rss / 2**20:.0f} MiB"
    print(f"items={args.items} proposers={args.proposers} threads x{args.concurrency}; (b) on {workers}")
    print(f"(a) bare Celery chord : {bare_rate:8.1f} items/s  worker peak RSS {bare_rss / 2**20:6.0f} MiB")
    print(
        f"(b) SlimMoA pipeline  : {run.items_per_s:8.1f} items/s  worker peak RSS "
        f"{run.stage_worker_rss / 2**20:6.0f} MiB{control}"
    )
    print(f"ratio (b)/(a)         : {run.items_per_s / bare_rate:8.2f}")
    print(f"submit of {args.items} items (one transaction): {run.submit_s:.2f} s")
    print(
        f"export of the finished job (pools, every candidate): {run.export_s:.2f} s"
        f" for {run.export_bytes / 2**10:.0f} KiB"
    )
    if api is not None:
        api_s, api_rss = api
        print(
            f"(c) submit of {args.submit_items} items to the API (POST /v1/jobs): {api_s:.2f} s"
            f"  API peak RSS {api_rss / 2**20:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
