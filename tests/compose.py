"""Reading docker-compose.yml as Compose does: YAML anchors and merges, `${VAR:-default}` interpolation
from a given environment, each service's command and environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from orchestrator.settings import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
# The services built from the project's image; the others are upstream images (Postgres, Redis...).
PROJECT_SERVICES = ("migrate", "worker-cpu", "inference-worker", "api", "flower", "gpu-worker")

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """One string as Compose interpolates it from the shell's environment."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        given = env.get(name)
        op, arg = match["op"], match["arg"] or ""
        unset_or_empty = given is None or (given == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise InterpolationError(f"{name}: {arg}")
        return given or ""

    return _VARIABLE.sub(substitute, value)


def _interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_all(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as a mapping; interpolated from `env` when given (raw otherwise)."""
    document = yaml.safe_load(path.read_text())
    return document if env is None else _interpolate_all(document, env)


def service_command(document: Mapping[str, Any], service: str) -> list[str]:
    command = document["services"][service]["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def service_environment(document: Mapping[str, Any], service: str) -> dict[str, str]:
    environment = document["services"][service].get("environment") or {}
    if isinstance(environment, list):
        pairs = [entry.split("=", 1) for entry in environment]
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in environment.items()}
