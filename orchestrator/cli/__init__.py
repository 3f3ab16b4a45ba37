"""The `slimmoa` command line, assembled here from one module per command group:

run.py       `run`: one job all-in-one (embedded services, progress, outputs)
worker.py    `worker`: a Celery worker of one role
service.py   `api`, `flower`, `recover`, `db upgrade`, `plan`, `models prepare`
jobs.py      `submit`, `status`, `export`, `cancel`, `retry` through the HTTP API (views.py shows them)
evaluate.py  `eval`, `compare`, `diversity`
tune.py      `tune`: choose a recipe from a model zoo by solo runs, diversity and candidate recipes
timeline.py  `timeline`: where a job's time went, from the record
"""

from __future__ import annotations

import typer

from orchestrator.cli import evaluate, jobs, run, service, timeline, tune, worker

__all__ = ["cli", "main"]

cli = typer.Typer(help="SlimMoA: Mixture-of-Agents generation over Celery.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
models_cli = typer.Typer(help="Local model weights.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(models_cli, name="models")

cli.command()(run.run)
cli.command()(worker.worker)
cli.command()(service.api)
cli.command()(service.flower)
cli.command()(service.recover)
cli.command()(service.plan)
db_cli.command("upgrade")(service.db_upgrade)
models_cli.command("prepare")(service.models_prepare)
for command in (jobs.submit, jobs.status, jobs.export, jobs.cancel, jobs.retry):
    cli.command()(command)
cli.command("eval")(evaluate.evaluate)
cli.command()(evaluate.compare)
cli.command()(evaluate.diversity)
cli.command()(timeline.timeline)
cli.command()(tune.tune)


def main() -> None:
    cli()
