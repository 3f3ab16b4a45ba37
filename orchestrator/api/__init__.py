"""The HTTP API (`/v1`), served by `slimmoa api`."""

from orchestrator.api.app import create_app

__all__ = ["create_app"]
