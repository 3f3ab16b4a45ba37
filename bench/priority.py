"""Which mechanism lets an interactive task overtake a bulk backlog on the same Celery worker over Redis.

    python -m bench.priority [--backlog 500] [--task-ms 50] [--bulk-queues 4] [--concurrency 16]
                             [--probes 6] [--rounds 3] [--mechanisms fifo,steps,...]

Per mechanism, one real worker set up as the inference worker is (threads pool of `--concurrency`,
`worker_prefetch_multiplier=1`, `task_acks_late`). First `--probes` interactive no-op tasks are sent
to the idle worker, one at a time; then, `--rounds` times, `--backlog` bulk tasks that sleep 0.5 to
1.5 times `--task-ms` are queued, spread over `--bulk-queues` queues (a worker consumes two per
model), and while the worker drains them `--probes` interactive tasks are sent at regular intervals.
Each interactive task records when it started; its wait is started - sent. Printed per mechanism:
the median and largest wait, idle and under the backlog, and the ratio of the medians.

Mechanisms (where priorities exist, bulk tasks are sent with priority 9 and interactive ones with 0):
  fifo         no priorities, the interactive task in a bulk queue: the baseline
  steps        the bulk queues only, Celery's Redis priorities (`priority_steps` 0-9)
  queues       an interactive queue the worker lists first (`queue_order_strategy: priority`)
  queues-rr    the same queues in kombu's default order, round robin
  queues-last  as `queues`, with the interactive queue listed after the bulk ones (as when a queue is
               added at run time, which is how the affinity scheduler adds queues)
Needs REDIS_URL or BENCH_REDIS_URL (a Redis database this benchmark may fill and empty).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14"
MECHANISM = os.environ.get("BENCH_PRIORITY_MECHANISM", "fifo")
PREFIX = os.environ.get("BENCH_QUEUE", "bench.priority")
INTERACTIVE_QUEUE = f"{PREFIX}.interactive"
STARTS_KEY = f"{PREFIX}.starts"
DONE_KEY = f"{PREFIX}.done"
MECHANISMS = ["fifo", "steps", "queues", "queues-rr", "queues-last"]
BULK_PRIORITY = 9
INTERACTIVE_PRIORITY = 0
ROOT = Path(__file__).resolve().parent.parent


def transport_options(mechanism: str) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": 3600}
    if mechanism == "steps":
        options["priority_steps"] = list(range(10))
    if mechanism in ("queues", "queues-last"):
        options["queue_order_strategy"] = "priority"
    return options


def celery_app(mechanism: str) -> Celery:
    """The app of the worker and of the sender, configured for one mechanism."""
    celery = Celery("bench_priority", broker=BROKER)
    celery.conf.update(
        broker_transport_options=transport_options(mechanism),
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return celery


# The worker's app (`celery -A bench.priority`), configured from its environment.
app = celery_app(MECHANISM)
_store = redis.Redis.from_url(BROKER)


@app.task(name="bench.priority.bulk")
def bulk(ms: float) -> None:
    if ms:
        time.sleep(ms / 1000)
    _store.incr(DONE_KEY)


@app.task(name="bench.priority.interactive")
def interactive(sent: float) -> None:
    _store.rpush(STARTS_KEY, json.dumps([sent, time.time()]))


def bulk_queues(count: int) -> list[str]:
    return [f"{PREFIX}.bulk{i}" for i in range(count)]


def _queues(mechanism: str, count: int) -> list[str]:
    """The queues the worker consumes, in the order it lists them."""
    if mechanism in ("fifo", "steps"):
        return bulk_queues(count)
    if mechanism == "queues-last":
        return [*bulk_queues(count), INTERACTIVE_QUEUE]
    return [INTERACTIVE_QUEUE, *bulk_queues(count)]


def _send_interactive(sender: Celery, mechanism: str) -> None:
    queue = INTERACTIVE_QUEUE if mechanism.startswith("queues") else bulk_queues(1)[0]
    priority = None if mechanism == "fifo" else INTERACTIVE_PRIORITY
    sender.send_task("bench.priority.interactive", (time.time(),), queue=queue, priority=priority)


def _send_backlog(sender: Celery, mechanism: str, args: argparse.Namespace) -> None:
    """The bulk tasks, spread evenly over the bulk queues."""
    priority = BULK_PRIORITY if mechanism == "steps" else None
    queues = bulk_queues(args.bulk_queues)
    # Stages differ in length (answers do): 0.5 to 1.5 times --task-ms, the same draw in every run.
    lengths = random.Random(7)
    with sender.producer_or_acquire() as producer:
        for i in range(args.backlog):
            ms = args.task_ms * lengths.uniform(0.5, 1.5)
            queue = queues[i % len(queues)]
            sender.send_task("bench.priority.bulk", (ms,), queue=queue, priority=priority, producer=producer)


def _waits(store: redis.Redis, count: int, timeout_s: float) -> list[float]:
    """The waits (seconds) of the next `count` interactive tasks to start."""
    waits: list[float] = []
    deadline = time.monotonic() + timeout_s
    while len(waits) < count:
        reply = store.blpop([STARTS_KEY], timeout=max(1, int(deadline - time.monotonic())))
        if reply is None:
            raise TimeoutError(f"{count - len(waits)} interactive tasks did not start in {timeout_s:g} s")
        sent, started = json.loads(reply[1])
        waits.append(started - sent)
    return waits


def _clear(store: redis.Redis) -> None:
    """The benchmark's queues, its records, and kombu's bindings of its queues."""
    keys = [
        key for pattern in (f"{PREFIX}*", f"_kombu.binding*.{PREFIX}*") for key in store.scan_iter(pattern)
    ]
    if keys:
        store.delete(*keys)


@contextmanager
def _worker(mechanism: str, args: argparse.Namespace) -> Iterator[None]:
    """A worker for one mechanism, as long as the block runs; its log is kept if the block fails."""
    env = {
        **os.environ,
        "BENCH_PRIORITY_MECHANISM": mechanism,
        "BENCH_REDIS_URL": BROKER,
        "BENCH_QUEUE": PREFIX,
    }
    command = [sys.executable, "-m", "celery", "-A", "bench.priority", "worker", "-P", "threads"]
    command += [
        "-c",
        str(args.concurrency),
        "-Q",
        ",".join(_queues(mechanism, args.bulk_queues)),
        "--loglevel",
        "warning",
    ]
    command += [
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{uuid.uuid4().hex[:8]}@bench",
    ]
    log = Path(tempfile.gettempdir()) / f"bench-priority-{mechanism}-{os.getpid()}.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield
    except Exception:
        sys.stderr.write(f"worker log: {log}\n")
        raise
    else:
        log.unlink()
    finally:
        worker.terminate()
        worker.wait(30)


def measure(mechanism: str, args: argparse.Namespace, store: redis.Redis) -> tuple[list[float], list[float]]:
    """Waits of interactive tasks on the idle worker and under the backlog, for one mechanism."""
    sender = celery_app(mechanism)
    _clear(store)
    try:
        with _worker(mechanism, args):
            _send_interactive(sender, mechanism)
            _waits(store, 1, 120)  # the worker is up
            idle: list[float] = []
            for _ in range(args.probes):
                _send_interactive(sender, mechanism)
                idle += _waits(store, 1, 30)
                time.sleep(0.05)
            busy: list[float] = []
            drain_s = args.backlog * args.task_ms / 1000 / args.concurrency
            for round_ in range(1, args.rounds + 1):
                _send_backlog(sender, mechanism, args)
                # Probes spread over the first 70 % of the drain, none before the worker is busy.
                time.sleep(drain_s * 0.1)
                for _ in range(args.probes):
                    _send_interactive(sender, mechanism)
                    time.sleep(drain_s * 0.6 / args.probes)
                busy += _waits(store, args.probes, 120 + drain_s * 10)
                while int(store.get(DONE_KEY) or 0) < round_ * args.backlog:
                    time.sleep(0.05)
            return idle, busy
    finally:
        sender.close()
        _clear(store)


def main() -> None:
    parser = argparse.ArgumentParser(description="How long an interactive task waits behind a bulk backlog.")
    parser.add_argument("--backlog", type=int, default=500)
    parser.add_argument("--task-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    # An inference worker consumes two queues per model it holds (proposals, aggregations).
    parser.add_argument("--bulk-queues", type=int, default=4)
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    args = parser.parse_args()
    store = redis.Redis.from_url(BROKER)
    drain_s = args.backlog * args.task_ms / 1000 / args.concurrency
    print(
        f"backlog {args.backlog} bulk tasks of {args.task_ms:g} ms in {args.bulk_queues} queues, "
        f"{args.concurrency} threads "
        f"(drained in about {drain_s:.2f} s); {args.probes} interactive tasks idle, "
        f"{args.probes} x {args.rounds} rounds under the backlog; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'mechanism':<12} {'idle median':>12} {'idle max':>10} {'busy median':>12} {'busy max':>10}"
        f" {'ratio':>8}"
    )
    for mechanism in args.mechanisms.split(","):
        idle, busy = measure(mechanism, args, store)
        ratio = statistics.median(busy) / statistics.median(idle)
        print(
            f"{mechanism:<12} {statistics.median(idle) * 1000:>9.1f} ms {max(idle) * 1000:>7.1f} ms "
            f"{statistics.median(busy) * 1000:>9.1f} ms {max(busy) * 1000:>7.1f} ms {ratio:>7.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
