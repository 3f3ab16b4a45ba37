"""The orchestration benchmark runs from a checkout as the README says and prints its ratio.

Its figures live in docs/benchmarks.md; this test asserts that the script works, not how fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.embedded import private_redis
from orchestrator.settings import PROJECT_ROOT

# Read at collection, before the session fixtures point DATABASE_URL at the tests' own schema: the
# benchmark makes (and drops) a schema of its own in the machine's database.
MACHINE_DATABASE_URL = os.environ.get("DATABASE_URL", "")


@pytest.mark.parametrize(
    "args",
    [("--submit-items", "40"), ("--single-worker", "--submit-items", "0")],
    ids=["control+inference", "single-worker"],
)
def test_orchestration_bench_prints_its_ratio(args: tuple[str, ...], tmp_path: Path) -> None:
    if not MACHINE_DATABASE_URL:
        pytest.skip("DATABASE_URL is not set")
    # A private Redis: the benchmark pings "its" workers, and the session's worker would answer too.
    with private_redis() as redis_url:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("QUEUE_", "DATABASE_URL", "REDIS_URL"))
        }
        env |= {"DATABASE_URL": MACHINE_DATABASE_URL, "REDIS_URL": redis_url, "BENCH_LOG_DIR": str(tmp_path)}
        result = subprocess.run(
            [sys.executable, "-m", "bench.orchestration", "--items", "30", *args],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rates = re.findall(r"\(([ab])\) .*?:\s+([\d.]+) items/s", result.stdout)
    assert [side for side, _ in rates] == ["a", "b"], result.stdout
    assert all(float(rate) > 0 for _, rate in rates)
    ratio = re.search(r"ratio \(b\)/\(a\)\s*:\s*([\d.]+)", result.stdout)
    assert ratio is not None, result.stdout
    bare, pipeline = (float(rate) for _, rate in rates)
    # The rates are printed to 0.1 and the ratio to 0.01: allow for that rounding only.
    rounding = pipeline / bare * (0.05 / bare + 0.05 / pipeline) + 0.005
    assert float(ratio.group(1)) == pytest.approx(pipeline / bare, abs=rounding)
    exported = re.search(r"export of the finished job .*: ([\d.]+) s for (\d+) KiB", result.stdout)
    assert exported is not None and float(exported.group(2)) > 0, result.stdout
    if "--single-worker" in args:
        assert "one worker (--role all)" in result.stdout
        assert "(c)" not in result.stdout
    else:
        assert "control + inference workers" in result.stdout
        assert re.search(r"\(c\) submit of 40 items to the API \(POST /v1/jobs\): [\d.]+ s", result.stdout)
