"""Prometheus metrics of an inference worker: engine loads, batch sizes offered, stage outcomes.

Served by `slimmoa worker --metrics-port N` (or WORKER_METRICS_PORT) at http://HOST:N/metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["ENGINE_IN_FLIGHT", "ENGINE_LOADS", "ENGINE_LOAD_SECONDS", "OFFERED_BATCH", "STAGES"]

ENGINE_LOADS = Counter("slimmoa_engine_loads", "Engines started (model loads) in this worker.", ["model"])
ENGINE_LOAD_SECONDS = Histogram(
    "slimmoa_engine_load_seconds",
    "Seconds from engine start to ready.",
    ["model"],
    buckets=(0.01, 0.1, 1, 5, 10, 20, 30, 60, 120, 300),
)
ENGINE_IN_FLIGHT = Gauge("slimmoa_engine_in_flight", "Generations in flight per model.", ["model"])
# Sampled when a request is submitted: the batch the engine can form from this worker's requests.
OFFERED_BATCH = Histogram(
    "slimmoa_engine_offered_batch",
    "Requests in flight on the model (this one included) when a request is submitted.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STAGES = Counter("slimmoa_stages", "Stage tasks finished, by stage and outcome.", ["stage", "outcome"])
