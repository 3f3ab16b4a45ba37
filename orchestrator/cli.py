"""The `slimmoa` command line."""

from __future__ import annotations

import enum
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from db import queries
from db.migrate import upgrade
from db.models import FINAL_JOB_STATUSES, JobStatus
from db.session import session_scope
from orchestrator.api.schemas import JobDetailPublic, StagePublic
from orchestrator.celery_app import app as celery_app
from orchestrator.celery_app import configure
from orchestrator.client import DEFAULT_URL, ApiClient, ApiError
from orchestrator.console import console, err
from orchestrator.console import fail as _fail
from orchestrator.embedded import EmbeddedError, private_redis, worker_process
from orchestrator.exports import ExportError, ExportFormat, Rejected, metadata_path, open_export
from orchestrator.inputs import InputError, read_records
from orchestrator.jobs import create_job, enqueue_job
from orchestrator.recipes import EMBEDDED_MODELS, RecipeError, load_recipe, missing_local_weights
from orchestrator.recovery import RetryStage
from orchestrator.settings import get_settings

__all__ = ["cli", "main"]

cli = typer.Typer(help="SlimMoA: Mixture-of-Agents generation over Celery.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
models_cli = typer.Typer(help="Local model weights.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(models_cli, name="models")
POLL_INTERVAL_S = 0.5


def _use(database_url: str, redis_url: str) -> None:
    """Point this process (settings and Celery app) at the given services."""
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    get_settings.cache_clear()
    configure(celery_app, get_settings())


@cli.command()
def run(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="JSONL or AlpacaEval-style JSON list.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write one JSON object per line.")],
    recipe: Annotated[str, typer.Option(help="Recipe name (recipes/NAME.yaml) or path.")] = "embedded",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N records.")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    show: Annotated[bool, typer.Option(help="Print every aggregated answer at the end.")] = False,
) -> None:
    """Run one job all-in-one: a private Redis unless REDIS_URL, ./slimmoa.db unless DATABASE_URL."""
    settings = get_settings()
    try:
        chosen = load_recipe(recipe, settings.recipes_dir)
        missing = missing_local_weights(chosen)
        if missing:
            raise RecipeError("\n".join(f"recipe {chosen.name}: {problem}" for problem in missing))
        records = read_records(input_path, limit)
    except (RecipeError, InputError) as exc:
        raise _fail(str(exc)) from None
    database_url = settings.database_url or f"sqlite:///{Path('slimmoa.db').resolve()}"
    upgrade(database_url)
    try:
        with private_redis() if not settings.redis_url else _given(settings.redis_url) as redis_url:
            _use(database_url, redis_url)
            job_id = create_job(database_url, chosen, records, name=name)
            console.print(f"job [bold]{job_id}[/bold]: {len(records)} items, recipe {chosen.name}")
            log_path = output.with_name(output.name + ".worker.log")
            env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
            with worker_process(env, log_path, get_settings().inference_concurrency) as worker:
                enqueue_job(job_id)
                status = _follow(database_url, job_id, worker.poll, log_path)
    except EmbeddedError as exc:
        raise _fail(str(exc), code=1) from None
    _write_export(database_url, job_id, ExportFormat.JSONL, output)
    pools = _write_export(
        database_url, job_id, ExportFormat.POOLS, output.with_name(output.stem + ".pools.jsonl")
    )
    with session_scope(database_url) as session:
        counts = queries.count_rows(session, job_id)
    if show:
        for line in output.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            console.rule(f"[bold]{record['id']}[/bold] {record['instruction'][:70]}")
            console.print(record["output"], markup=False, highlight=False)
    console.print(
        f"job {job_id} {status}: {counts['items']} items, {counts['candidates']} candidates, "
        f"{counts['outputs']} outputs stored in {database_url}\n"
        f"outputs: {output}\ncandidate pools: {pools}"
    )
    if status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


class _given:
    """A context manager yielding an already configured Redis URL."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *_: object) -> None:
        return None


def _follow(database_url: str, job_id: str, worker_poll: object, log_path: Path) -> str:
    """Show a progress bar until the job ends; stop early if the worker dies."""
    poll = worker_poll if callable(worker_poll) else (lambda: None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("generating", total=None)
        while True:
            with session_scope(database_url) as session:
                job = queries.get_job(session, job_id)
                assert job is not None
                status, done, total, failed = job.status, job.items_done, job.total_items, job.items_failed
            progress.update(bar, completed=done, total=total, description=f"generating ({failed} failed)")
            if status in FINAL_JOB_STATUSES:
                return status
            code = poll()
            if code is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise _fail(f"the worker exited with code {code}; last lines of {log_path}:\n{tail}", code=1)
            time.sleep(POLL_INTERVAL_S)


def _write_export(database_url: str, job_id: str, fmt: ExportFormat, path: Path) -> Path:
    """Write one export of the job from the database, with its metadata record beside it."""
    with session_scope(database_url) as session:
        job = queries.get_job(session, job_id)
        assert job is not None
    export = open_export(database_url, job, fmt)
    return _save(path, export.chunks, export.metadata.model_dump(mode="json"))


def _save(path: Path, chunks: Iterable[bytes], metadata: dict[str, Any]) -> Path:
    """Write an export atomically (readers never see a half-written file), its metadata record beside it."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    metadata_path(path).write_text(
        json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    partial.replace(path)
    return path


