"""The baseline of bench/orchestration.py: a bare Celery chord of SlimMoA's shape, doing nothing.

Per item: a chord of three no-op "proposers" and one no-op "aggregator" that counts finished items
in Redis. No database, no engine: what Celery and Redis alone cost.
"""

from __future__ import annotations

import os

import redis
from celery import Celery, chord, group

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("BENCH_QUEUE", "bench.bare")
DONE_KEY = f"{QUEUE}.done"

app = Celery("bare_chord", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.propose")
def propose(item: int, slot: int) -> int:
    return item * 10 + slot


@app.task(name="bench.aggregate")
def aggregate(item: int) -> int:
    return int(redis.Redis.from_url(BROKER).incr(DONE_KEY))


def send(items: int, proposers: int = 3) -> None:
    for item in range(items):
        chord(group(propose.si(item, slot) for slot in range(proposers)), aggregate.si(item)).apply_async()
