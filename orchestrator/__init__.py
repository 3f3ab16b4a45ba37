"""SlimMoA orchestration: settings, recipes, the Celery app and canvas, job submission and the CLI."""