class WorkerRole(enum.StrEnum):
    ALL = "all"  # one worker for everything (a single machine, `slimmoa run`)
    CONTROL = "control"  # dispatch, layer checks, the recovery sweep: no engines
    INFERENCE = "inference"  # the stages and judges: owns the device and the engines


@cli.command()
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
    concurrency: Annotated[int | None, typer.Option(min=1, help="Threads: generations in flight.")] = None,
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
    from orchestrator.logs import use_for_celery

    if memory_gb is not None:
        os.environ["WORKER_MEMORY_GB"] = str(memory_gb)
    if models is not None:
        os.environ["WORKER_MODELS"] = models
    get_settings.cache_clear()
    configure(celery_app, get_settings())
    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise _fail("a worker needs REDIS_URL and DATABASE_URL")
    if settings.worker_models and role == WorkerRole.CONTROL:
        raise _fail("--models / WORKER_MODELS: a control worker serves no models")
    try:
        from orchestrator.fleet import worker_selection

        worker_selection(settings)
    except ValueError as exc:  # SelectionError: a recipe in the list does not load
        raise _fail(str(exc)) from None
    use_for_celery(settings.log_format, loglevel)
    queues = []
    if role != WorkerRole.INFERENCE:
        queues.append(settings.queue_control)
    if role != WorkerRole.CONTROL:
        import workers.judge_tasks  # (registers the judge task on the app)
        import workers.tasks  # noqa: F401  (registers the stage tasks on the app)
        from workers.affinity import AffinityStep

        # Judges wait in the shared inference queue; stages in per-model queues, which the
        # affinity scheduler starts and stops consuming.
        queues.append(settings.queue_inference)
        celery_app.steps["consumer"].add(AffinityStep)

    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=settings.worker_metrics_host)

    celery_app.worker_main(
        [
            # JSON logs: no banner on stdout, so every line of the worker's output is one object.
            *(["--quiet"] if settings.log_format == "json" else []),
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency or settings.inference_concurrency),
            "--queues",
            ",".join(queues),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            *(["--hostname", hostname] if hostname else []),
            # Interval schedules only: beat's state file can live in the temp folder.
            *(
                ["--beat", "--schedule", str(Path(tempfile.gettempdir()) / f"slimmoa-beat-{os.getpid()}")]
                if beat
                else []
            ),
        ]
    )


