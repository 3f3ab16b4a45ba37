"""Prometheus metrics of an inference worker: engine loads, batch sizes offered, stage outcomes,
stage time and tokens per model.

Served by `slimmoa worker --metrics-port N` (or WORKER_METRICS_PORT) at http://HOST:N/metrics;
`ops/grafana/slimmoa.json` charts them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.signals import task_postrun, task_prerun
from prometheus_client import Counter, Gauge, Histogram

from orchestrator.celery_app import TASK_AGGREGATOR, TASK_PROPOSER
from orchestrator.stage_info import stage_of

__all__ = [
    "ENGINE_EVICTIONS",
    "ENGINE_IN_FLIGHT",
    "ENGINE_LOADS",
    "ENGINE_LOAD_FAILED",
    "ENGINE_LOAD_FAILURES",
    "ENGINE_LOAD_SECONDS",
    "ENGINE_UNLOAD_SECONDS",
    "OFFERED_BATCH",
    "RESIDENT_GB",
    "STAGES",
    "STAGE_SECONDS",
    "TOKENS",
]

ENGINE_LOADS = Counter(
    "slimmoa_engine_loads", "Models made ready in this worker (cold loads and wakes).", ["model"]
)
ENGINE_LOAD_SECONDS = Histogram(
    "slimmoa_engine_load_seconds",
    "Seconds from engine start to ready.",
    ["model"],
    buckets=(0.01, 0.1, 1, 5, 10, 20, 30, 60, 120, 300),
)
ENGINE_EVICTIONS = Counter(
    "slimmoa_engine_evictions", "Models unloaded or put to sleep to make room for another.", ["model"]
)
ENGINE_UNLOAD_SECONDS = Histogram(
    "slimmoa_engine_unload_seconds",
    "Seconds to unload (or put to sleep) an evicted model.",
    ["model"],
    buckets=(0.01, 0.1, 1, 5, 10, 30, 60),
)
ENGINE_LOAD_FAILURES = Counter(
    "slimmoa_engine_load_failures", "Loads that failed, transient or permanent.", ["model"]
)
ENGINE_LOAD_FAILED = Gauge(
    "slimmoa_engine_load_failed",
    "1 while this worker remembers a permanent load failure of the model (its stages fail at once).",
    ["model"],
)
RESIDENT_GB = Gauge("slimmoa_resident_gb", "Memory of the models resident in this worker, GB (estimated).")
ENGINE_IN_FLIGHT = Gauge("slimmoa_engine_in_flight", "Generations in flight per model.", ["model"])
# Sampled when a request is submitted: the batch the engine can form from this worker's requests.
OFFERED_BATCH = Histogram(
    "slimmoa_engine_offered_batch",
    "Requests in flight on the model (this one included) when a request is submitted.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STAGES = Counter("slimmoa_stages", "Stage tasks finished, by stage and outcome.", ["stage", "outcome"])
STAGE_SECONDS = Histogram(
    "slimmoa_stage_seconds",
    "Seconds a stage task ran (read, generation, write), by stage and model; its count is the stage rate.",
    ["stage", "model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TOKENS = Counter("slimmoa_tokens", "Tokens of finished generations, by model and kind.", ["model", "kind"])

_STAGE_NAMES = {TASK_PROPOSER: "proposer", TASK_AGGREGATOR: "aggregator"}
# A worker thread runs one task at a time: its start time is kept per thread.
_started = threading.local()


@task_prerun.connect
def _stage_started(task: Any = None, **_: Any) -> None:
    _started.at = time.perf_counter()


@task_postrun.connect
def _stage_finished(task: Any = None, state: str | None = None, **_: Any) -> None:
    """Time stage attempts that ended the stage (stored, or recorded as failed); retries are not."""
    stage = _STAGE_NAMES.get(getattr(task, "name", ""))
    started = getattr(_started, "at", None)
    if stage is None or started is None or state != "SUCCESS":
        return
    info = stage_of(task.request)
    model = (info.model if info else None) or "unknown"
    STAGE_SECONDS.labels(stage, model).observe(time.perf_counter() - started)
