"""Following long work without waiting forever.

A command that follows a job or an evaluation (`slimmoa run`, `status --watch`, `eval`) gives up with
the reason when nothing has moved for STALL_TIMEOUT_S while work is due and no live worker consumes
the queue that work waits in. Work that is slow but has a worker is waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from orchestrator.celery_app import app
from orchestrator.errors import Unavailable

__all__ = ["Stalled", "Watchdog", "live_consumers"]

# How long a liveness question waits for the workers' replies.
INSPECT_TIMEOUT_S = 1.0


class Stalled(Unavailable):
    """Nothing moved for the stall time and no live worker can move it."""


def live_consumers(queue: str) -> int:
    """How many live workers consume `queue` now (Celery's own inspect of the workers)."""
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    return sum(1 for queues in replies.values() if any(q.get("name") == queue for q in queues))


class Watchdog:
    """Watches a progress value; `check` raises Stalled once it has not changed for `stall_s` seconds
    and `alive()` says no worker can move it."""

    def __init__(self, stall_s: float, what: str, alive: Callable[[], bool]) -> None:
        self.stall_s = stall_s
        self.what = what
        self.alive = alive
        self._last: Hashable = None
        self._since = time.monotonic()

    def check(self, progress: Hashable) -> None:
        now = time.monotonic()
        if progress != self._last:
            self._last, self._since = progress, now
            return
        if now - self._since < self.stall_s:
            return
        if self.alive():
            # A worker holds the work: wait another stall period before asking again.
            self._since = now
            return
        raise Stalled(f"{self.what}: nothing moved for {self.stall_s:g} s and no live worker takes the work")