@cli.command()
def recover(
    grace: Annotated[
        float | None, typer.Option(help="Leave items alone that had activity this many seconds ago.")
    ] = None,
) -> None:
    """Re-enqueue stages that are neither done, queued nor running (lost with a worker or the broker)."""
    from orchestrator.recovery import sweep

    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise _fail("recover needs REDIS_URL and DATABASE_URL")
    result = sweep(settings.database_url, grace_s=grace)
    console.print(
        f"checked {result.items_checked} stalled items: re-sent {result.proposer_chords} proposer chords, "
        f"{result.layer_checks} layer checks, {result.aggregators} aggregators; "
        f"{result.skipped_in_flight} still in flight"
    )


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database at DATABASE_URL to the latest schema."""
    url = get_settings().database_url
    if not url:
        raise _fail("DATABASE_URL is not set")
    upgrade(url, revision)
    console.print(f"database at {url} is at revision {revision}")


@cli.command()
def plan(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.")],
    gpu_memory_gb: Annotated[
        float, typer.Option(min=0.1, help="Device memory budget (RAM on a CPU box).")
    ] = 80.0,
) -> None:
    """Print the memory plan of a recipe: resident models, the swap slot, KV-cache room, loads per stage."""
    from rich.table import Table

    from orchestrator.planning import plan_memory

    try:
        chosen = load_recipe(recipe, get_settings().recipes_dir)
    except RecipeError as exc:
        raise _fail(str(exc)) from None
    memory_plan = plan_memory(chosen, gpu_memory_gb)
    table = Table(title=f"{chosen.name} on {gpu_memory_gb:g} GB")
    for column in ("model", "memory GB", "weights GB", "KV cache GB", "placement", "used in"):
        table.add_column(column)
    for model in memory_plan.models:
        table.add_row(
            model.name,
            f"{model.memory_gb:g}",
            "?" if model.weights_gb is None else f"{model.weights_gb:g}",
            "?" if model.kv_cache_gb is None else f"{model.kv_cache_gb:g}",
            "resident" if model.resident else "swaps",
            ", ".join(model.used_in),
        )
    console.print(table)
    console.print(
        f"resident: {memory_plan.resident_gb:g} GB; swap slot: {memory_plan.swap_slot_gb:g} GB; "
        f"peak: {memory_plan.resident_gb + memory_plan.swap_slot_gb:g} of {gpu_memory_gb:g} GB"
    )
    for stage, models in memory_plan.loads:
        console.print(f"  {stage}: load {', '.join(models) if models else 'nothing'}")
    console.print(f"loads per job: {memory_plan.total_loads} (one per swapped model per layer, not per item)")
    for warning in memory_plan.warnings:
        err.print(f"[yellow]note:[/yellow] {warning}")
    if not memory_plan.fits:
        raise _fail("does not fit: " + "; ".join(memory_plan.problems), code=1)


@models_cli.command("prepare")
def models_prepare() -> None:
    """Convert the embedded models shipped in Python packages into the model cache (once)."""
    from workers.model_store import ensure_embedded_model

    for name in EMBEDDED_MODELS:
        path = ensure_embedded_model(name, get_settings().model_cache_dir)
        console.print(f"embedded model {name}: {path}")


# --- Client commands: the same jobs through the HTTP API -------------------------------------------

ApiUrl = Annotated[
    str, typer.Option("--api", envvar="SLIMMOA_API_URL", help="The API's base URL.", show_default=True)
]
ApiToken = Annotated[
    str | None,
    typer.Option("--token", envvar="SLIMMOA_API_TOKEN", help="Bearer token, if the API needs one."),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")]


@contextmanager
def _api(url: str, token: str | None) -> Iterator[ApiClient]:
    """A client of the API; its errors become exit code 1 with the API's message."""
    try:
        with ApiClient(url, token) as client:
            yield client
    except ApiError as exc:
        raise _fail(exc.detail, code=1) from None


@cli.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 1,
) -> None:
    """Serve the HTTP API (uvicorn); OpenAPI at /docs and /openapi.json."""
    import uvicorn

    from orchestrator.logs import configure_logging

    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise _fail("the API needs REDIS_URL and DATABASE_URL")
    options: dict[str, Any] = {}
    if settings.log_format == "json":
        configure_logging("json")
        options["log_config"] = None  # uvicorn's loggers propagate to the JSON handler
    uvicorn.run(
        "orchestrator.api.app:create_app", factory=True, host=host, port=port, workers=workers, **options
    )


@cli.command()
def flower(
    port: Annotated[int, typer.Option(help="TCP port.")] = 5555,
    address: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    basic_auth: Annotated[
        str | None,
        typer.Option(help="user:password (several comma-separated); FLOWER_BASIC_AUTH in the environment."),
    ] = None,
    insecure_local: Annotated[bool, typer.Option(help="Serve without a login, on 127.0.0.1 only.")] = False,
) -> None:
    """Serve Flower (workers, queues, tasks) for this app; it refuses to start without a login."""
    from orchestrator.flower import FlowerConfigError, serve

    settings = get_settings()
    if not settings.redis_url:
        raise _fail("Flower needs REDIS_URL")
    try:
        serve(celery_app, settings, address, port, basic_auth=basic_auth, insecure_local=insecure_local)
    except FlowerConfigError as exc:
        raise _fail(str(exc)) from None


