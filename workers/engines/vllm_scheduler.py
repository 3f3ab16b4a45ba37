"""vLLM's scheduler with one rule more: while a request someone waits for (a chat request's stage, engine
priority 0) is in the engine, the bulk requests already running keep their KV cache but get no steps,
and no bulk request is admitted.

vLLM's own priority policy orders only the waiting queue and preempts only when the KV cache is full: a
chat request that arrives beside sixteen bulk generations shares every decode step with them, which on a
few CPU cores (or a full GPU batch) makes its time to first token several times the idle one. Held
requests resume where they stopped once no interactive request is left. The engine core loads this
class by its dotted path (`scheduler_cls`); it runs in that process.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from orchestrator.routing import INTERACTIVE_PRIORITY

__all__ = ["InteractiveFirstAsyncScheduler", "InteractiveFirstScheduler"]


class _InteractiveFirst:
    """The rule, over whichever vLLM scheduler the platform runs (synchronous on CPU)."""

    running: list[Any]
    waiting: Any
    kv_holding_waiting: Any
    max_num_active_reqs: int
    max_num_running_reqs: int
    # The last held step scheduled nothing (its interactive requests could not get KV room): the
    # next step runs everything, so that bulk requests holding the cache finish and free it.
    _starved = False

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        schedule = super().schedule  # type: ignore[misc]
        waiting = sum(r.priority == INTERACTIVE_PRIORITY for r in (*self.waiting, *self.kv_holding_waiting))
        running = [r for r in self.running if r.priority == INTERACTIVE_PRIORITY]
        held = [r for r in self.running if r.priority != INTERACTIVE_PRIORITY]
        # Hold only when an interactive request runs or can be admitted beside the held ones.
        room = self.max_num_running_reqs - len(self.running)
        if self._starved or not held or not (running or (waiting and room > 0)):
            self._starved = False
            return schedule(*args, **kwargs)
        admission = self.max_num_active_reqs
        self.running = running
        self.max_num_active_reqs = min(admission, len(running) + min(waiting, room))
        try:
            output = schedule(*args, **kwargs)
        finally:
            self.max_num_active_reqs = admission
            self.running = self.running + held
        self._starved = output.total_num_scheduled_tokens == 0
        return output


class InteractiveFirstScheduler(_InteractiveFirst, Scheduler):  # type: ignore[misc]
    pass


class InteractiveFirstAsyncScheduler(_InteractiveFirst, AsyncScheduler):  # type: ignore[misc]
    pass
