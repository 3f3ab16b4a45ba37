"""`slimmoa_queue_depth{queue}` on the API's `/metrics`: tasks waiting in each queue, read from Redis at
scrape time.

The queues are the control queue, the shared inference queue (judges), and both queues of every model
of the jobs that may still have stages to run (`orchestrator.routing`). A queue that grows while no
worker consumes it is a model without a live worker, or a host that cannot keep up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from db.residency import active_jobs
from db.session import session_scope
from orchestrator.recipes import Recipe
from orchestrator.routing import model_queues, queue_depths
from orchestrator.settings import Settings, get_settings

__all__ = ["QueueDepth"]

log = logging.getLogger(__name__)


class QueueDepth(Collector):
    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        self._clients: dict[str, redis.Redis] = {}
        # Parsed once per job, forgotten when the job ends.
        self._recipes: dict[str, Recipe] = {}

    def queues(self, settings: Settings) -> list[str]:
        with session_scope(settings.database_url) as session:
            jobs = active_jobs(session)
        self._recipes = {
            job_id: self._recipes.get(job_id) or Recipe.model_validate(data) for job_id, data in jobs
        }
        per_model = model_queues(list(self._recipes.values()))
        return [
            settings.queue_control,
            settings.queue_inference,
            *sorted(q for queues in per_model.values() for q in queues.queues),
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.settings or get_settings()
        family = GaugeMetricFamily(
            "slimmoa_queue_depth", "Tasks waiting in a queue (not yet taken by a worker).", labels=["queue"]
        )
        queues = self.queues(settings)
        client = self._clients.get(settings.redis_url)
        if client is None:
            client = self._clients[settings.redis_url] = redis.Redis.from_url(settings.redis_url)
        try:
            depths = queue_depths(client, queues)
        except redis.RedisError as exc:  # the scrape still answers; /healthz says Redis is down
            log.warning("queue depth: Redis did not answer: %s", exc)
            return
        for queue in queues:
            family.add_metric([queue], sum(depths[queue]))
        yield family
