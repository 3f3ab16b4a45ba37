"""Permanent load failures a worker remembers for a while, so that the stages of a model that cannot
load fail at once with the loader's message instead of each paying for a load that cannot work."""

from __future__ import annotations

import threading
import time

from workers import metrics
from workers.outcomes import Failure

__all__ = ["LoadFailures"]


class LoadFailures:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        # model -> (until, failure)
        self._failures: dict[str, tuple[float, Failure]] = {}

    def remember(self, name: str, failure: Failure) -> None:
        """Keep a permanent failure for `ttl_s` seconds; a transient one is not kept."""
        if failure.transient or self.ttl_s <= 0:
            return
        with self._lock:
            self._failures[name] = (time.monotonic() + self.ttl_s, failure)
        metrics.ENGINE_LOAD_FAILED.labels(name).set(1)

    def get(self, name: str) -> Failure | None:
        """The model's remembered failure, if it has not expired."""
        with self._lock:
            until, failure = self._failures.get(name, (0.0, None))
            if failure is None or until > time.monotonic():
                return failure
            del self._failures[name]
        metrics.ENGINE_LOAD_FAILED.labels(name).set(0)
        return None
