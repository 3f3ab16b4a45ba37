"""The resident set: models within a memory budget, LRU eviction, and queue affinity in a worker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from db import residency
from db.models import Candidate, EngineLoad, Item
from db.session import session_scope
from orchestrator.celery_app import TASK_DISPATCH
from orchestrator.celery_app import app as celery_app
from orchestrator.planning import plan_memory
from orchestrator.recipes import Recipe, SyntheticModel
from orchestrator.routing import BULK_PRIORITY, ModelQueues, priority_lists
from orchestrator.settings import Settings, get_settings
from tests.conftest import Switch, recipe_from_yaml, sample_records, stop_process, store, wait_for_job
from workers.affinity import AffinityScheduler
from workers.engine_host import EngineHost, LoadEvent
from workers.engines import ChatRequest, EngineOutOfMemory, EngineUnavailable, Generation, ModelTooLarge
from workers.engines.synthetic import SyntheticEngine


def spec(memory_gb: float) -> SyntheticModel:
    return SyntheticModel(engine="synthetic", memory_gb=memory_gb)


def request() -> ChatRequest:
    from orchestrator.contracts import ChatMessage
    from orchestrator.recipes import SamplingSpec

    return ChatRequest.build("r", [ChatMessage(role="user", content="hi")], SamplingSpec(max_tokens=4))


class Sleepy(SyntheticEngine):
    """A synthetic engine with a sleep mode, as vLLM has on a GPU (the Residency protocol)."""

    alive = True
    memory_gb = None

    @property
    def supports_sleep(self) -> bool:
        return True

    async def sleep(self) -> None:
        self.asleep = True

    async def wake(self) -> None:
        self.asleep = False


@contextmanager
def host(budget_gb: float | None, **kwargs: object) -> Iterator[tuple[EngineHost, list[LoadEvent]]]:
    events: list[LoadEvent] = []
    engines = EngineHost(Settings(), budget_gb=budget_gb, on_load=events.append, **kwargs)  # type: ignore[arg-type]
    try:
        yield engines, events
    finally:
        engines.shutdown()


def use(engines: EngineHost, name: str, memory_gb: float) -> None:
    with engines.lease(name, spec(memory_gb)) as engine:
        assert engines.generate(engine, request()).text


def test_the_least_recently_used_idle_model_makes_room() -> None:
    with host(4.0) as (engines, events):
        use(engines, "a", 2)
        use(engines, "b", 2)
        use(engines, "a", 2)  # b is now the least recently used
        use(engines, "c", 2)
        assert engines.resident_models() == {"a", "c"}
        assert [(e.model, e.kind, e.evicted) for e in events] == [
            ("a", "load", []),
            ("b", "load", []),
            ("c", "load", ["b"]),
        ]
        use(engines, "a", 2)
        assert len(events) == 3, "a resident model is not loaded again"


def test_a_model_in_use_is_not_evicted_until_its_requests_end() -> None:
    with host(2.0) as (engines, events):
        loaded_b = threading.Event()
        with engines.lease("a", spec(2)):
            waiting = threading.Thread(target=lambda: (use(engines, "b", 2), loaded_b.set()))
            waiting.start()
            time.sleep(0.3)
            assert not loaded_b.is_set() and engines.resident_models() == {"a"}
        waiting.join(timeout=10)
        assert loaded_b.is_set() and engines.resident_models() == {"b"}
        assert events[-1].evicted == ["a"]


def test_no_room_while_every_model_stays_busy_is_a_transient_error() -> None:
    settings = Settings(engine_request_timeout_s=0.5)
    engines = EngineHost(settings, budget_gb=2.0)
    try:
        with engines.lease("a", spec(2)), pytest.raises(EngineUnavailable, match="no room for b"):
            use(engines, "b", 2)
    finally:
        engines.shutdown()


def test_a_model_larger_than_the_budget_is_a_permanent_error() -> None:
    with host(2.0) as (engines, _), pytest.raises(ModelTooLarge, match="needs 3 GB"):
        use(engines, "huge", 3)


def test_engines_with_a_sleep_mode_sleep_and_wake_instead_of_reloading() -> None:
    started: list[str] = []

    def factory(name: str, model: object, settings: Settings) -> Sleepy:
        started.append(name)
        return Sleepy(name, model)  # type: ignore[arg-type]

    with host(2.0, factory=factory) as (engines, events):
        use(engines, "a", 2)
        use(engines, "b", 2)
        use(engines, "a", 2)
        assert started == ["a", "b"], "a sleeping model is woken, not started again"
        assert [(e.model, e.kind, e.evicted) for e in events] == [
            ("a", "load", []),
            ("b", "load", ["a"]),
            ("a", "wake", ["b"]),
        ]
        assert engines.used_gb() == 2.0


def test_out_of_memory_at_load_lowers_the_resident_set() -> None:
    engines: EngineHost

    class Cramped(SyntheticEngine):
        """The device really holds 4 GB, though the budget says 10."""

        async def start(self) -> None:
            if engines.used_gb() + 2 > 4:
                raise EngineOutOfMemory("CUDA out of memory")

    with host(10.0, factory=lambda name, model, settings: Cramped(name, model)) as (engines, events):
        use(engines, "a", 2)
        use(engines, "b", 2)
        use(engines, "c", 2)
        assert engines.budget_gb == 4.0, "the budget is what was resident when the load failed"
        assert engines.resident_models() == {"b", "c"}
        assert events[-1].evicted == ["a"]
        use(engines, "d", 2)
        assert len(engines.resident_models()) == 2, "later loads respect the lowered budget"


def test_a_model_gets_at_most_max_in_flight_requests_at_once() -> None:
    import asyncio

    peak = Counter[str]()
    now = Counter[str]()

    class Counting(SyntheticEngine):
        async def generate(self, request: ChatRequest) -> Generation:
            now["n"] += 1
            peak["n"] = max(peak["n"], now["n"])
            await asyncio.sleep(0.05)
            now["n"] -= 1
            return await super().generate(request)

    model = SyntheticModel(engine="synthetic", max_in_flight=3)
    with host(None, factory=lambda name, m, settings: Counting(name, m)) as (engines, _):

        def one() -> None:
            with engines.lease("m", model) as engine:
                engines.generate(engine, request())

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert peak["n"] == 3, "requests met in the engine, never more than max_in_flight"


class FakeHost:
    def __init__(self, budget_gb: float) -> None:
        self.budget_gb = budget_gb
        self.resident: dict[str, float] = {}

    def resident_models(self) -> set[str]:
        return set(self.resident)

    def room_gb(self) -> float:
        return self.budget_gb - sum(self.resident.values())

    def check_liveness(self) -> list[str]:
        return []


@pytest.fixture
def queues(services: dict[str, str]) -> Iterator[dict[str, ModelQueues]]:
    """Two models' queues, of names no job uses, on the test Redis."""
    prefix = f"affinity-test.{uuid.uuid4().hex[:8]}"
    models = {
        name: ModelQueues(
            name, 1.5, f"{prefix}.{name}", f"{prefix}.{name}.aggregate", f"{prefix}.{name}.chat"
        )
        for name in ("a", "b")
    }
    yield models
    client = redis.Redis.from_url(services["REDIS_URL"])
    client.delete(*[key for m in models.values() for q in m.queues for key in priority_lists(q)])


