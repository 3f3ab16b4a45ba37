"""The all-in-one mode behind `slimmoa run`: a private Redis and a local worker for one job.

Nothing here is a fallback: `run` uses it when REDIS_URL is unset, and says so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from orchestrator.errors import EmbeddedError

__all__ = ["free_port", "private_redis", "worker_process"]

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port, keeping nothing on disk; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise EmbeddedError(
            "REDIS_URL is not set and no redis-server is on PATH: install Redis or set REDIS_URL"
        )
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="slimmoa-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise EmbeddedError(f"private redis-server on port {port} did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def worker_process(
    env: dict[str, str], log_path: Path, concurrency: int
) -> Iterator[subprocess.Popen[bytes]]:
    """A `slimmoa worker` child for every role, with the given environment, logging to `log_path`."""
    command = [sys.executable, "-m", "orchestrator.cli", "worker", "--concurrency", str(concurrency)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
