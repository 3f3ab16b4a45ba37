"""Every failure ends somewhere: a model that cannot load, an exception nobody expects, a hung load,
database and engine failures in the same stage. Each stage attempt ends recorded or retried, the job
ends, and the reason is where a user looks (the candidate rows, the job, `/metrics`, `slimmoa run`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from db import evaluations, residency, stages
from db.models import Candidate, Item
from db.session import session_scope
from orchestrator.embedded import free_port
from orchestrator.recipes import SyntheticModel
from orchestrator.settings import FaultSpec, Settings
from tests.conftest import (
    WORKER_ENV,
    recipe_from_yaml,
    run_cli,
    sample_records,
    store,
    submit,
    wait_for_job,
)
from tests.test_run_cli import write
from workers import stage_runner
from workers.engine_host import EngineHost
from workers.engines import ChatRequest, Engine, EngineUnavailable, Generation, create_engine
from workers.engines.synthetic import SyntheticEngine
from workers.outcomes import Failure

TOKENIZER_ERROR = "Couldn't instantiate the backend tokenizer"


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder that exists but holds a broken model: a config of `{}` and nothing else."""
    folder = tmp_path_factory.mktemp("broken-model")
    (folder / "config.json").write_text("{}")
    return folder


def recipe_text(name: str, proposers: list[str], models: dict[str, str], min_pool: int = 1) -> str:
    lines = [f"name: {name}", "models:"]
    lines += [f"  {model}: {spec}" for model, spec in models.items()]
    lines.append("layers: [{proposers: [" + ", ".join(f"{{model: {p}}}" for p in proposers) + "]}]")
    lines += [f"aggregator: {{model: {name}-agg}}", f"min_pool: {min_pool}"]
    return "\n".join(lines) + "\n"


def candidates(database_url: str, job_id: str) -> list[Candidate]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(Candidate).join(Item).where(Item.job_id == job_id)))


def items(database_url: str, job_id: str) -> list[Item]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id)))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_broken_model_in_one_slot_degrades_its_items_with_the_loaders_message(
    database_url: str, worker: Any, broken_model: Path
) -> None:
    models = {
        "outc-broken": f"{{engine: vllm, weights: '{broken_model}', context_length: 512}}",
        "outc-a": "{engine: synthetic}",
        "outc-b": "{engine: synthetic}",
        "outc-agg": "{engine: synthetic}",
    }
    recipe = recipe_from_yaml(recipe_text("outc", ["outc-broken", "outc-a", "outc-b"], models, min_pool=2))
    started = time.monotonic()
    job_id = submit(database_url, recipe, sample_records(6))
    job = wait_for_job(database_url, job_id, timeout=180)
    assert (job.status, job.items_degraded, job.items_failed) == ("succeeded", 6, 0)
    failed = [c for c in candidates(database_url, job_id) if c.error is not None]
    assert len(failed) == 6 and all(c.model == "outc-broken" and c.text is None for c in failed)
    for candidate in failed:
        assert "outc-broken: loading: ValueError" in candidate.error and TOKENIZER_ERROR in candidate.error
        assert candidate.attempt == 1, "a permanent failure is not retried"
    assert all(
        "slot 0: outc-broken: loading: ValueError" in (i.error or "") for i in items(database_url, job_id)
    )
    # The load was tried once; the other stages failed on the remembered failure, at once.
    with session_scope(database_url) as session:
        stats = residency.load_stats(session, job_id)
    assert TOKENIZER_ERROR in stats.failed["outc-broken"]
    assert time.monotonic() - started < 120
    metrics = scrape(int(WORKER_ENV["WORKER_METRICS_PORT"]))
    assert metrics[("slimmoa_engine_load_failed", (("model", "outc-broken"),))] == 1.0
    assert metrics[("slimmoa_engine_load_failures_total", (("model", "outc-broken"),))] == 1.0


def test_a_broken_only_proposer_fails_every_item_and_the_job_ends(
    database_url: str, worker: Any, broken_model: Path
) -> None:
    models = {
        "outc2-broken": f"{{engine: vllm, weights: '{broken_model}', context_length: 512}}",
        "outc2-agg": "{engine: synthetic}",
    }
    recipe = recipe_from_yaml(recipe_text("outc2", ["outc2-broken"], models))
    job_id = submit(database_url, recipe, sample_records(4))
    job = wait_for_job(database_url, job_id, timeout=180)
    assert (job.status, job.items_failed) == ("failed", 4)
    assert job.error == "4 of 4 items failed: see the job's items with status failed"
    for item in items(database_url, job_id):
        assert item.status == "failed" and "fewer than min_pool=1" in (item.error or "")
        assert TOKENIZER_ERROR in (item.error or "")