@cli.command()
def submit(
    input_path: Annotated[Path, typer.Argument(metavar="FILE", help="JSONL or AlpacaEval-style JSON list.")],
    recipe: Annotated[str, typer.Option(help="Recipe name (see GET /v1/recipes).")],
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0 (lowest) to 9.")] = 0,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the first job.")
    ] = None,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Submit a prompt file as a job; prints the job id."""
    if not input_path.is_file():
        raise _fail(f"{input_path}: no such file")
    with _api(url, token) as client:
        job = client.submit_file(
            input_path, recipe, name=name, priority=priority, idempotency_key=idempotency_key
        )
    err.print(f"job {job.id}: {job.total_items} items, recipe {job.recipe_name}, {job.status}")
    console.print(job.id, highlight=False)


def _stage_label(stage: StagePublic) -> str:
    return f"proposers L{stage.layer}" if stage.layer is not None else stage.stage


def _show_job(job: JobDetailPublic) -> None:
    console.print(f"job {job.id} ({job.recipe_name}): {job.status}", highlight=False)
    table = Table(show_header=True)
    for column in ("stage", "done", "failed", "of"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    table.add_row("items", str(job.items_done), str(job.items_failed), str(job.total_items))
    for stage in job.progress.stages:
        table.add_row(_stage_label(stage), str(stage.finished), str(stage.failed), str(stage.expected))
    console.print(table)
    eta = job.progress.eta_seconds
    console.print(
        f"tokens: {job.progress.prompt_tokens} prompt, {job.progress.output_tokens} output"
        + (f"; {job.progress.items_per_second:.2f} items/s" if job.progress.items_per_second else "")
        + (f"; ETA {eta:.0f} s" if eta is not None else "")
    )
    if job.unserved_models:
        console.print(_unserved_note(job.unserved_models))
    if job.engine.loads:
        console.print(
            f"model loads: {job.engine.loads} ({job.engine.load_seconds:.1f} s), "
            f"{job.engine.swaps} of them swaps: "
            + ", ".join(f"{model} x{count}" for model, count in sorted(job.engine.per_model.items()))
        )


def _unserved_note(models: list[str]) -> str:
    return (
        f"[yellow]no live worker serves:[/yellow] {', '.join(models)} "
        "(their stages wait until a worker that serves them joins)"
    )


def _watch(client: ApiClient, job_id: str, interval: float) -> JobDetailPublic:
    """A live progress view (items and every stage) until the job ends."""
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {}
        unserved: list[str] = []
        while True:
            job = client.job(job_id)
            if job.unserved_models and job.unserved_models != unserved:
                progress.console.print(_unserved_note(job.unserved_models))
            unserved = job.unserved_models
            rows = [("items", job.items_done, job.total_items)] + [
                (_stage_label(s), s.finished + s.failed, s.expected) for s in job.progress.stages
            ]
            for label, done, total in rows:
                if label not in bars:
                    bars[label] = progress.add_task(label, total=total)
                progress.update(bars[label], completed=done, total=total)
            if job.status in FINAL_JOB_STATUSES:
                return job
            time.sleep(interval)


@cli.command()
def status(
    job_id: JobArg,
    watch: Annotated[bool, typer.Option(help="Follow the job live until it ends.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls with --watch.")] = 1.0,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Show a job's progress per stage; with --watch, follow it and exit 1 unless it succeeds."""
    with _api(url, token) as client:
        job = _watch(client, job_id, interval) if watch else client.job(job_id)
    _show_job(job)
    if watch and job.status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _rejected_rule(value: str) -> str:
    try:
        Rejected.parse(value)
    except ExportError as exc:
        raise typer.BadParameter(exc.reason) from None
    return value


@cli.command()
def export(
    job_id: JobArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="What to write.")
    ] = ExportFormat.JSONL,
    rejected: Annotated[
        str,
        typer.Option(
            callback=_rejected_rule,
            help="For --format preference, the final-layer candidate rejected: "
            "shortest, longest, random (seeded by the item) or model:NAME.",
        ),
    ] = "shortest",
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Download a job's finished results (the job may still run); the metadata record goes beside them."""
    if not output.parent.is_dir():
        raise _fail(f"--output: no folder {output.parent} to write {output.name} in")
    with _api(url, token) as client, client.results(job_id, export_format, rejected=rejected) as download:
        _save(output, download.chunks, download.metadata)
    console.print(
        f"{export_format.value} export of job {job_id}: {output} (metadata: {metadata_path(output)})"
    )


@cli.command()
def cancel(job_id: JobArg, url: ApiUrl = DEFAULT_URL, token: ApiToken = None) -> None:
    """Cancel a job: queued stages are dropped, running ones finish."""
    with _api(url, token) as client:
        job = client.cancel(job_id)
    console.print(f"job {job.id}: {job.status} ({job.items_done}/{job.total_items} items done)")


@cli.command()
def retry(
    job_id: JobArg,
    stage: Annotated[RetryStage, typer.Option(help="Which failed stages to re-run.")] = RetryStage.ALL,
    items: Annotated[
        str | None, typer.Option(help="Comma-separated item ids (default: every failed item).")
    ] = None,
    url: ApiUrl = DEFAULT_URL,
    token: ApiToken = None,
) -> None:
    """Re-run the failed stages of a job, reusing every finished candidate."""
    try:
        chosen = [int(part) for part in items.split(",")] if items else None
    except ValueError:
        raise _fail(f"--items: comma-separated item ids, got {items!r}") from None
    with _api(url, token) as client:
        result = client.retry(job_id, stage, chosen)
    console.print(
        f"job {result.job_id}: {result.items_reopened} items reopened "
        f"({len(result.proposer_items)} from the proposers, {len(result.aggregator_items)} aggregator only)"
    )


def main() -> None:
    from orchestrator.eval_cli import register

    register(cli)
    cli()


if __name__ == "__main__":
    main()
