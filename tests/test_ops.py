"""Operating pieces without a running stack: model lists, the worker view, readable stage messages,
JSON logs and Flower's login rule (the files in ops/: tests/test_ops_files.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from orchestrator.celery_app import TASK_PROPOSER, configure
from orchestrator.celery_app import app as celery_app
from orchestrator.cli import cli
from orchestrator.fleet import Fleet, live_workers, unserved
from orchestrator.flower import FlowerAccess, FlowerConfigError, flower_argv
from orchestrator.logs import JsonFormatter, StageFilter, _bind_task, _unbind_task, current_stage
from orchestrator.ownership import EVERY_MODEL, ModelSelection, SelectionError
from orchestrator.routing import BULK_PRIORITY, ModelQueues, priority_lists
from orchestrator.settings import Settings, get_settings
from orchestrator.stage_info import HEADER, StageInfo
from tests.conftest import Switch
from workers.affinity import AffinityScheduler

RECIPE = """
name: two-hosts
models:
  big-a: {engine: synthetic}
  big-b: {engine: synthetic}
layers: [{proposers: [{model: big-a}, {model: big-b}]}]
aggregator: {model: big-a}
"""


# --- Model lists -----------------------------------------------------------------------------------


def test_a_model_list_is_names_globs_and_recipe_names(tmp_path: Path) -> None:
    (tmp_path / "two-hosts.yaml").write_text(RECIPE)
    chosen = ModelSelection.parse(" llama-3.1-70b, gemma-* ,two-hosts,,", tmp_path)
    assert chosen.patterns == ("llama-3.1-70b", "gemma-*", "big-a", "big-b")
    assert chosen.serves("gemma-2-9b-it-simpo") and chosen.serves("big-b") and chosen.serves("llama-3.1-70b")
    assert not chosen.serves("llama-3.1-8b") and not chosen.serves("qwen2.5-72b")
    by_path = ModelSelection.parse(str(tmp_path / "two-hosts.yaml"), tmp_path / "elsewhere")
    assert by_path.patterns == ("big-a", "big-b")
    assert ModelSelection.parse("", tmp_path) is EVERY_MODEL and EVERY_MODEL.serves("anything")


def test_a_model_list_that_names_nothing_or_a_broken_recipe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="names no model"):
        ModelSelection.parse(" , ", tmp_path)
    (tmp_path / "broken.yaml").write_text("name: broken\nmodels: {}\n")
    with pytest.raises(SelectionError, match="'broken'"):
        ModelSelection.parse("broken", tmp_path)


def test_a_worker_with_a_bad_model_list_does_not_start(
    services: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command exports WORKER_MODELS for the worker it starts: this process gets its own back after.
    monkeypatch.setenv("WORKER_MODELS", "")
    try:
        result = CliRunner().invoke(cli, ["worker", "--role", "control", "--models", "a"])
    finally:
        monkeypatch.setenv("WORKER_MODELS", "")
        get_settings.cache_clear()
        configure(celery_app, get_settings())
    assert result.exit_code == 2 and "a control worker serves no models" in result.stderr


# --- The workers' view ------------------------------------------------------------------------------


class Broadcasts:
    """Celery's control API as the fleet uses it: one broadcast, a list of {node: reply}."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = replies
        self.calls = 0
        self.control = self

    def broadcast(self, command: str, **_: Any) -> list[dict[str, Any]]:
        assert command == "slimmoa_models"
        self.calls += 1
        return self.replies


def test_the_view_counts_only_this_deployments_serving_workers() -> None:
    settings = Settings(queue_inference="prod.inference")
    replies = [
        {"gpu1@a": {"queue": "prod.inference", "serving": True, "models": ["llama-*"]}},
        {"cpu@b": {"queue": "prod.inference", "serving": True, "models": []}},
        {"gpu2@c": {"queue": "prod.inference", "serving": False, "models": ["qwen-72b"]}},  # draining
        {"old@d": {"error": "No such inspect command: slimmoa_models"}},
        {"test@e": {"queue": "test.inference", "serving": True, "models": ["qwen-72b"]}},
    ]
    workers = live_workers(Broadcasts(replies), settings)  # type: ignore[arg-type]
    assert workers == {"gpu1@a": ModelSelection(("llama-*",)), "cpu@b": EVERY_MODEL}
    assert unserved(["qwen-72b", "llama-70b"], {"gpu1@a": ModelSelection(("llama-*",))}) == ["qwen-72b"]
    assert unserved(["qwen-72b"], workers) == [], "a worker without a list serves every model"
    assert unserved(["x", "y"], {}) == ["x", "y"]


def test_the_view_asks_the_workers_at_most_once_per_period() -> None:
    now = [0.0]
    app = Broadcasts([{"w@h": {"queue": "q", "serving": True, "models": ["a"]}}])
    fleet = Fleet(app, ttl=10.0, clock=lambda: now[0])
    settings = Settings(queue_inference="q")
    for _ in range(5):
        assert fleet.workers(settings) == {"w@h": ModelSelection(("a",))}
    now[0] = 10.5
    fleet.workers(settings)
    assert app.calls == 2


class FakeHost:
    def resident_models(self) -> set[str]:
        return set()

    def room_gb(self) -> float:
        return float("inf")

    def check_liveness(self) -> list[str]:
        return []


@pytest.fixture
def model_queues(services: dict[str, str]) -> Iterator[dict[str, ModelQueues]]:
    prefix = f"ops-test.{uuid.uuid4().hex[:8]}"
    models = {
        n: ModelQueues(n, 1.0, f"{prefix}.{n}", f"{prefix}.{n}.aggregate", f"{prefix}.{n}.chat")
        for n in ("big-a", "big-b")
    }
    client = redis.Redis.from_url(services["REDIS_URL"])
    for queues in models.values():
        client.rpush(priority_lists(queues.proposals)[BULK_PRIORITY], 1)
    yield models
    client.delete(*[key for m in models.values() for q in m.queues for key in priority_lists(q)])