def test_slimmoa_run_on_a_broken_model_exits_1_naming_the_model_and_the_error(
    tmp_path: Path, broken_model: Path
) -> None:
    models = {
        "solo-broken": f"{{engine: vllm, weights: '{broken_model}', context_length: 512}}",
        "solo-agg": "{engine: synthetic}",
    }
    recipe = write(tmp_path / "broken.yaml", recipe_text("solo", ["solo-broken"], models))
    prompts = write(tmp_path / "prompts.jsonl", '{"instruction": "a"}\n{"instruction": "b"}\n')
    started = time.monotonic()
    result = run_cli(tmp_path, str(prompts), "-o", "out.jsonl", "--recipe", str(recipe))
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 60 + 30, "a minute after the first failure, and the worker's start"
    said = " ".join(result.stderr.split())  # the terminal may wrap the long line
    assert "failed: 2 of 2 items failed" in said
    assert "solo-broken: loading: ValueError" in said and TOKENIZER_ERROR in said


@pytest.mark.parametrize(
    ("fault", "during"),
    [("odd-load", "loading: LookupError"), ("odd-generate", "generating: AttributeError")],
)
def test_an_exception_nobody_expects_is_a_permanent_failure_recorded_on_the_row(
    database_url: str, worker: Any, fault: str, during: str
) -> None:
    # The session worker injects these (tests/conftest.py FAULTS): at load, and at every request.
    models = {
        fault: "{engine: synthetic}",
        "ok-c": "{engine: synthetic}",
        f"{fault}-x-agg": "{engine: synthetic}",
    }
    recipe = recipe_from_yaml(recipe_text(f"{fault}-x", [fault, "ok-c"], models, min_pool=1))
    job_id = submit(database_url, recipe, sample_records(3))
    job = wait_for_job(database_url, job_id, timeout=120)
    assert (job.status, job.items_degraded) == ("succeeded", 3)
    failed = [c for c in candidates(database_url, job_id) if c.error is not None]
    assert len(failed) == 3
    assert all(f"{fault}: {during}: injected" in (c.error or "") and c.attempt == 1 for c in failed)


# --- the engine host and the stage runner in this process ----------------------------------------


def test_a_hung_load_hits_its_time_limit_and_other_models_keep_loading() -> None:
    settings = Settings(engine_start_timeout_s=1.0, slimmoa_faults={"hangs": FaultSpec(load_hang_seconds=60)})
    host = EngineHost(settings)
    spec = SyntheticModel(engine="synthetic")

    def prepare(engine: Engine) -> ChatRequest:
        return ChatRequest(request_id="r", messages=[], temperature=0.0, top_p=1.0, max_tokens=4, seed=None)

    outcomes: dict[str, tuple[Generation | Failure, float]] = {}

    def attempt(name: str) -> None:
        started = time.monotonic()
        outcomes[name] = (host.attempt(name, spec, prepare), time.monotonic() - started)

    try:
        hung = threading.Thread(target=attempt, args=("hangs",))
        hung.start()
        time.sleep(0.2)  # the hung load holds the load lock first
        attempt("fine")
        hung.join(timeout=10)
        failure, hung_s = outcomes["hangs"]
        assert isinstance(failure, Failure) and failure.transient
        assert failure.message == "hangs: no start of hangs within 1 s"
        assert hung_s < 5
        generation, fine_s = outcomes["fine"]
        assert isinstance(generation, Generation) and fine_s < 5
        assert host.resident_models() == {"fine"}
    finally:
        host.shutdown()


class FailsFirst(SyntheticEngine):
    """Unavailable for its first `failures` requests, then answers: a flaky endpoint."""

    failures = 0
    calls = 0

    async def generate(self, request: ChatRequest) -> Generation:
        FailsFirst.calls += 1
        if FailsFirst.calls <= FailsFirst.failures:
            raise EngineUnavailable(f"flaky {FailsFirst.calls}")
        return await super().generate(request)


