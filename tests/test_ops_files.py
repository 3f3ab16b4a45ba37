"""The deployment files as files: docker-compose.yml against the Compose Specification and the CLI,
the Grafana dashboard against its schema and Grafana's own model, the Prometheus scrape config against
what compose serves."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import yaml

from orchestrator.cli import cli
from tests.compose import PROJECT_SERVICES, load_compose, service_command, service_environment
from tests.conftest import project_path


def compose_schema() -> dict[str, Any]:
    from importlib.resources import files

    vendored = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(vendored.read_text())


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification() -> None:
    document = load_compose()
    assert schema_errors(compose_schema(), document) == []
    broken = copy.deepcopy(document)
    broken["services"]["api"]["comand"] = broken["services"]["api"].pop("command")
    broken["services"]["worker-cpu"]["depends_on"]["migrate"]["condition"] = "service_finished"
    errors = "\n".join(schema_errors(compose_schema(), broken))
    assert "'comand'" in errors and "'service_finished'" in errors, "the schema check can fail"

    services = document["services"]
    for name, service in services.items():
        for needed in service.get("depends_on") or {}:
            assert needed in services, f"{name} depends on unknown service {needed}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./ops/"):
                assert project_path(source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("."):  # ./models: the operator's weights
                assert source in document["volumes"], f"{name} uses undeclared volume {source}"


def test_compose_runs_real_slimmoa_commands_on_the_projects_image() -> None:
    import typer.main

    dockerfile = project_path("ops", "docker", "Dockerfile").read_text()
    assert 'ENTRYPOINT ["slimmoa"]' in dockerfile and "'.[inference,ops]'" in dockerfile
    assert yaml.safe_load("x: 1") and "orchestrator.cli:main" in project_path("pyproject.toml").read_text()
    document = load_compose()
    group = typer.main.get_command(cli)
    for service in PROJECT_SERVICES:
        assert document["services"][service].get("build"), f"{service} runs the project's image"
        name, *args = service_command(document, service)
        command: Any = group
        context = group.make_context("slimmoa", [], resilient_parsing=True)
        while hasattr(command, "list_commands"):  # `db upgrade`: a group, then its command
            found = command.get_command(context, name)
            assert found is not None, f"{service}: slimmoa has no command {name!r}"
            if hasattr(found, "list_commands"):
                context = found.make_context(name, [], parent=context, resilient_parsing=True)
                name, *args = args
            command = found
        command.make_context(name, list(args), parent=context)  # raises on an unknown option


def dashboard() -> dict[str, Any]:
    return json.loads(project_path("ops", "grafana", "dashboards", "slimmoa.json").read_text())


def kept(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where `theirs` lost or changed something of `ours` (it may add defaults)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path]
        return [p for key in ours for p in kept(ours[key], theirs.get(key, KeyError), f"{path}.{key}")]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [path]
        return [
            p for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for p in kept(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [path]


def test_the_dashboard_loads_as_grafana_reads_it() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    ours = dashboard()
    schema = json.loads(project_path("tests", "data", "grafana_dashboard.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema_errors(schema, ours) == []
    loaded = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
    assert kept(ours, loaded) == [], "Grafana's dashboard model keeps every field of the file"
    misspelled = copy.deepcopy(ours)
    misspelled["panels"][1]["gridpos"] = misspelled["panels"][1].pop("gridPos")
    assert schema_errors(schema, misspelled)
    assert kept(misspelled, json.loads(json.dumps(Dashboard.from_json(misspelled), cls=JSONEncoder)))

    panels = ours["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [
        (p["gridPos"]["y"] + dy, x)
        for p in panels
        for dy in range(p["gridPos"]["h"])
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
    ]
    assert all(x < 24 for _, x in cells) and len(cells) == len(set(cells)), "panels overlap"


def test_prometheus_scrapes_what_compose_serves() -> None:
    config = yaml.safe_load(project_path("ops", "prometheus", "prometheus.yml").read_text())
    document = load_compose()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (api_target,) = jobs["slimmoa-api"]["static_configs"][0]["targets"]
    host, port = api_target.split(":")
    assert service_command(document, host)[-2:] == ["--port", port]
    discovery = jobs["slimmoa-workers"]["dns_sd_configs"][0]
    for worker in discovery["names"]:
        command = service_command(document, worker)
        assert command[command.index("--metrics-port") + 1] == str(discovery["port"])
        assert service_environment(document, worker)["WORKER_METRICS_HOST"] == "0.0.0.0"
    mounts = document["services"]["prometheus"]["volumes"] + document["services"]["grafana"]["volumes"]
    assert "./ops/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    provider = yaml.safe_load(
        project_path("ops", "grafana", "provisioning", "dashboards", "slimmoa.yml").read_text()
    )
    assert f"./ops/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