def bulk(queue: str) -> str:
    """The list of a queue's lowest priority step, where a bulk job's stages wait by default."""
    return priority_lists(queue)[BULK_PRIORITY]


def scheduler(models: dict[str, ModelQueues], fake: FakeHost, held: Counter[str]) -> AffinityScheduler:
    chosen = AffinityScheduler(get_settings(), fake, Switch(), held=lambda: held)
    chosen.models = lambda: models  # type: ignore[method-assign]
    return chosen


def test_affinity_drains_the_resident_model_before_swapping(queues: dict[str, ModelQueues]) -> None:
    client = redis.Redis.from_url(get_settings().redis_url)
    a, b = queues["a"], queues["b"]
    fake, held = FakeHost(budget_gb=2.0), Counter[str]()
    chooser = scheduler(queues, fake, held)
    switch = chooser.switch
    assert isinstance(switch, Switch)

    client.rpush(bulk(a.proposals), *range(5))
    chooser.tick()
    assert switch.consumed == set(a.queues), "nothing resident: the model with work fits and is consumed"

    fake.resident = {"a": 1.5}
    client.rpush(bulk(b.aggregations), *range(3))
    chooser.tick()
    assert switch.consumed == set(a.queues), "b does not fit beside a: a's backlog goes first"

    client.delete(bulk(a.proposals))
    held[a.proposals] = 2
    chooser.tick()
    assert switch.consumed == set(a.queues), "a's tasks still held here: no swap yet"

    held.clear()
    chooser.tick()
    # a's chat queue stays consumed while a is resident: a chat request for it needs no load.
    assert switch.consumed == {*b.queues, a.chat}, "a drained: b alone is consumed until it is loaded"
    assert chooser.target == "b"

    fake.resident = {"b": 1.5}
    client.rpush(bulk(a.proposals), 1)
    chooser.tick()
    assert chooser.target is None and switch.consumed == set(b.queues)


