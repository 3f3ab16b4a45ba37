"""Model affinity: which model queues an inference worker consumes, so that it swaps models rarely.

Stage tasks wait in per-model queues (`orchestrator.routing`). A scheduler thread in the worker looks
at those queues a few times a second and consumes:
  - the queues of every model resident in the engine host, and of any model that fits beside them;
  - when none of those has work left (queued or held by this worker) but another model's queues do,
    that model's queues alone: its first task evicts the least recently used engines and loads it,
    after which the models still resident are consumed again.
So a model is swapped in once its predecessors' backlog is drained, not once per item, and a job over
more models than fit costs about one load per model per layer.

Chat requests come first. Their stages wait in the models' chat queues; while any does, or runs here,
and for `CHAT_HOLD_S` after (the hop from a request's proposers to its aggregator), only chat queues
are consumed, and the worker's chat reserve (`chat_reserve` threads beyond `inference_concurrency`,
which bulk stages never get) is opened: a request's stages start at once although bulk stages hold
every other thread, and no new bulk stage joins the engines. There the request has the engine to
itself (`workers.engines.vllm_scheduler`). A model a chat request waits for is swapped in at once,
ahead of any backlog.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from db.residency import active_jobs
from db.session import session_scope
from orchestrator.ownership import EVERY_MODEL, ModelSelection
from orchestrator.recipes import Recipe
from orchestrator.routing import ModelQueues, chat_queue, model_queues, queue_depths
from orchestrator.settings import Settings

__all__ = ["CHAT_HOLD_S", "AffinityScheduler", "AffinityStep", "QueueSwitch"]

log = logging.getLogger(__name__)

# Bulk queues stay paused this long after the last chat stage was seen waiting or running here.
CHAT_HOLD_S = 2.0


class QueueSwitch(Protocol):
    """Starts and stops consuming a queue (the worker's consumer, or a test double)."""

    def add(self, queue: str) -> None: ...

    def cancel(self, queue: str) -> None: ...

    def reserve(self, open_: bool) -> None:
        """Let the chat reserve's threads take tasks (True), or only the bulk threads (False)."""


class Host(Protocol):
    def resident_models(self) -> set[str]: ...

    def room_gb(self) -> float: ...

    def check_liveness(self) -> list[str]: ...


def held_per_queue() -> Counter[str]:
    """Tasks this worker holds (reserved or running) per queue they came from."""
    held: Counter[str] = Counter()
    for request in list(worker_state.reserved_requests):
        queue = (request.delivery_info or {}).get("routing_key")
        if queue:
            held[queue] += 1
    return held


class AffinityScheduler:
    def __init__(
        self,
        settings: Settings,
        host: Host,
        switch: QueueSwitch,
        *,
        held: Callable[[], Counter[str]] = held_per_queue,
        selection: ModelSelection = EVERY_MODEL,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.host = host
        self.switch = switch
        self.held = held
        # Only these models' queues are consumed: the worker's model list.
        self.selection = selection
        # True once an operator cancelled this worker's QUEUE_INFERENCE consumer: take nothing new.
        self.draining = draining
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.consuming: set[str] = set()
        # A model chosen to be swapped in: only its queues are consumed until it is resident.
        self.target: str | None = None
        self._recipes: dict[str, Recipe] = {}
        # Until when only chat queues are consumed (monotonic seconds).
        self.chat_until = 0.0
        # Whether the chat reserve's threads may take tasks.
        self.reserve_open = False

    def models(self) -> dict[str, ModelQueues]:
        """The models this worker serves of the jobs that may still have stages to run, with their queues."""
        with session_scope(self.settings.database_url) as session:
            jobs = active_jobs(session)
        # Parsed once per job, forgotten when the job ends.
        self._recipes = {
            job_id: self._recipes.get(job_id) or Recipe.model_validate(data) for job_id, data in jobs
        }
        found = model_queues(list(self._recipes.values()))
        return {name: queues for name, queues in found.items() if self.selection.serves(name)}

    def backlog(self, models: dict[str, ModelQueues]) -> tuple[dict[str, int], dict[str, int], set[str]]:
        """Per model: tasks waiting or held here (all stages), and aggregations among them; and the
        models a chat request's stage waits for."""
        depths = queue_depths(self.redis, [q for m in models.values() for q in m.queues])
        held = self.held()
        work = {name: sum(sum(depths[q]) + held[q] for q in m.queues) for name, m in models.items()}
        finishing = {name: sum(depths[m.aggregations]) + held[m.aggregations] for name, m in models.items()}
        urgent = {name for name, m in models.items() if sum(depths[m.chat]) + held[m.chat]}
        return work, finishing, urgent

    def tick(self) -> None:
        """Look at the queues once and change what is consumed; called a few times a second."""
        self.host.check_liveness()
        if self.draining():
            self.target = None
            self._consume(set())
            return
        models = self.models()
        work, finishing, urgent = self.backlog(models)
        resident = self.host.resident_models()
        if self.target is not None and (self.target in resident or not work.get(self.target)):
            self.target = None
        if self.target is None:
            chosen = self._alongside(models, resident, work)
            waiting_chat = sorted(urgent - chosen)
            if waiting_chat:
                # A person waits: swap their model in now, whatever the other models' backlogs.
                self.target = waiting_chat[0]
                log.info("swapping in %s for a chat request", self.target)
            elif not any(work.get(name) for name in chosen):
                waiting = [name for name in models if work[name] and name not in chosen]
                if waiting:
                    # Items waiting only for their aggregation finish first; then the largest backlog.
                    self.target = max(waiting, key=lambda name: (finishing[name] > 0, work[name]))
                    log.info("swapping in %s (%s tasks waiting)", self.target, work[self.target])
        if self.target is not None:
            chosen = {self.target}
        now = time.monotonic()
        if urgent:
            self.chat_until = now + CHAT_HOLD_S
        chat = now < self.chat_until
        if chat:
            wanted = {models[name].chat for name in chosen if name in models}
        else:
            wanted = {q for name in chosen if name in models for q in models[name].queues}
        # A resident model's chat queue is always taken from: a request's first stage is not kept
        # waiting for a tick to notice its job.
        served = (name for name in resident if self.selection.serves(name))
        wanted |= {models[name].chat if name in models else chat_queue(name) for name in served}
        if not chat:
            self._reserve(False)  # before bulk queues are taken again: the reserve is not theirs
        self._consume(wanted)
        if chat:
            self._reserve(True)  # after bulk queues stopped: only chat stages fill it

    def _reserve(self, open_: bool) -> None:
        if open_ != self.reserve_open:
            self.switch.reserve(open_)
            self.reserve_open = open_

    def _alongside(
        self, models: dict[str, ModelQueues], resident: set[str], work: dict[str, int]
    ) -> set[str]:
        """Resident models, and the waiting ones that fit in the room left, largest backlog first."""
        chosen = set(resident)
        room = self.host.room_gb()
        for name in sorted(models, key=lambda n: -work[n]):
            if name in chosen or not work[name]:
                continue
            if models[name].memory_gb <= room:
                chosen.add(name)
                room -= models[name].memory_gb
        return chosen

    def _consume(self, wanted: set[str]) -> None:
        for queue in sorted(wanted - self.consuming):
            self.switch.add(queue)
        for queue in sorted(self.consuming - wanted):
            self.switch.cancel(queue)
        self.consuming = wanted

    def run(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.settings.affinity_interval_s):
            try:
                self.tick()
            except Exception:  # a database or broker blip: the next tick tries again
                log.exception("affinity scheduler tick failed")


class _ConsumerSwitch:
    """Queue changes made on the consumer's own loop, as Celery's add_consumer control command does."""

    def __init__(self, consumer: Any, queue: str, reserve: int) -> None:
        self.consumer = consumer
        self.queue = queue
        self.reserved = reserve
        # The worker starts with a prefetch count of all its threads: the reserve starts closed.
        consumer.qos.decrement_eventually(reserve)

    def add(self, queue: str) -> None:
        self.consumer.call_soon(self.consumer.add_task_queue, queue)

    def cancel(self, queue: str) -> None:
        self.consumer.call_soon(self.consumer.cancel_task_queue, queue)

    def reserve(self, open_: bool) -> None:
        """The prefetch count (tasks held unacknowledged: running, with late acks) grows or shrinks
        by the reserve; the consumer's loop applies it."""
        qos = self.consumer.qos
        (qos.increment_eventually if open_ else qos.decrement_eventually)(self.reserved)

    def draining(self) -> bool:
        """The shared inference queue is no longer consumed (`celery control cancel_consumer`)."""
        consumer = self.consumer.task_consumer
        return consumer is not None and not consumer.consuming_from(self.queue)


class AffinityStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the scheduler beside the worker's consumer (added by `slimmoa worker` for inference roles)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        from orchestrator.fleet import worker_selection
        from workers.stage_runner import engine_host

        host = engine_host()
        settings = host.settings
        self._stopped.clear()
        switch = _ConsumerSwitch(parent, settings.queue_inference, settings.chat_reserve)
        selection = worker_selection(settings)
        log.info("serving %s", selection.describe())
        scheduler = AffinityScheduler(settings, host, switch, selection=selection, draining=switch.draining)
        # A consumer restarted after a broker outage keeps consuming the model queues it had.
        prefix = f"{settings.queue_inference}."
        scheduler.consuming = {q for q in parent.app.amqp.queues.consume_from or {} if q.startswith(prefix)}
        self._thread = threading.Thread(
            target=scheduler.run, args=(self._stopped,), name="affinity", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
