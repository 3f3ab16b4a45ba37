"""Prometheus metrics of an inference worker: engine loads, batch sizes offered, stage outcomes.

Served by `slimmoa worker --metrics-port N` (or WORKER_METRICS_PORT) at http://HOST:N/metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