def test_affinity_without_a_budget_consumes_every_model_with_work(queues: dict[str, ModelQueues]) -> None:
    client = redis.Redis.from_url(get_settings().redis_url)
    fake = FakeHost(budget_gb=float("inf"))
    chooser = scheduler(queues, fake, Counter())
    client.rpush(bulk(queues["a"].proposals), 1)
    client.rpush(bulk(queues["b"].aggregations), 1)
    chooser.tick()
    assert chooser.switch.consumed == {*queues["a"].queues, *queues["b"].queues}  # type: ignore[attr-defined]


def test_aggregations_waiting_are_swapped_in_before_a_bigger_proposal_backlog(
    queues: dict[str, ModelQueues], services: dict[str, str]
) -> None:
    client = redis.Redis.from_url(services["REDIS_URL"])
    c = ModelQueues("c", 1.5, *(q + "-c" for q in queues["a"].queues))
    models = {**queues, "c": c}
    fake = FakeHost(budget_gb=2.0)
    fake.resident = {"c": 1.5}
    chooser = scheduler(models, fake, Counter())
    client.rpush(bulk(queues["a"].proposals), *range(50))
    client.rpush(bulk(queues["b"].aggregations), 1)
    try:
        chooser.tick()
        assert chooser.target == "b", "items one aggregation from done finish before new proposals"
    finally:
        client.delete(*[key for q in c.queues for key in priority_lists(q)])


def test_a_waiting_chat_stage_swaps_its_model_in_ahead_of_the_backlog(
    queues: dict[str, ModelQueues],
) -> None:
    client = redis.Redis.from_url(get_settings().redis_url)
    a, b = queues["a"], queues["b"]
    fake = FakeHost(budget_gb=2.0)
    fake.resident = {"a": 1.5}
    chooser = scheduler(queues, fake, Counter())
    client.rpush(bulk(a.proposals), *range(50))
    client.rpush(priority_lists(b.proposals)[1], 1)
    chooser.tick()
    assert chooser.target is None, "a bulk job's stage of another model waits for the resident backlog"
    client.rpush(b.chat, 1)  # a chat request's stage
    chooser.tick()
    assert chooser.target == "b", "the model a person waits for is swapped in at once"
    consumed = chooser.switch.consumed  # type: ignore[attr-defined]
    assert consumed == {a.chat, b.chat}, "only chat stages are taken while one waits"
    client.delete(b.chat)
    fake.resident = {"b": 1.5}
    chooser.chat_until = 0.0  # the hold after the last chat stage has passed
    chooser.tick()
    assert chooser.switch.consumed == set(b.queues), "bulk stages are taken again"  # type: ignore[attr-defined]


