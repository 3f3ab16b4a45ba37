"""What a stage task is about, carried beside its ids: readable arguments in Flower, context in logs.

Stage tasks take ids only (`run_proposer(item, layer, slot)`), so Flower and Celery's own log lines
would show `[23004, 0, 1]`. The canvas puts the job, item, layer, slot and model of each stage on its
message instead: as a `slimmoa_stage` header (fields, read by the worker for its log context and
metrics) and as Celery's `argsrepr` (what Flower shows and searches: `job=... item=23004 ...`).

Celery keeps custom headers when a task is retried but not its `argsrepr`; the `before_task_publish`
handler below writes it again from the header, so a retried stage reads the same in Flower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from celery.signals import before_task_publish

__all__ = ["HEADER", "StageInfo", "stage_of"]

HEADER = "slimmoa_stage"


@dataclass(frozen=True)
class StageInfo:
    """The job, item and (where the stage has them) layer, slot, model and turn of one stage task."""

    job: str
    item: int
    layer: int | None = None
    slot: int | None = None
    model: str | None = None
    # Set for the turns after the first of a multi-turn item.
    turn: int | None = None

    def fields(self) -> dict[str, str | int]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def argsrepr(self) -> str:
        """`job=<id> item=<id> layer=<n> slot=<n> model=<name>`: searchable as `args:job=<id>` in Flower."""
        return " ".join(f"{key}={value}" for key, value in self.fields().items())

    def options(self) -> dict[str, Any]:
        """Options for `signature()` / `apply_async()` that carry this information on the message."""
        return {"argsrepr": self.argsrepr(), "headers": {HEADER: self.fields()}}

    @classmethod
    def from_fields(cls, fields: object) -> StageInfo | None:
        """Read a `slimmoa_stage` header back; None when it is absent or not one of ours."""
        if not isinstance(fields, dict) or not isinstance(fields.get("job"), str):
            return None
        try:
            return cls(
                job=fields["job"],
                item=int(fields["item"]),
                layer=_optional_int(fields.get("layer")),
                slot=_optional_int(fields.get("slot")),
                model=fields.get("model") if isinstance(fields.get("model"), str) else None,
                turn=_optional_int(fields.get("turn")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def stage_of(request: Any) -> StageInfo | None:
    """The stage information of a running task's request (Celery's `task.request`), if it has any."""
    fields = getattr(request, HEADER, None)
    if fields is None:
        fields = (getattr(request, "headers", None) or {}).get(HEADER)
    return StageInfo.from_fields(fields)


@before_task_publish.connect
def _readable_retries(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every message that carries the header shows it as its arguments, retries included."""
    if not headers:
        return
    info = StageInfo.from_fields(headers.get(HEADER))
    if info is not None:
        headers["argsrepr"] = info.argsrepr()
