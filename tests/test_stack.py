"""The stack as written is the stack tested: the services of docker-compose.yml started from the file
(their commands and environment, interpolated as Compose does) as local processes on the machine's
Postgres and Redis, a job through the API, found in Flower's API, in the JSON logs and on /metrics.

What the test changes from the file, and only that: where services meet (Postgres and Redis on this
machine instead of the `postgres` and `redis` services, queue names and a schema of its own), and
ports and addresses (free loopback ports instead of 8000, 5555, 9100 and 0.0.0.0).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.embedded import free_port
from tests.compose import load_compose, service_command, service_environment
from tests.conftest import project_path
from tests.processes import Started, private_deployment, slimmoa_process, stage_rows, wait_for_log

RUNNING = ("worker-cpu", "inference-worker", "api", "flower")
USER, PASSWORD = "ops", uuid.uuid4().hex
PREFIX = f"stack{uuid.uuid4().hex[:6]}"
# Two models that do not fit the CPU worker's 8 GB together: the job loads one, then swaps.
RECIPE = {
    "name": "stack",
    "models": {
        f"{PREFIX}-a": {"engine": "synthetic", "latency_ms": 20, "memory_gb": 5},
        f"{PREFIX}-b": {"engine": "synthetic", "latency_ms": 20, "memory_gb": 5},
    },
    "layers": [{"proposers": [{"model": f"{PREFIX}-a", "samples": 2}]}],
    "aggregator": {"model": f"{PREFIX}-b"},
}
ITEMS = 4


def localize(command: list[str], ports: dict[str, int]) -> list[str]:
    """Free loopback ports for the declared ones; `ports` maps the option to the port chosen."""
    local = list(command)
    for index, part in enumerate(local[:-1]):
        if part in ("--port", "--metrics-port"):
            ports[part] = free_port()
            local[index + 1] = str(ports[part])
        elif part in ("--host", "--address") and local[index + 1] == "0.0.0.0":
            local[index + 1] = "127.0.0.1"
    return local


@dataclass
class Stack:
    env: dict[str, str]
    processes: dict[str, Started]
    ports: dict[str, dict[str, int]]
    job_id: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']['--port']}"

    @property
    def flower(self) -> str:
        return f"http://127.0.0.1:{self.ports['flower']['--port']}"


def json_lines(started: Started) -> list[dict[str, Any]]:
    return [json.loads(line) for line in started.text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stack(
    database_url: str, services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("stack")
    # The shell's variables, as an operator sets them before `docker compose up`.
    shell = {
        "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "LOG_FORMAT": "json",
        "CPU_WORKER_MODELS": f"{PREFIX}-*",
    }
    document = load_compose(shell)
    with private_deployment(database_url, services) as own, ExitStack() as running:
        meeting = {key: own[key] for key in ("DATABASE_URL", "REDIS_URL", "QUEUE_CONTROL", "QUEUE_INFERENCE")}

        def environment(service: str) -> dict[str, str]:
            declared = service_environment(document, service)
            if declared.get("WORKER_METRICS_HOST") == "0.0.0.0":
                declared["WORKER_METRICS_HOST"] = "127.0.0.1"
            return {**declared, **meeting}

        migrate = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *service_command(document, "migrate")],
            env={**services, **environment("migrate")},
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()[-2000:]
        ports: dict[str, dict[str, int]] = {}
        processes = {}
        for service in RUNNING:
            ports[service] = {}
            command = localize(service_command(document, service), ports[service])
            processes[service] = running.enter_context(
                slimmoa_process(command, {**services, **environment(service)}, logs / f"{service}.log")
            )
        for service in ("worker-cpu", "inference-worker"):
            wait_for_log(processes[service], " ready.")
        wait_for_log(processes["api"], "Application startup complete")
        wait_for_log(processes["flower"], "Visit me at")
        partial = Stack(own, processes, ports, job_id="")
        auth = (USER, PASSWORD)
        deadline = time.monotonic() + 60
        while not set(flower_workers(partial.flower, auth)) >= {
            f"{n}@{host()}" for n in ("inference", "control")
        }:
            assert time.monotonic() < deadline, "Flower does not see both workers"
            time.sleep(1)
        with httpx.Client(base_url=partial.api, timeout=30) as api:
            items = [{"instruction": f"prompt {i}"} for i in range(ITEMS)]
            job_id = api.post("/v1/jobs", json={"recipe": RECIPE, "items": items}).json()["id"]
            deadline = time.monotonic() + 90
            while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, f"job still {job['status']}"
                time.sleep(0.5)
        assert job["status"] == "succeeded", job
        yield Stack(own, processes, ports, job_id)


def host() -> str:
    import socket

    return socket.gethostname()


def flower_workers(url: str, auth: tuple[str, str]) -> dict[str, Any]:
    answer = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=auth, timeout=30)
    return answer.json() if answer.status_code == 200 else {}


def test_flower_refuses_its_api_without_credentials_and_shows_the_jobs_stages(stack: Stack) -> None:
    assert httpx.get(f"{stack.flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{stack.flower}/api/tasks", timeout=10, auth=(USER, "wrong")).status_code == 401
    workers = flower_workers(stack.flower, (USER, PASSWORD))
    assert {f"inference@{host()}", f"control@{host()}"} <= set(workers)

    expected = ITEMS * 3  # two proposers and the aggregator per item
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(
            f"{stack.flower}/api/tasks",
            params={"search": f"args:job={stack.job_id}"},
            auth=(USER, PASSWORD),
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        tasks = answer.json()
        done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
        if len(done) >= expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(done) == expected, f"{len(done)} of {expected} stage tasks found by job"
    rows = {
        (r.item_id, r.layer, r.slot): r.model for r in stage_rows(stack.env["DATABASE_URL"], stack.job_id)
    }
    shown = set()
    for task in done:
        fields = dict(part.split("=", 1) for part in task["args"].split())
        assert fields["job"] == stack.job_id and task["worker"] == f"inference@{host()}"
        key: tuple[int, int | None, int | None]
        if task["name"] == "slimmoa.proposer":
            key = (int(fields["item"]), int(fields["layer"]), int(fields["slot"]))
        else:
            assert task["name"] == "slimmoa.aggregator" and "layer" not in fields
            key = (int(fields["item"]), None, None)
        assert rows[key] == fields["model"], f"{task['args']} names the model of its stage"
        shown.add(key)
    assert shown == set(rows)


def test_json_logs_parse_line_by_line_and_stage_lines_carry_their_ids(stack: Stack) -> None:
    for service in RUNNING:
        lines = json_lines(stack.processes[service])  # raises on any line that is not JSON
        assert lines, f"{service} logged nothing"
        for line in lines:
            assert {"time", "level", "logger", "message"} <= set(line), (service, line)
    rows = {
        (r.item_id, r.layer, r.slot): r.model for r in stage_rows(stack.env["DATABASE_URL"], stack.job_id)
    }
    stage_lines = [
        line
        for line in json_lines(stack.processes["inference-worker"])
        if line.get("job") == stack.job_id and line["logger"] == "celery.app.trace"
    ]
    assert len(stage_lines) == ITEMS * 3, "one 'succeeded' line per stage, each with its job"
    for line in stage_lines:
        key = (line["item"], line.get("layer"), line.get("slot"))
        assert rows[key] == line["model"], line
        assert line["task"] in line["message"] and line["task_id"] in line["message"]
    dispatch = [line for line in json_lines(stack.processes["worker-cpu"]) if line.get("job") == stack.job_id]
    assert dispatch, "the control worker's lines of the job's dispatch carry it too"


def scrape(url: str) -> set[str]:
    """Names of the samples a /metrics page has (families without samples do not count)."""
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return {sample.name for family in families for sample in family.samples}


def test_every_series_of_the_dashboard_is_exported(stack: Stack) -> None:
    dashboard = json.loads(project_path("ops", "grafana", "dashboards", "slimmoa.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    named = {name for query in queries for name in re.findall(r"\bslimmoa_[a-z_]+\b", query)}
    assert len(named) >= 12
    exported = scrape(f"{stack.api}/metrics")
    exported |= scrape(f"http://127.0.0.1:{stack.ports['inference-worker']['--metrics-port']}/metrics")
    assert sorted(named - exported) == [], "series the dashboard names but nothing exports"
    api_page = httpx.get(f"{stack.api}/metrics", timeout=10).text
    assert f'slimmoa_queue_depth{{queue="{stack.env["QUEUE_CONTROL"]}"}}' in api_page