def test_bulk_queues_pause_while_a_chat_stage_waits_or_runs(queues: dict[str, ModelQueues]) -> None:
    client = redis.Redis.from_url(get_settings().redis_url)
    a = queues["a"]
    held = Counter[str]()
    chooser = scheduler(queues, FakeHost(budget_gb=float("inf")), held)
    client.rpush(bulk(a.proposals), *range(20))
    chooser.tick()
    assert chooser.switch.consumed == set(a.queues)  # type: ignore[attr-defined]
    held[a.chat] = 1  # a chat request's proposer runs here
    chooser.tick()
    assert chooser.switch.consumed == {a.chat}, "no new bulk stage joins the engine's batch"  # type: ignore[attr-defined]
    assert chooser.switch.reserve_open, "the chat reserve's threads take the request's stages"  # type: ignore[attr-defined]
    held.clear()
    chooser.tick()
    assert chooser.switch.consumed == {a.chat}, "held a moment, for the request's next stage"  # type: ignore[attr-defined]
    chooser.chat_until = 0.0
    chooser.tick()
    assert chooser.switch.consumed == set(a.queues) and not chooser.switch.reserve_open  # type: ignore[attr-defined]


def test_finished_pools_are_aggregated_while_later_proposals_wait(
    database_url: str, worker: subprocess.Popen[bytes]
) -> None:
    from db.models import Output
    from tests.conftest import submit

    suffix = uuid.uuid4().hex[:6]
    recipe = recipe_from_yaml(
        f"""
name: streaming
models:
  stream-{suffix}: {{engine: synthetic, latency_ms: 30}}
layers: [{{proposers: [{{model: stream-{suffix}, samples: 3}}]}}]
aggregator: {{model: stream-{suffix}}}
"""
    )
    job_id = submit(database_url, recipe, sample_records(80))
    assert wait_for_job(database_url, job_id).status == "succeeded"
    with session_scope(database_url) as session:
        first_output = session.scalar(
            select(func.min(Output.created_at)).join(Item).where(Item.job_id == job_id)
        )
        later = session.scalar(
            select(func.count())
            .select_from(Candidate)
            .join(Item)
            .where(Item.job_id == job_id, Candidate.created_at > first_output)
        )
    # With one queue for every stage the first aggregation would wait behind all 240 proposals.
    assert later > 80, f"only {later} of 240 candidates came after the first output"


# --- A real worker with a memory budget --------------------------------------------------------------


@contextmanager
def budget_worker(
    services: dict[str, str], log_path: Path, memory_gb: float, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `slimmoa worker --memory-gb N` on queues of its own; yields it and its control queue."""
    prefix = f"slimmoa.test.budget.{uuid.uuid4().hex[:8]}"
    control = f"{prefix}.control"
    own = {"QUEUE_CONTROL": control, "QUEUE_INFERENCE": f"{prefix}.inference"}
    command = [sys.executable, "-m", "orchestrator.cli", "worker", "--memory-gb", str(memory_gb)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--concurrency", "8", "--loglevel", "info"],
            env={**os.environ, **services, **own, "STAGE_RETRY_BACKOFF_S": "0.2", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while b"ready." not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield process, control
    finally:
        stop_process(process, timeout=60)


def run_job(database_url: str, control: str, recipe: Recipe, items: int) -> str:
    job_id = store(database_url, recipe, sample_records(items), name="residency")
    celery_app.send_task(TASK_DISPATCH, args=(job_id,), queue=control)
    return job_id


def job_candidates(database_url: str, job_id: str) -> tuple[int, int]:
    """Candidate rows of a job, and distinct (item, layer, slot) among them."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Candidate.item_id, Candidate.layer, Candidate.slot).join(Item).where(Item.job_id == job_id)
        ).all()
    return len(rows), len(set(rows))


def job_loads(database_url: str, job_id: str) -> list[tuple[str, list[str]]]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(EngineLoad.model, EngineLoad.evicted)
            .where(EngineLoad.job_id == job_id)
            .order_by(EngineLoad.id)
        ).all()
    return [(model, list(evicted)) for model, evicted in rows]