@pytest.fixture()
def flaky_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's stage runner with an engine host whose model `flaky` fails its first requests."""

    def factory(name: str, spec: Any, settings: Settings) -> Engine:
        return FailsFirst(name, spec) if name == "flaky" else create_engine(name, spec, settings)

    host = EngineHost(Settings(), factory=factory)
    monkeypatch.setattr(stage_runner, "_host", host)
    FailsFirst.calls = 0
    yield
    host.shutdown()


def failing_first(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, times: int) -> list[int]:
    """Make `module.name` raise a lost-connection error on its first `times` calls; counts the calls."""
    real, calls = getattr(module, name), [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return calls


@pytest.mark.parametrize(("engine_failures", "attempt", "ok"), [(2, 3, True), (10, 4, False)])
def test_database_retries_leave_the_engine_retries_whole(
    database_url: str,
    services: dict[str, str],
    flaky_host: None,
    monkeypatch: pytest.MonkeyPatch,
    engine_failures: int,
    attempt: int,
    ok: bool,
) -> None:
    from workers.tasks import run_proposer

    FailsFirst.failures = engine_failures
    recipe = recipe_from_yaml(
        recipe_text("flaky", ["flaky"], {"flaky": "{engine: synthetic}", "flaky-agg": "{engine: synthetic}"})
    )
    job_id = store(database_url, recipe, sample_records(1))
    (item,) = items(database_url, job_id)
    reads = failing_first(monkeypatch, stages, "read_proposer", 3)
    writes = failing_first(monkeypatch, stages, "record_candidate", 3)
    assert run_proposer.max_retries == 3

    run_proposer.apply(args=(item.id, 0, 0))  # eagerly, with Celery's own retries

    (candidate,) = candidates(database_url, job_id)
    assert candidate.attempt == attempt, "attempt counts engine attempts only"
    assert FailsFirst.calls == attempt, "3 database retries took none of the 3 engine retries"
    assert (reads[0], writes[0]) == (3 + attempt, 3 + 1)
    if ok:
        assert candidate.error is None and candidate.text
    else:
        assert candidate.error == "flaky: flaky 4 (after 4 attempts)"


# --- judgments ----------------------------------------------------------------------------------------


def test_a_lost_judge_task_is_sent_again_by_the_sweep(database_url: str, worker: Any, tmp_path: Path) -> None:
    from orchestrator.evaluation import load_reference, start_evaluation
    from orchestrator.judging import resolve_judge
    from orchestrator.recovery import sweep
    from orchestrator.settings import get_settings
    from tests.test_eval import judged_setup

    job_id, reference, judges = judged_setup(database_url, tmp_path, 4)
    judge = resolve_judge(f"{judges}:synth-judge", get_settings())
    # The evaluation is stored and its judgments marked sent, but the judge tasks never reach a
    # worker (lost with the broker).
    start = start_evaluation(database_url, job_id, load_reference(str(reference), database_url), judge)
    assert len(start.to_judge) == 4

    result = sweep(database_url, grace_s=0)
    assert result.judgments == 4
    deadline = time.monotonic() + 60
    while True:
        with session_scope(database_url) as session:
            counts = evaluations.judgment_counts(session, start.evaluation_id)
        if counts["done"] == 4:
            break
        assert time.monotonic() < deadline, f"judgments not done: {counts}"
        time.sleep(0.25)
    assert sweep(database_url, grace_s=0).judgments == 0, "a judged judgment is not sent again"


def test_eval_with_no_worker_running_exits_1_saying_so(
    database_url: str, worker: Any, tmp_path: Path
) -> None:
    from tests.test_api_outcomes import redis_server
    from tests.test_eval import judged_setup, slimmoa

    job_id, reference, judges = judged_setup(database_url, tmp_path, 2)
    port = free_port()
    with redis_server(port, tmp_path), pytest.MonkeyPatch.context() as patch:
        # A broker that no worker listens to.
        patch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
        patch.setenv("STALL_TIMEOUT_S", "3")
        started = time.monotonic()
        result = slimmoa("eval", job_id, "--reference", str(reference), "--judge", f"{judges}:synth-judge")
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert "nothing moved for 3 s and no live worker takes the work" in said
    assert time.monotonic() - started < 60
