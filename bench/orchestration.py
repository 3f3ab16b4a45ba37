"""Orchestration overhead: SlimMoA's pipeline against a bare Celery chord of the same shape.

    python -m bench.orchestration [--items 2000] [--proposers 3] [--concurrency 16]

In ONE run, on the same Redis and the same worker set-up (one worker process, a threads pool of
`--concurrency`), it measures:
  (a) bare Celery: per item a chord of N no-op proposers + 1 no-op aggregator (bench/bare_chord.py);
  (b) SlimMoA: the same items through dispatch -> proposer chord -> aggregator, on the synthetic engine
      at zero latency, with every candidate and output stored in Postgres;
and prints items/s for each and the ratio (b)/(a). It also reports the peak RSS of the workers.
Needs DATABASE_URL (Postgres) and REDIS_URL; uses its own schema, Redis database and queues.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from bench.services import isolated_services

ROOT = Path(__file__).resolve().parent.parent


def _start_worker(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )


def _peak_rss(process: psutil.Process, peak: int) -> int:
    try:
        rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
    except psutil.Error:
        return peak
    return max(peak, int(rss))


def _wait(
    done: Callable[[], int], total: int, process: subprocess.Popen[bytes], timeout: float
) -> tuple[float, int]:
    """Seconds until done() reaches total, and the worker's peak RSS meanwhile."""
    watched = psutil.Process(process.pid)
    started, peak = time.perf_counter(), 0
    while done() < total:
        if process.poll() is not None:
            raise RuntimeError("the worker exited; see its log")
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"not finished after {timeout:.0f} s ({done()}/{total})")
        peak = _peak_rss(watched, peak)
        time.sleep(0.05)
    return time.perf_counter() - started, peak


def bare(items: int, proposers: int, concurrency: int, redis_url: str, log_dir: Path) -> tuple[float, int]:
    queue = f"bench.bare.{uuid.uuid4().hex[:6]}"
    env = {"BENCH_REDIS_URL": redis_url, "BENCH_QUEUE": queue, "BENCH_PROPOSERS": str(proposers)}
    os.environ.update(env)
    from bench import bare_chord

    bare_chord.QUEUE, bare_chord.DONE_KEY = queue, f"{queue}.done"
    bare_chord.app.conf.update(broker_url=redis_url, result_backend=redis_url, task_default_queue=queue)
    client = redis.Redis.from_url(redis_url)
    worker = _start_worker(
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
        _, peak = _wait(lambda: int(client.get(bare_chord.DONE_KEY) or 0), items, worker, timeout=1800)
        return items / (time.perf_counter() - started), peak
    finally:
        worker.terminate()
        worker.wait()


def slimmoa(
    items: int, proposers: int, concurrency: int, database_url: str, redis_url: str, log_dir: Path
) -> tuple[float, int, float]:
    with isolated_services(database_url, redis_url, concurrency) as env:
        return _through_pipeline(items, proposers, env, log_dir)


def _through_pipeline(
    items: int, proposers: int, env: dict[str, str], log_dir: Path
) -> tuple[float, int, float]:
    from db.session import session_scope
    from orchestrator.celery_app import app
    from orchestrator.jobs import create_job, enqueue_job
    from orchestrator.recipes import parse_recipe
    from orchestrator.schemas import InputRecord

    url = env["DATABASE_URL"]
    recipe = parse_recipe(
        {
            "name": "bench",
            "models": {"p": {"engine": "synthetic", "output_tokens": 32}, "agg": {"engine": "synthetic"}},
            "layers": [{"proposers": [{"model": "p", "samples": proposers, "sampling": {"seed": 1}}]}],
            "aggregator": {"model": "agg"},
        }
    )
    records = [InputRecord(instruction=f"Benchmark prompt number {i}: say something.") for i in range(items)]
    worker = _start_worker(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "warning"],
        env,
        log_dir / "slimmoa-worker.log",
    )
    try:
        while not app.control.ping(timeout=1.0):
            time.sleep(0.2)
        started = time.perf_counter()
        job_id = create_job(url, recipe, records)
        submitted = time.perf_counter() - started
        enqueue_job(job_id)

        def done() -> int:
            from db import queries

            with session_scope(url) as session:
                job = queries.get_job(session, job_id)
                return job.items_done if job else 0

        _, peak = _wait(done, items, worker, timeout=3600)
        return items / (time.perf_counter() - started), peak, submitted
    finally:
        worker.terminate()
        worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    database_url = os.environ["DATABASE_URL"]
    redis_url = os.environ["REDIS_URL"]
    log_dir = Path(os.environ.get("BENCH_LOG_DIR", "/tmp"))
    bare_rate, bare_rss = bare(args.items, args.proposers, args.concurrency, redis_url, log_dir)
    rate, rss, submit_s = slimmoa(
        args.items, args.proposers, args.concurrency, database_url, redis_url, log_dir
    )
    print(f"items={args.items} proposers={args.proposers} worker=threads x{args.concurrency}")
    print(f"(a) bare Celery chord : {bare_rate:8.1f} items/s  worker peak RSS {bare_rss / 2**20:6.0f} MiB")
    print(f"(b) SlimMoA pipeline  : {rate:8.1f} items/s  worker peak RSS {rss / 2**20:6.0f} MiB")
    print(f"ratio (b)/(a)         : {rate / bare_rate:8.2f}")
    print(f"submit of {args.items} items (one transaction): {submit_s:.2f} s")


if __name__ == "__main__":
    main()