def test_affinity_consumes_only_the_served_models_and_nothing_while_draining(
    model_queues: dict[str, ModelQueues], services: dict[str, str]
) -> None:
    draining = threading.Event()
    switch = Switch()
    chooser = AffinityScheduler(
        get_settings(),
        FakeHost(),
        switch,
        held=Counter,
        selection=ModelSelection(("big-b",)),
        draining=draining.is_set,
    )
    chooser._recipes = {}
    chooser.models = lambda: {  # type: ignore[method-assign]
        name: queues for name, queues in model_queues.items() if chooser.selection.serves(name)
    }
    chooser.tick()
    assert switch.consumed == set(model_queues["big-b"].queues), "big-a has work but another host owns it"
    draining.set()
    chooser.tick()
    assert switch.consumed == set(), "a draining worker takes nothing new"


# --- Readable stage messages and JSON logs ----------------------------------------------------------


def test_stage_messages_read_as_their_job_item_layer_slot_and_model(services: dict[str, str]) -> None:
    info = StageInfo("3f2a", 23004, 0, 1, "llama-3.1-70b")
    assert info.argsrepr() == "job=3f2a item=23004 layer=0 slot=1 model=llama-3.1-70b"
    assert StageInfo.from_fields(info.fields()) == info
    assert StageInfo("j", 7, model="agg").argsrepr() == "job=j item=7 model=agg"
    assert StageInfo.from_fields({"item": 1}) is None and StageInfo.from_fields("x") is None

    # A retry is sent with the header but without argsrepr: the message still reads as the stage.
    queue = f"ops-test.{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(services["REDIS_URL"])
    try:
        headers = {HEADER: info.fields()}
        celery_app.send_task(TASK_PROPOSER, args=(23004, 0, 1), queue=queue, headers=headers, priority=3)
        message = json.loads(client.lpop(priority_lists(queue)[3]))  # type: ignore[arg-type]
    finally:
        client.delete(*priority_lists(queue))
    assert message["headers"]["argsrepr"] == info.argsrepr()
    assert message["headers"][HEADER] == info.fields()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_the_stage_of_the_task_that_logged_them() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(StageFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("slimmoa.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    info = StageInfo("3f2a", 23004, 0, 1, "llama-3.1-70b")
    task = SimpleNamespace(name=TASK_PROPOSER, request=SimpleNamespace(**{HEADER: info.fields()}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def in_the_engine() -> None:
        logger.info("generating")

    try:
        _bind_task(task_id="t-1", task=task)
        logger.info("stored %s", "candidate")
        # As the engine host does: a coroutine submitted from the task's thread to the engine's loop.
        asyncio.run_coroutine_threadsafe(in_the_engine(), loop).result(timeout=5)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
        _unbind_task()
        logger.info("idle")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        logger.removeHandler(handler)
    stored, engine, failed, idle = json_lines(stream)
    ids = {"job": "3f2a", "item": 23004, "layer": 0, "slot": 1, "model": "llama-3.1-70b"}
    for line in (stored, engine, failed):
        assert {key: line[key] for key in ids} == ids
        assert line["task"] == TASK_PROPOSER and line["task_id"] == "t-1"
    assert stored["message"] == "stored candidate" and stored["level"] == "INFO"
    assert stored["logger"] == "slimmoa.test.json" and stored["time"].endswith("Z")
    assert engine["message"] == "generating"
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc_info"]
    assert not set(ids) & set(idle), "fields are cleared when the task ends"
    assert dict(current_stage()) == {}


# --- Flower's login ---------------------------------------------------------------------------------


def test_flower_needs_a_login_unless_told_to_serve_loopback_only() -> None:
    with pytest.raises(FlowerConfigError, match="FLOWER_BASIC_AUTH"):
        flower_argv(FlowerAccess(), address="0.0.0.0", port=5555, insecure_local=False)
    with pytest.raises(FlowerConfigError, match=r"127\.0\.0\.1 only"):
        flower_argv(FlowerAccess(), address="0.0.0.0", port=5555, insecure_local=True)
    assert flower_argv(FlowerAccess(), address="", port=1, insecure_local=True) == [
        "--address=127.0.0.1",
        "--port=1",
    ]
    for broken in ("admin", "admin:", ":secret", "a:b,c"):
        with pytest.raises(FlowerConfigError, match="user:password"):
            FlowerAccess(basic_auth=broken).check()
    with pytest.raises(FlowerConfigError, match="FLOWER_OAUTH2_SECRET"):
        FlowerAccess(auth=".*@example.com", auth_provider="p", oauth2_key="k").check()
    access = FlowerAccess.from_env({"FLOWER_BASIC_AUTH": "ops:s3cret", "PATH": "/bin"})
    assert access.check() == "basic auth" and access.env() == {"FLOWER_BASIC_AUTH": "ops:s3cret"}
    assert flower_argv(access, address="0.0.0.0", port=5555, insecure_local=False)[0] == "--address=0.0.0.0"


def test_slimmoa_flower_refuses_to_start_without_a_login(services: dict[str, str]) -> None:
    runner = CliRunner()
    refused = runner.invoke(cli, ["flower"], env={"FLOWER_BASIC_AUTH": ""})
    assert refused.exit_code == 2
    assert "give it a login" in refused.stderr and "--insecure-local" in refused.stderr
    refused = runner.invoke(cli, ["flower", "--insecure-local", "--address", "0.0.0.0"])
    assert refused.exit_code == 2 and "127.0.0.1 only" in refused.stderr
