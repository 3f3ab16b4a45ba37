"""`slimmoa worker`: a Celery worker of one role; inference roles host the engines."""

from __future__ import annotations

import enum
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.cli.console import fail
from orchestrator.settings import get_settings

__all__ = ["WorkerRole", "worker"]

# Threads of a control worker: its tasks (dispatch, layer checks, the sweep) are short database work.
CONTROL_THREADS = 16


class WorkerRole(enum.StrEnum):
    ALL = "all"  # one worker for everything (a single machine, `slimmoa run`)
    CONTROL = "control"  # dispatch, layer checks, the recovery sweep: no engines
    INFERENCE = "inference"  # the stages and judges: owns the device and the engines


def worker(
    role: Annotated[WorkerRole, typer.Option(help="Which work this worker takes.")] = WorkerRole.ALL,
    memory_gb: Annotated[
        float | None,
        typer.Option(
            "--memory-gb",
            "--gpu-memory-gb",
            min=0.1,
            help="Memory budget for resident models, GB (GPU memory, or RAM on a CPU); default: no budget.",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Threads for bulk stages: generations in flight (default: INFERENCE_CONCURRENCY, "
            f"else ENGINE_MAX_NUM_SEQS; CHAT_RESERVE more for chat). A control worker's: {CONTROL_THREADS}.",
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    beat: Annotated[
        bool, typer.Option(help="Also run the periodic recovery sweep (one worker only).")
    ] = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="The models this worker serves: comma-separated names, globs or recipe names "
            "(WORKER_MODELS); default: every model."
        ),
    ] = None,
    hostname: Annotated[
        str | None,
        typer.Option("--hostname", "-n", help="Node name, NAME@HOST (%h: this host); unique per worker."),
    ] = None,
) -> None:
    """Start a Celery worker. Inference roles host the engines (threads pool: vLLM cannot live in a
    prefork child) and consume per-model queues by affinity, within the memory budget."""
    from orchestrator.fleet import worker_selection
    from orchestrator.logs import use_for_celery

    settings = get_settings()
    if memory_gb is not None:
        settings = settings.model_copy(update={"worker_memory_gb": memory_gb})
    if models is not None:
        settings = settings.model_copy(update={"worker_models": models})
    if not settings.redis_url or not settings.database_url:
        raise fail("a worker needs REDIS_URL and DATABASE_URL")
    if settings.worker_models and role == WorkerRole.CONTROL:
        raise fail("--models / WORKER_MODELS: a control worker serves no models")
    try:
        worker_selection(settings)
    except ValueError as exc:  # a recipe in the list that does not load
        raise fail(str(exc)) from None
    configure(celery_app, settings)
    use_for_celery(settings.log_format, loglevel)
    queues = []
    if role != WorkerRole.INFERENCE:
        queues.append(settings.queue_control)
    if role != WorkerRole.CONTROL:
        import workers.judge_tasks
        import workers.tasks  # noqa: F401  (the two register the stage and judge tasks on the app)
        from workers.affinity import AffinityStep
        from workers.stage_runner import start_engine_host

        # The engines live within this command's memory budget.
        start_engine_host(settings)
        # Judges wait in the shared inference queue; stages in per-model queues, which the
        # affinity scheduler starts and stops consuming.
        queues.append(settings.queue_inference)
        celery_app.steps["consumer"].add(AffinityStep)

    if role == WorkerRole.CONTROL:
        threads = concurrency or CONTROL_THREADS
    else:
        # As many bulk stages as an engine batches, unless set; chat stages only take the reserve
        # (workers.affinity).
        threads = (concurrency or settings.stage_threads) + settings.chat_reserve
    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=settings.worker_metrics_host)

    # Interval schedules only: beat's state file can live in the temp folder.
    schedule = Path(tempfile.gettempdir()) / f"slimmoa-beat-{os.getpid()}"
    celery_app.worker_main(
        [
            # JSON logs: no banner on stdout, so every line of the worker's output is one object.
            *(["--quiet"] if settings.log_format == "json" else []),
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(threads),
            "--queues",
            ",".join(queues),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            *(["--hostname", hostname] if hostname else []),
            *(["--beat", "--schedule", str(schedule)] if beat else []),
        ]
    )
