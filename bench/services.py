"""Services of a benchmark run: its own Postgres schema and queue names, this process pointed at them,
and the processes a run starts (workers, the API, servers it compares with)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

__all__ = [
    "ROOT",
    "isolated_services",
    "serving",
    "slimmoa_api",
    "start_process",
    "stop",
    "wait_until_healthy",
]

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def isolated_services(database_url: str, redis_url: str, concurrency: int | None) -> Iterator[dict[str, str]]:
    """Yield the environment for a worker (DATABASE_URL with a fresh, migrated schema, queue names,
    its stage threads: `concurrency`, or None for the default); the Celery app of this process sends
    there too. The schema is dropped afterwards."""
    from db.migrate import private_schema
    from orchestrator.celery_app import app, configure
    from orchestrator.settings import get_settings

    suffix = uuid.uuid4().hex[:6]
    with private_schema(database_url, "bench") as url:
        env = {
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "QUEUE_CONTROL": f"bench.{suffix}.control",
            "QUEUE_INFERENCE": f"bench.{suffix}.inference",
        }
        if concurrency is None:
            os.environ.pop("INFERENCE_CONCURRENCY", None)
        else:
            env["INFERENCE_CONCURRENCY"] = str(concurrency)
        os.environ.update(env)
        get_settings.cache_clear()
        configure(app, get_settings())
        yield env


def start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child of this checkout (its code first on the path) with `env` added, logging to `log`."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not ended after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until `url` answers 200; raises if the process exits or the time runs out."""
    started = time.perf_counter()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited; see its log")
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)


@contextmanager
def serving(
    command: list[str], env: dict[str, str], log: Path, health_url: str, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """A server process that answers `health_url`, with the seconds it took to; stopped at the end."""
    process = start_process(command, env, log)
    try:
        yield process, wait_until_healthy(health_url, process, timeout)
    finally:
        stop(process)


def slimmoa_api(port: int) -> list[str]:
    """The command of `slimmoa api` on a loopback port."""
    return [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port)]