def test_a_job_over_two_models_that_fit_one_at_a_time_loads_each_once(
    database_url: str, services: dict[str, str], tmp_path: Path
) -> None:
    recipe = recipe_from_yaml(
        """
name: one-at-a-time
models:
  alpha: {engine: synthetic, latency_ms: 20, memory_gb: 1.5}
  beta: {engine: synthetic, latency_ms: 20, memory_gb: 1.5}
layers: [{proposers: [{model: alpha, samples: 3, sampling: {seed: 1}}]}]
aggregator: {model: beta}
"""
    )
    plan = plan_memory(recipe, 2.0)
    assert plan.fits and plan.loads == [("layer 0", ["alpha"]), ("aggregator", ["beta"])]
    with budget_worker(services, tmp_path / "worker.log", 2.0) as (_, control):
        job_id = run_job(database_url, control, recipe, 30)
        job = wait_for_job(database_url, job_id, timeout=180)
    assert (job.status, job.items_succeeded) == ("succeeded", 30)
    assert job_loads(database_url, job_id) == [("alpha", []), ("beta", ["alpha"])]
    assert len(job_loads(database_url, job_id)) == plan.total_loads, "one load per model, not per item"
    with session_scope(database_url) as session:
        stats = residency.load_stats(session, job_id)
    assert (stats.loads, stats.swaps, stats.per_model) == (2, 1, {"alpha": 1, "beta": 1})
    assert job_candidates(database_url, job_id) == (90, 90)


# --- The same on the real vLLM engine -----------------------------------------------------------------

VLLM_PAIR = """
name: vllm-pair
models:
  smol-a: {engine: vllm, weights: "embedded:smollm2", context_length: 2048, weights_gb: 0.55, memory_gb: 1.5}
  smol-b: {engine: vllm, weights: "embedded:smollm2", context_length: 2048, weights_gb: 0.55, memory_gb: 1.5}
layers:
  - proposers:
      - {model: smol-a, samples: 2, sampling: {temperature: 0.8, max_tokens: MAX}}
aggregator: {model: smol-b, sampling: {temperature: 0.3, max_tokens: 24}}
"""


def engine_cores(worker: subprocess.Popen[bytes]) -> list[int]:
    import psutil

    found = []
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.vllm
def test_two_vllm_models_in_a_budget_for_one_and_an_engine_killed_mid_request(
    database_url: str, services: dict[str, str], tmp_path: Path
) -> None:
    recipe = recipe_from_yaml(VLLM_PAIR.replace("MAX", "16"))
    plan = plan_memory(recipe, 2.0)
    assert plan.total_loads == 2 and not any(m.resident for m in plan.models)
    with budget_worker(services, tmp_path / "worker.log", 2.0) as (worker, control):
        job_id = run_job(database_url, control, recipe, 4)
        job = wait_for_job(database_url, job_id, timeout=600)
        assert (job.status, job.items_succeeded) == ("succeeded", 4)
        assert job_loads(database_url, job_id) == [("smol-a", []), ("smol-b", ["smol-a"])]
        assert job_candidates(database_url, job_id) == (8, 8)

        # Long generations, so the kill lands while requests are in flight on smol-a.
        long_recipe = recipe_from_yaml(VLLM_PAIR.replace("MAX", "256"))
        job_id = run_job(database_url, control, long_recipe, 6)
        deadline = time.monotonic() + 300
        while not any(model == "smol-a" for model, _ in job_loads(database_url, job_id)):
            assert time.monotonic() < deadline, "smol-a was not loaded for the second job"
            time.sleep(0.5)
        time.sleep(3)  # requests reach the engine
        assert job_candidates(database_url, job_id)[0] < 12, "the kill must come before the pool is done"
        cores = engine_cores(worker)
        assert len(cores) == 1, f"one engine resident in a budget for one: {cores}"
        os.kill(cores[0], 9)
        job = wait_for_job(database_url, job_id, timeout=600)
    assert (job.status, job.items_succeeded) == ("succeeded", 6)
    assert job_candidates(database_url, job_id) == (12, 12), "every slot stored once"
    with session_scope(database_url) as session:
        retried = session.scalar(
            select(func.count())
            .select_from(Candidate)
            .join(Item)
            .where(Item.job_id == job_id, Candidate.attempt > 1)
        )
    assert retried, "the killed requests were retried on a new engine"
    models = [model for model, _ in job_loads(database_url, job_id)]
    assert models.count("smol-a") == 2, f"smol-a restarted once after the kill: {models}"
