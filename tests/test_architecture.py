"""The map in docs/architecture.md stays true, and imports run in the one direction it draws."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.settings import PROJECT_ROOT

MAP = PROJECT_ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| [^|]+ \| `(?P<module>[^`]+)` \| (?P<names>.+) \|$")


def named_functions() -> list[tuple[str, str]]:
    """(module path, dotted name) for every function or class the map's tables name."""
    found = []
    for line in MAP.read_text().splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", match["names"]):
            found.append((match["module"], name))
    return found


def _resolve(module_path: str, name: str) -> object:
    if module_path.endswith("/"):
        package = importlib.import_module(module_path.strip("/").replace("/", "."))
        candidates = [importlib.import_module(f"{package.__name__}.{p.stem}") for p in _sources(module_path)]
    else:
        candidates = [importlib.import_module(module_path.removesuffix(".py").replace("/", "."))]
    head, *rest = name.split(".")
    for module in candidates:
        target = getattr(module, head, None)
        for part in rest:
            target = getattr(target, part, None)
        if target is not None:
            return target
    raise AssertionError(f"docs/architecture.md names {name} in {module_path}, which has no such thing")


def _sources(folder: str) -> list[Path]:
    return sorted((PROJECT_ROOT / folder).glob("*.py"))


def test_the_map_names_the_whole_path_and_each_name_exists() -> None:
    rows = named_functions()
    modules = {module for module, _ in rows}
    for module in modules:
        assert (PROJECT_ROOT / module).exists(), f"docs/architecture.md names {module}, which does not exist"
    for step in ("orchestrator/api/jobs.py", "orchestrator/submission.py", "db/submission.py"):
        assert step in modules
    for step in ("orchestrator/canvas.py", "workers/tasks.py", "db/stages.py", "orchestrator/exports.py"):
        assert step in modules
    for module, name in rows:
        _resolve(module, name)


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"), [("db", {"orchestrator", "workers"}), ("orchestrator", {"workers"})]
)
def test_imports_run_one_way(package: str, forbidden: set[str]) -> None:
    # `slimmoa worker` starts the workers' side inside its command: the one allowed exception.
    allowed = {PROJECT_ROOT / "orchestrator" / "cli" / name for name in ("worker.py", "service.py")}
    wrong = {
        str(path.relative_to(PROJECT_ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in (PROJECT_ROOT / package).rglob("*.py")
        if path not in allowed and _imported_packages(path) & forbidden
    }
    assert not wrong, f"imports that run back up: {wrong}"


def test_the_api_bodies_load_without_celery() -> None:
    probe = (
        "import sys, orchestrator.api.bodies; print(sorted(m for m in sys.modules if m.startswith('celery')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
