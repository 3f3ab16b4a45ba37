"""Commands that run or maintain the service: `api`, `recover`, `db upgrade`, `plan`, `models prepare`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from db.migrate import upgrade
from orchestrator.cli.console import console, err, fail, fail_on
from orchestrator.errors import RecipeError
from orchestrator.recipes import EMBEDDED_MODELS, load_recipe
from orchestrator.settings import get_settings

__all__ = ["api", "db_upgrade", "flower", "models_prepare", "plan", "recover"]


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
        raise fail("the API needs REDIS_URL and DATABASE_URL")
    options: dict[str, Any] = {}
    if settings.log_format == "json":
        configure_logging("json")
        options["log_config"] = None  # uvicorn's loggers propagate to the JSON handler
    uvicorn.run(
        "orchestrator.api.app:create_app", factory=True, host=host, port=port, workers=workers, **options
    )


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
    from orchestrator.celery_app import app as celery_app
    from orchestrator.flower import FlowerConfigError, serve

    settings = get_settings()
    if not settings.redis_url:
        raise fail("Flower needs REDIS_URL")
    try:
        serve(celery_app, settings, address, port, basic_auth=basic_auth, insecure_local=insecure_local)
    except FlowerConfigError as exc:
        raise fail(str(exc)) from None


def recover(
    grace: Annotated[
        float | None, typer.Option(help="Leave items alone that had activity this many seconds ago.")
    ] = None,
) -> None:
    """Re-enqueue stages that are neither done, queued nor running (lost with a worker or the broker)."""
    from orchestrator.recovery import sweep

    settings = get_settings()
    if not settings.redis_url or not settings.database_url:
        raise fail("recover needs REDIS_URL and DATABASE_URL")
    result = sweep(settings.database_url, grace_s=grace)
    console.print(
        f"checked {result.items_checked} stalled items: re-sent {result.proposer_chords} proposer chords, "
        f"{result.layer_checks} layer checks, {result.aggregators} aggregators; "
        f"{result.skipped_in_flight} still in flight; re-sent {result.judgments} judgments"
    )


def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database at DATABASE_URL to the latest schema."""
    url = get_settings().database_url
    if not url:
        raise fail("DATABASE_URL is not set")
    upgrade(url, revision)
    console.print(f"database at {url} is at revision {revision}")


def _gb(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def plan(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.")],
    gpu_memory_gb: Annotated[
        float, typer.Option(min=0.1, help="Device memory budget (RAM on a CPU box).")
    ] = 80.0,
    context_gb: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Device memory each vLLM engine keeps beside weights and KV cache, asleep too "
            "(its CUDA context); 0 on a CPU.  [default: 1.0]",
        ),
    ] = None,
) -> None:
    """Print the memory plan of a recipe: resident models, the swap slot, the KV cache each model gets
    (GB, tokens, concurrent sequences), loads per stage."""
    from orchestrator.planning import CUDA_CONTEXT_GB, plan_memory

    try:
        chosen = load_recipe(recipe, get_settings().recipes_dir)
    except RecipeError as exc:
        raise fail_on(exc) from None
    context = CUDA_CONTEXT_GB if context_gb is None else context_gb
    memory_plan = plan_memory(chosen, gpu_memory_gb, context_gb=context)
    table = Table(title=f"{chosen.name} on {gpu_memory_gb:g} GB")
    columns = ("model", "memory GB", "weights GB", "KV cache GB", "KV per token", "KV tokens", "sequences")
    for column in (*columns, "placement", "used in"):
        table.add_column(column)
    for model in memory_plan.models:
        kv = _gb(model.kv_cache_gb)
        if model.planned_kv_gb is not None and model.planned_kv_gb != model.kv_cache_gb:
            kv += f" → {_gb(model.planned_kv_gb)}"
        per_token = model.kv_bytes_per_token
        table.add_row(
            model.name,
            f"{model.memory_gb:g}",
            _gb(model.weights_gb),
            kv,
            "?" if per_token is None else f"{per_token / 1e6:.3g} MB",
            "?" if model.kv_tokens is None else f"{model.kv_tokens:,}",
            "?" if model.sequences is None else f"{model.sequences} x {model.sequence_tokens:,} tokens",
            "resident" if model.resident else "swaps",
            ", ".join(model.used_in),
        )
    console.print(table)
    console.print(
        f"resident: {memory_plan.resident_gb:g} GB; swap slot: {memory_plan.swap_slot_gb:g} GB; "
        f"peak: {memory_plan.resident_gb + memory_plan.swap_slot_gb:g} of {gpu_memory_gb:g} GB "
        "at the recipe's memory_gb"
    )
    if memory_plan.fits:
        engines = sum(1 for m in memory_plan.models if chosen.model(m.name).engine == "vllm")
        console.print(
            f"planned: KV caches sized to the room left; peak {memory_plan.peak_gb:.4g} of "
            f"{gpu_memory_gb:g} GB with {engines} engine contexts of {context:g} GB"
        )
    for stage, models in memory_plan.loads:
        console.print(f"  {stage}: load {', '.join(models) if models else 'nothing'}")
    console.print(f"loads per job: {memory_plan.total_loads} (one per swapped model per layer, not per item)")
    if memory_plan.aggregator_passes > 1:
        window = chosen.aggregator.window
        console.print(
            f"aggregator passes per item: {memory_plan.aggregator_passes} (sequential, {window} candidates "
            "a step; the steps of an item run one after the other, no extra loads)"
        )
    for warning in memory_plan.warnings:
        err.print(f"[yellow]note:[/yellow] {warning}")
    if not memory_plan.fits:
        raise fail("does not fit: " + "; ".join(memory_plan.problems), code=1)


def models_prepare() -> None:
    """Convert the embedded models shipped in Python packages into the model cache (once)."""
    from workers.model_store import ensure_embedded_model

    for name in EMBEDDED_MODELS:
        path = ensure_embedded_model(name, get_settings().model_cache_dir)
        console.print(f"embedded model {name}: {path}")
