"""The end-to-end and peer benchmarks run on their tiny settings (a few prompts, synthetic engines
standing for the models) and print figures that agree with each other: both sides did the same work,
tokens/s is tokens over time, the ratios are those of the printed figures, loads are the plan's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.embedded import private_redis
from orchestrator.settings import PROJECT_ROOT

# Read at collection, before the session fixtures point DATABASE_URL at the tests' own schema.
MACHINE_DATABASE_URL = os.environ.get("DATABASE_URL", "")
SIDE = re.compile(
    r"\((?P<side>[ab])\) : wall\s+(?P<wall>[\d.]+) s, (?P<generations>\d+) generations, "
    r"(?P<tokens>\d+) tokens,\s+(?P<rate>[\d.]+) tokens/s; loads (?P<loads>\d+)"
)


def bench_env(redis_url: str, log_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "DATABASE_URL", "REDIS_URL"))}
    return env | {"DATABASE_URL": MACHINE_DATABASE_URL, "REDIS_URL": redis_url, "BENCH_LOG_DIR": str(log_dir)}


def run_bench(module: str, *args: str, log_dir: Path) -> str:
    """Run a benchmark module from the checkout on the machine's Postgres and a private Redis (the
    benchmark pings "its" workers, and the session's worker would answer too); its stdout."""
    if not MACHINE_DATABASE_URL:
        pytest.skip("DATABASE_URL is not set")
    with private_redis() as redis_url:
        result = subprocess.run(
            [sys.executable, "-m", module, *args],
            env=bench_env(redis_url, log_dir),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_end_to_end_bench_on_synthetic_engines(tmp_path: Path) -> None:
    out = run_bench(
        "bench.end_to_end", "--prompts", "4", "--synthetic", "--timeline", str(tmp_path), log_dir=tmp_path
    )
    blocks = re.split(r"^recipe ", out, flags=re.MULTILINE)[1:]
    assert [block.split()[0] for block in blocks] == ["fits", "swaps"], out
    # Every item: three proposer slots of 128 tokens and the aggregator's 192, each at max_tokens.
    expected_tokens = 4 * (3 * 128 + 192)
    for block, planned_loads in zip(blocks, (1, 3), strict=True):
        assert f"the plan loads {planned_loads} times" in block
        sides = {m["side"]: m for m in SIDE.finditer(block)}
        assert sorted(sides) == ["a", "b"], block
        for side in sides.values():
            wall, tokens, rate = float(side["wall"]), int(side["tokens"]), float(side["rate"])
            assert (int(side["generations"]), tokens) == (16, expected_tokens)
            # Wall printed to 1 ms, tokens/s to 0.1: allow for that rounding only.
            assert rate == pytest.approx(tokens / wall, rel=0.0005 / wall + 0.001)
            assert int(side["loads"]) == planned_loads, block
        ratio = re.search(
            r"ratio \(a\)/\(b\) : ([\d.]+) of the wall time; \(b\)/\(a\) of the tokens/s: ([\d.]+)", block
        )
        assert ratio is not None, block
        wall_a, wall_b = float(sides["a"]["wall"]), float(sides["b"]["wall"])
        # The printed walls' rounding (relative) adds to the ratio's own, to 3 decimals (absolute).
        rounding = 0.0005 / wall_a + 0.0005 / wall_b
        walls = wall_a / wall_b
        assert abs(float(ratio[1]) - walls) <= walls * rounding + 0.0005 + 1e-9
        rates = float(sides["b"]["rate"]) / float(sides["a"]["rate"])
        assert abs(float(ratio[2]) - rates) <= rates * (rounding + 0.001) + 0.0005 + 1e-9
        timeline = re.search(r"timeline : device busy ([\d.]+)% of ([\d.]+) s; (\d+) loads", block)
        assert timeline is not None, block
        assert int(timeline[3]) == planned_loads and float(timeline[2]) <= wall_b
        cpu = re.search(
            r"worker CPU : ([\d.]+) s over the job, loads included; ([\d.]+) s outside loads, "
            r"([\d.]+) ms a generation",
            block,
        )
        assert cpu is not None, block
        whole, outside, per_generation = float(cpu[1]), float(cpu[2]), float(cpu[3])
        # (At this size the whole job may fall within the sample that holds the instant load.)
        assert whole > 0 and 0 <= outside <= whole + 0.01, "the worker spent CPU, less of it outside loads"
        assert per_generation == pytest.approx(outside / 16 * 1000, abs=0.06 + outside / 16 * 1000 * 0.01)
        png = tmp_path / f"e2e-{block.split()[0]}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # With one model at a time, each load after the first evicts the model before it.
    assert "smol-b load" in blocks[1] and "(evicted smol-a:" in blocks[1] and "(evicted smol-b:" in blocks[1]


def test_peer_bench_on_a_synthetic_server(tmp_path: Path) -> None:
    out = run_bench("bench.peer", "--prompts", "4", "--synthetic", "--runs", "2", log_dir=tmp_path)
    expected_tokens = 4 * (3 * 128 + 192)
    clients = re.findall(
        r"run (\d): client, (\d+) prompts in flight: ([\d.]+) s, (\d+) tokens, ([\d.]+) tokens/s", out
    )
    assert [(run, width) for run, width, *_ in clients] == [
        ("1", "16"),
        ("1", "48"),
        ("2", "16"),
        ("2", "48"),
    ]
    ours = re.findall(r"run (\d): slimmoa run: ([\d.]+) s generating \(engine start ([\d.]+) s excluded", out)
    assert [run for run, *_ in ours] == ["1", "2"], out
    ours_tokens = re.findall(r"excluded; the whole command [\d.]+ s\), (\d+) tokens, ([\d.]+) tokens/s", out)
    assert len(ours_tokens) == 2, out
    for _, _, seconds, tokens, rate in clients:
        assert int(tokens) == expected_tokens
        assert float(rate) == pytest.approx(int(tokens) / float(seconds), rel=0.0005 / float(seconds) + 0.001)
    for (_, seconds, _), (tokens, rate) in zip(ours, ours_tokens, strict=True):
        assert int(tokens) == expected_tokens
        assert float(rate) == pytest.approx(int(tokens) / float(seconds), rel=0.0005 / float(seconds) + 0.001)
    assert len(re.findall(r"peer server ready in [\d.]+ s \(excluded\)", out)) == 2
    medians = re.search(
        r"medians of 2 runs: client 16 in flight ([\d.]+) tokens/s; client 48 in flight ([\d.]+) tokens/s; "
        r"slimmoa run ([\d.]+) tokens/s",
        out,
    )
    assert medians is not None, out
    by_width = {w: [float(rate) for _, width, _, _, rate in clients if width == w] for w in ("16", "48")}
    for width, median in zip(("16", "48"), (medians[1], medians[2]), strict=True):
        assert float(median) == pytest.approx(sum(by_width[width]) / 2, abs=0.06)
    assert float(medians[3]) == pytest.approx(sum(float(rate) for _, rate in ours_tokens) / 2, abs=0.06)
    ratios = re.search(r"ratio slimmoa run / client: ([\d.]+) at 16 in flight, ([\d.]+) at 48 in flight", out)
    assert ratios is not None, out
    for ratio, median in ((ratios[1], medians[1]), (ratios[2], medians[2])):
        assert float(ratio) == pytest.approx(float(medians[3]) / float(median), rel=0.001, abs=0.0006)


def test_the_peer_server_gets_the_engines_arguments() -> None:
    from bench.peer import cli_flags

    args = {"max_model_len": 2048, "enforce_eager": True, "enable_prefix_caching": False, "dtype": "float32"}
    assert cli_flags(args) == [
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--dtype",
        "float32",
    ]


def test_the_stock_peer_server_runs_without_the_projects_engine_classes() -> None:
    from bench.end_to_end import bench_recipes
    from bench.peer import PROJECT_ENGINE_ARGS, serve_command
    from orchestrator.recipes import parse_recipe

    recipe = parse_recipe(bench_recipes(False)["fits"])
    ours, _ = serve_command(recipe, 8000, False, "ours")
    stock, _ = serve_command(recipe, 8000, False, "stock")
    named = {"--" + key.replace("_", "-") for key in PROJECT_ENGINE_ARGS}
    assert named & set(ours) == {"--worker-cls", "--scheduler-cls", "--scheduling-policy"}
    assert not named & set(stock)
    assert [flag for flag in ours if flag.startswith("--") and flag not in named] == [
        flag for flag in stock if flag.startswith("--")
    ], "everything else is served alike"


def test_sequential_bench_on_a_synthetic_engine(tmp_path: Path) -> None:
    out = run_bench("bench.sequential", "--prompts", "2", "--synthetic", log_dir=tmp_path)
    sides = re.findall(
        r"\((a|b)\) \w+\s+: wall\s+[\d.]+ s; per item: ([\d.]+) aggregator passes,\s+([\d.]+) prompt "
        r"\+\s+([\d.]+) output tokens",
        out,
    )
    # Every answer runs to max_tokens (192): the sequential side writes two of them, the second
    # reading the first's synthesis and one candidate beside the first's two.
    assert [(side, float(passes), float(output)) for side, passes, _, output in sides] == [
        ("a", 1.0, 192.0),
        ("b", 2.0, 384.0),
    ], out
    assert re.search(r"\(b\)/\(a\)\s+: wall [\d.]+; per item: passes 2.00, .* output tokens 2.00", out), out
