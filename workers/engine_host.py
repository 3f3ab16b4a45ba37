"""The engines of one worker process: one asyncio loop thread, and a resident set within a memory budget.

Celery runs stage tasks in a threads pool (a prefork child cannot host vLLM: it cannot spawn the
engine process, and CUDA cannot be re-initialised after fork). Each task thread leases its model's
engine and hands the request to the loop with `run_coroutine_threadsafe`; requests from all threads
meet in the same engine, which batches them.

Residency: every engine counts its memory (the recipe's `memory_gb`, corrected by what the engine
reports once started) against the worker's budget. A model that does not fit evicts the least
recently used idle engines: put to sleep where the engine supports it (vLLM on GPU: weights to host
memory, woken in about a second), closed otherwise. An out-of-memory error at load lowers the budget
to what was resident and tries again with fewer models, instead of failing the same way forever.

Outcomes: `attempt` (and `attempt_stream`, its streaming form) is the one place where a stage's
exceptions become outcomes (`workers.outcomes`): whatever the load, the prompt or the generation
raises comes back as a `Failure`, transient or permanent. A model whose load failed permanently is
remembered for `LOAD_FAILURE_TTL_S`, so its stages fail at once instead of each paying for a load that
cannot work. Start, wake, sleep and close have time limits: a hung load frees the load lock when its
limit passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import Settings
from workers import metrics
from workers.engine_requests import EngineLoop
from workers.engines import ChatRequest, Engine, Generation, create_engine, residency
from workers.engines.errors import EngineOutOfMemory, EngineUnavailable, ModelTooLarge
from workers.outcomes import FailedLoads, Failure, LoadFailed, classify

__all__ = ["EngineHost", "LoadEvent", "LoadFailed", "Spec"]

log = logging.getLogger(__name__)
Spec = VllmModel | OpenAIModel | SyntheticModel
EngineKey = tuple[str, Spec]


@dataclass(frozen=True)
class LoadEvent:
    """One model made ready on this worker (a cold load or a wake, and what it evicted to fit), or a
    load that failed (`error` says why)."""

    model: str
    kind: Literal["load", "wake", "failed"]
    seconds: float
    evicted: list[str]
    unload_seconds: float
    job_id: str | None
    error: str | None = None


@dataclass
class _Resident:
    engine: Engine
    memory_gb: float
    # The model's `max_in_flight`: requests beyond it wait here, not in the engine.
    slots: threading.BoundedSemaphore | None
    asleep: bool = False
    # Task threads holding the engine (between lease and release): it is not evicted while held.
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)


class EngineHost:
    def __init__(
        self,
        settings: Settings,
        *,
        budget_gb: float | None = None,
        on_load: Callable[[LoadEvent], None] | None = None,
        factory: Callable[[str, Spec, Settings], Engine] = create_engine,
    ) -> None:
        self.settings = settings
        # None: no budget, every model stays resident once loaded.
        self.budget_gb = budget_gb
        self._on_load = on_load
        self._factory = factory
        self._loop = EngineLoop(settings.engine_request_timeout_s, self._replace)
        self._engines: dict[EngineKey, _Resident] = {}
        # Guards the table above and lease counts; waited on for an engine to become idle.
        self._state = threading.Condition()
        # One load or wake at a time: two models loading at once could both count on the same room.
        self._load_lock = threading.Lock()
        self._failed_loads = FailedLoads(settings.load_failure_ttl_s)

    # Outcomes

    def attempt(
        self, name: str, spec: Spec, prepare: Callable[[Engine], ChatRequest], job_id: str | None = None
    ) -> Generation | Failure:
        """One attempt of a stage on `name`: lease (load or wake), build the request with `prepare`,
        generate. Every exception on the way comes back as a Failure."""
        return self._attempt(name, spec, prepare, job_id, self.generate)

    def attempt_stream(
        self,
        name: str,
        spec: Spec,
        prepare: Callable[[Engine], ChatRequest],
        on_delta: Callable[[str], None],
        *,
        cancelled: Callable[[], bool] | None = None,
        job_id: str | None = None,
    ) -> Generation | Failure:
        """`attempt`, streamed: the text goes to `on_delta` in this thread as it is generated, and the
        Generation's text is exactly what it was given. Once `cancelled()` (asked between deltas) says
        so, the engine's request stops and the outcome is a permanent Failure; so is an exception
        from `on_delta`."""

        def stream(engine: Engine, request: ChatRequest) -> Generation:
            return self._loop.stream(engine, request, on_delta, cancelled)

        return self._attempt(name, spec, prepare, job_id, stream)

    def _attempt(
        self,
        name: str,
        spec: Spec,
        prepare: Callable[[Engine], ChatRequest],
        job_id: str | None,
        run: Callable[[Engine, ChatRequest], Generation],
    ) -> Generation | Failure:
        during = "loading"
        try:
            with self.lease(name, spec, job_id) as engine:
                during = "building the prompt"
                request = prepare(engine)
                during = "generating"
                return run(engine, request)
        except LoadFailed as exc:
            return exc.failure
        except Exception as exc:
            return classify(exc, name, during)

    def _load_failed(self, name: str, exc: Exception, seconds: float, job_id: str | None) -> LoadFailed:
        """Turn a load's exception into its outcome; remember it if permanent, and record it."""
        failure = classify(exc, name, "loading")
        metrics.ENGINE_LOAD_FAILURES.labels(name).inc()
        self._failed_loads.remember(name, failure)
        log.warning("loading %s failed (%s): %s", name, failure.kind, failure.message)
        if self._on_load is not None:
            self._on_load(LoadEvent(name, "failed", seconds, [], 0.0, job_id, error=failure.message))
        return LoadFailed(failure)

    # Residency

    def used_gb(self) -> float:
        with self._state:
            return self._used_gb()

    def _used_gb(self) -> float:
        return sum(r.memory_gb for r in self._engines.values() if not r.asleep)

    def resident_models(self) -> set[str]:
        """Names of the models that are loaded and awake."""
        with self._state:
            return {name for (name, _), r in self._engines.items() if not r.asleep}

    def room_gb(self) -> float:
        """Memory left in the budget without evicting anything (infinite without a budget)."""
        with self._state:
            return float("inf") if self.budget_gb is None else self.budget_gb - self._used_gb()

    @contextmanager
    def lease(self, name: str, spec: Spec, job_id: str | None = None) -> Iterator[Engine]:
        """The started engine for a recipe model, held (not evictable) until the block ends.

        Requests made within the block go to the engine at most `spec.max_in_flight` at a time.
        """
        # Same spec, same engine: recipes that share a model definition share its weights.
        key = (name, spec)
        with self._state:
            resident = self._engines.get(key)
            if resident is not None and not resident.asleep:
                resident.leases += 1
            else:
                resident = None
        if resident is None:
            remembered = self._failed_loads.get(name)
            if remembered is not None:
                raise LoadFailed(remembered)
            resident = self._admit(key, job_id)
        try:
            if resident.slots is None:
                yield resident.engine
            else:
                with resident.slots:
                    yield resident.engine
        finally:
            with self._state:
                resident.leases -= 1
                resident.last_used = time.monotonic()
                self._state.notify_all()

    def _admit(self, key: EngineKey, job_id: str | None) -> _Resident:
        """Load (or wake) a model, evicting least recently used idle engines to fit; returns it leased."""
        name, spec = key
        with self._load_lock:
            with self._state:
                resident = self._engines.get(key)
                if resident is not None and not resident.asleep:
                    resident.leases += 1
                    return resident
            # Stages that waited for the lock while this model failed to load fail with it, at once.
            remembered = self._failed_loads.get(name)
            if remembered is not None:
                raise LoadFailed(remembered)
            need = float(spec.memory_gb or 0.0)
            evicted: list[str] = []
            unload_s = 0.0
            while True:
                names, seconds = self._make_room(name, need)
                evicted += names
                unload_s += seconds
                started = time.perf_counter()
                try:
                    kind, resident = self._start(key, need)
                    break
                except EngineOutOfMemory as exc:
                    with self._state:
                        others = self._used_gb()
                    if others == 0:
                        raise self._load_failed(name, exc, time.perf_counter() - started, job_id) from exc
                    # The device holds less than the budget said: what was resident becomes the
                    # budget, so this model loads only after others made room for it (alone at worst).
                    self.budget_gb = max(others, need)
                    log.warning(
                        "loading %s ran out of memory with %.1f GB resident (%s); budget lowered to %.1f GB",
                        name,
                        others,
                        exc,
                        self.budget_gb,
                    )
                except Exception as exc:
                    raise self._load_failed(name, exc, time.perf_counter() - started, job_id) from exc
            seconds = time.perf_counter() - started
            metrics.ENGINE_LOADS.labels(name).inc()
            metrics.ENGINE_LOAD_SECONDS.labels(name).observe(seconds)
            metrics.RESIDENT_GB.set(self.used_gb())
            log.info("%s %s in %.1f s (evicted: %s)", kind, name, seconds, ", ".join(evicted) or "none")
            if self._on_load is not None:
                self._on_load(LoadEvent(name, kind, seconds, evicted, unload_s, job_id))
            return resident

    def _start(self, key: EngineKey, need: float) -> tuple[Literal["load", "wake"], _Resident]:
        name, spec = key
        with self._state:
            sleeping = self._engines.get(key)
        control = residency(sleeping.engine) if sleeping is not None else None
        if sleeping is not None and control is not None:
            self._loop.run(control.wake(), self.settings.engine_wake_timeout_s, f"wake of {name}")
            with self._state:
                sleeping.asleep = False
                sleeping.leases += 1
            return "wake", sleeping
        log.info("starting engine %s (%s)", name, spec.engine)
        engine = self._factory(name, spec, self.settings)
        try:
            self._loop.run(engine.start(), self.settings.engine_start_timeout_s, f"start of {name}")
        except BaseException:
            self._close(engine)
            raise
        control = residency(engine)
        reported = control.memory_gb if control is not None else None
        memory = reported if reported is not None else need
        slots = threading.BoundedSemaphore(spec.max_in_flight) if spec.max_in_flight else None
        resident = _Resident(engine, memory, slots, leases=1)
        with self._state:
            self._engines[key] = resident
        return "load", resident

    def _make_room(self, name: str, need: float) -> tuple[list[str], float]:
        """Evict idle engines, least recently used first, until `need` GB fit; waits for busy ones."""
        evicted: list[str] = []
        unload_s = 0.0
        deadline = time.monotonic() + self.settings.engine_request_timeout_s
        while True:
            with self._state:
                budget = self.budget_gb
                if budget is None or self._used_gb() + need <= budget:
                    return evicted, unload_s
                if need > budget:
                    raise ModelTooLarge(
                        f"{name} needs {need:g} GB, more than the worker's {budget:g} GB budget"
                    )
                idle = [(r.last_used, k) for k, r in self._engines.items() if not r.asleep and r.leases == 0]
                if not idle:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise EngineUnavailable(f"no room for {name}: every resident engine stays busy")
                    self._state.wait(min(remaining, 1.0))
                    continue
                _, key = min(idle, key=lambda entry: entry[0])
                victim = self._engines[key]
                # Out of the table (or asleep) before unloading: no new lease can pick it up.
                control = residency(victim.engine)
                if control is not None and control.supports_sleep:
                    victim.asleep = True
                else:
                    del self._engines[key]
            started = time.perf_counter()
            self._unload(victim)
            seconds = time.perf_counter() - started
            unload_s += seconds
            evicted.append(key[0])
            metrics.ENGINE_EVICTIONS.labels(key[0]).inc()
            metrics.ENGINE_UNLOAD_SECONDS.labels(key[0]).observe(seconds)
            metrics.RESIDENT_GB.set(self.used_gb())

    def _unload(self, victim: _Resident) -> None:
        control = residency(victim.engine)
        if victim.asleep and control is not None:
            self._loop.run(
                control.sleep(), self.settings.engine_sleep_timeout_s, f"sleep of {victim.engine.name}"
            )
            log.info("put %s to sleep", victim.engine.name)
        else:
            self._close(victim.engine)
            log.info("unloaded %s", victim.engine.name)

    def _close(self, engine: Engine) -> None:
        """Close an engine within its time limit; one that will not close is left behind, logged."""
        try:
            self._loop.run(engine.close(), self.settings.engine_close_timeout_s, f"close of {engine.name}")
        except Exception:
            log.exception("closing engine %s failed", engine.name)

    # Requests

    def generate(self, engine: Engine, request: ChatRequest) -> Generation:
        return self._loop.generate(engine, request)

    # Health

    def check_liveness(self) -> list[str]:
        """Drop engines whose process died, so that the next request starts a fresh one; their names."""
        with self._state:
            dead = [r.engine for r in self._engines.values() if not r.asleep and not _alive(r.engine)]
        for engine in dead:
            self._replace(engine)
        return [engine.name for engine in dead]

    def _replace(self, engine: Engine) -> None:
        """Forget an engine that died (a live one stays); its requests fail as unavailable and their
        stages retry on a new one. Also told of every request that failed as unavailable."""
        if _alive(engine):
            return
        with self._state:
            for key, known in list(self._engines.items()):
                if known.engine is engine:
                    log.warning("engine %s died; it is restarted on the next request", engine.name)
                    del self._engines[key]
                    self._loop.spawn(engine.close())
            self._state.notify_all()
        metrics.RESIDENT_GB.set(self.used_gb())

    def shutdown(self) -> None:
        with self._state:
            engines = [r.engine for r in self._engines.values()]
            self._engines.clear()
        for engine in engines:
            # Shutting down: one engine failing to close must not keep the others.
            self._close(engine)
        self._loop.stop()


def _alive(engine: Engine) -> bool:
    control = residency(engine)
    return control is None or control.alive
