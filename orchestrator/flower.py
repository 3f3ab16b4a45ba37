"""`slimmoa flower`: Flower on this project's Celery app, never without a login by accident.

Flower can revoke tasks and shut workers down, and it shows every task's arguments. It starts only
with a login: basic auth (`FLOWER_BASIC_AUTH=user:password`, several comma-separated) or Flower's
OAuth (`FLOWER_AUTH` with `FLOWER_AUTH_PROVIDER`, `FLOWER_OAUTH2_KEY`, `FLOWER_OAUTH2_SECRET` and
`FLOWER_OAUTH2_REDIRECT_URI`); or, when told `--insecure-local`, without one on the loopback interface
only. Credentials travel to Flower through its own environment variables, never its command line.

With a login, Flower's HTTP API (`/api/workers`, `/api/tasks?search=...`) answers to the same
credentials. Stage tasks show `job=... item=... layer=... slot=... model=...` as their arguments
(`orchestrator.stage_info`), so `args:job=<id>` finds one job's stages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from celery import Celery

from orchestrator.logs import configure_logging
from orchestrator.settings import Settings

__all__ = ["LOOPBACK", "FlowerAccess", "FlowerConfigError", "flower_argv", "serve"]

LOOPBACK = "127.0.0.1"
_OAUTH = ("auth", "auth_provider", "oauth2_key", "oauth2_secret", "oauth2_redirect_uri")


class FlowerConfigError(ValueError):
    """Flower would start without a login, or with one that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class FlowerAccess:
    """Flower's login settings, as Flower reads them from `FLOWER_*` variables."""

    basic_auth: str = ""
    auth: str = ""
    auth_provider: str = ""
    oauth2_key: str = ""
    oauth2_secret: str = ""
    oauth2_redirect_uri: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FlowerAccess:
        return cls(**{f.name: env.get(f"FLOWER_{f.name.upper()}", "").strip() for f in fields(cls)})

    def env(self) -> dict[str, str]:
        """The `FLOWER_*` variables that give Flower this login."""
        return {
            f"FLOWER_{f.name.upper()}": getattr(self, f.name) for f in fields(self) if getattr(self, f.name)
        }

    def check(self) -> str | None:
        """The login this configures ("basic auth", "OAuth"), None for none; raises if it is broken."""
        if self.basic_auth:
            for entry in self.basic_auth.split(","):
                user, _, password = entry.strip().partition(":")
                if not user or not password:
                    raise FlowerConfigError(
                        "FLOWER_BASIC_AUTH: each entry is user:password with both parts set, "
                        f"got {entry.strip().split(':')[0]!r}:…"
                    )
        oauth = {name: getattr(self, name) for name in _OAUTH}
        if any(oauth.values()):
            missing = [f"FLOWER_{name.upper()}" for name, value in oauth.items() if not value]
            if missing:
                raise FlowerConfigError(f"an OAuth login for Flower also needs {', '.join(missing)}")
        if self.basic_auth:
            return "basic auth" + (" and OAuth" if any(oauth.values()) else "")
        return "OAuth" if any(oauth.values()) else None


def flower_argv(access: FlowerAccess, *, address: str, port: int, insecure_local: bool) -> list[str]:
    """The arguments of `celery flower` for this login and address; raises FlowerConfigError when Flower
    would serve without a login anywhere but on loopback."""
    login = access.check()
    if login is None:
        if not insecure_local:
            raise FlowerConfigError(
                "Flower can revoke tasks and shut workers down: give it a login, with "
                "FLOWER_BASIC_AUTH=user:password (or --basic-auth), or an OAuth login (FLOWER_AUTH, "
                "FLOWER_AUTH_PROVIDER, FLOWER_OAUTH2_KEY, FLOWER_OAUTH2_SECRET, FLOWER_OAUTH2_REDIRECT_URI); "
                "or pass --insecure-local to serve it without one on 127.0.0.1 only"
            )
        if address not in ("", LOOPBACK, "localhost"):
            raise FlowerConfigError(
                f"--insecure-local serves Flower on {LOOPBACK} only, not on {address!r}: give it a login"
            )
        address = LOOPBACK
    # Tornado's option syntax: --name=value.
    return [f"--address={address}", f"--port={port}"]


def serve(
    app: Celery,
    settings: Settings,
    address: str,
    port: int,
    *,
    basic_auth: str | None = None,
    insecure_local: bool = False,
) -> None:
    """Run Flower on `app` until it is stopped; `basic_auth` overrides FLOWER_BASIC_AUTH."""
    env = {**os.environ, **({"FLOWER_BASIC_AUTH": basic_auth} if basic_auth else {})}
    access = FlowerAccess.from_env(env)
    argv = flower_argv(access, address=address, port=port, insecure_local=insecure_local)
    os.environ.update(access.env())
    if settings.log_format == "json":
        configure_logging("json")  # installed first, so Tornado adds no handler of its own
    app.start(["flower", *argv])
