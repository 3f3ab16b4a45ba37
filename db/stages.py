"""The stage tasks' statements: one read per stage, one write per stage.

These run for every slot of every item, so each is prebuilt once and is a single statement on
Postgres: a proposer reads its item, its job's status, its own slot row and the previous layer's
pool in one query and stores its candidate with one upsert; an aggregator reads its pool the same
way and stores its output, finishes the item and counts it on the job in one statement. They run
on a `StageConnection` (`db.session.statement_scope`). On SQLite the multi-step writes are several
statements in the connection's one transaction.

A multi-turn item runs one MoA round per user turn: its candidates and outputs are keyed by turn, a
stage reads only its own turn's rows, and the conversation so far (the earlier turns' outputs) with
one more query.

Each write is guarded (a unique row, ON CONFLICT, a pending-status check), so a redelivered stage
changes nothing that is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import JSON, String, and_, bindparam, case, cast, literal, or_, select, update

from db.models import ITEM_COUNTERS, Candidate, Item, ItemStatus, Job, JobStatus, Output, utcnow
from db.rows import GenerationRecord, dialect_insert
from db.session import StageConnection

__all__ = [
    "CandidateRow",
    "StageRead",
    "finish_item",
    "job_recipe",
    "mark_item_dispatched",
    "read_pools",
    "read_proposer",
    "record_candidate",
    "record_step",
    "record_turn_output",
]


class TurnAnswer(NamedTuple):
    """An earlier turn's aggregated output, as the next turns read it."""

    turn: int
    text: str
    pool_size: int


class CandidateRow(NamedTuple):
    """A candidate as a stage reads it: the columns it uses, without an ORM object."""

    id: int
    layer: int
    slot: int
    text: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass(frozen=True)
class StageRead:
    """What a stage task needs of its item: its fields, its job's status, its candidate rows."""

    job_id: str
    instruction: str
    system: str | None
    # The conversation of a chat record ([{role, content}]), None for a one-turn prompt.
    messages: list[dict[str, str]] | None
    # The user turns of a multi-turn record, None otherwise.
    turns: list[str] | None
    last_turn: int
    status: str
    job_status: str
    # The job's kind (bulk or chat) and priority: the broker step of the stages the item sends next.
    job_kind: str
    job_priority: int
    # Rows of the layers read (of the turn read), ordered by layer and slot.
    candidates: list[CandidateRow]
    # Outputs of the turns up to the one read (multi-turn items only), in turn order.
    answers: list[TurnAnswer] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        """The item still waits for its stages: it is pending and its job was not cancelled."""
        return self.status == ItemStatus.PENDING and self.job_status != JobStatus.CANCELLED

    def answered(self, turn: int) -> bool:
        return any(answer.turn == turn for answer in self.answers)

    def pool(self, layer: int) -> list[CandidateRow]:
        """Every slot row of a layer, ordered by slot: finished ones and recorded failures."""
        return [c for c in self.candidates if c.layer == layer]


def _stage_read(candidates: Any) -> Any:
    """The item with its job's status, joined to the candidate rows that `candidates` selects."""
    columns = (Candidate.id, Candidate.layer, Candidate.slot, Candidate.text, Candidate.error)
    item = (Item.job_id, Item.instruction, Item.system, Item.messages, Item.turns, Item.last_turn)
    return (
        select(*item, Item.status, Job.status, Job.kind, Job.priority, *columns)
        .join(Job, Job.id == Item.job_id)
        .outerjoin(
            Candidate, and_(Candidate.item_id == Item.id, Candidate.turn == bindparam("turn"), candidates)
        )
        .where(Item.id == bindparam("item_id"))
        .order_by(Candidate.layer, Candidate.slot)
    )


# A proposer needs the previous layer's pool and its own slot's row (not its siblings' texts).
_PROPOSER_READ = _stage_read(
    or_(
        Candidate.layer == bindparam("pool_layer"),
        and_(Candidate.layer == bindparam("layer"), Candidate.slot == bindparam("slot")),
    )
)
_POOL_READ = _stage_read(Candidate.layer >= bindparam("from_layer"))


_ANSWERS = (
    select(Output.turn, Output.text, Output.pool_size)
    .where(Output.item_id == bindparam("item_id"), Output.turn <= bindparam("turn"))
    .order_by(Output.turn)
)
_ITEM_COLUMNS = 10


def _read(db: StageConnection, statement: Any, params: dict[str, Any]) -> StageRead | None:
    rows = db.rows(statement, params)
    if not rows:
        return None
    # An item without candidate rows comes back as one row whose candidate columns are NULL.
    candidates = [CandidateRow._make(row[_ITEM_COLUMNS:]) for row in rows if row[_ITEM_COLUMNS] is not None]
    job_id, instruction, system, messages, turns, last_turn, status, job_status, kind, priority = rows[0][
        :_ITEM_COLUMNS
    ]
    read = StageRead(
        job_id,
        instruction,
        system,
        messages,
        turns,
        last_turn,
        status,
        job_status,
        kind,
        priority,
        candidates,
    )
    if read.turns is not None:
        read.answers.extend(TurnAnswer._make(row) for row in db.rows(_ANSWERS, params))
    return read


def read_proposer(
    db: StageConnection, item_id: int, layer: int, slot: int, turn: int = 0
) -> StageRead | None:
    """A proposer's one query: the item, its job's status, the pool of layer - 1 and the row of its
    own (layer, slot) if there is one, of its turn; None when there is no such item."""
    params = {"item_id": item_id, "pool_layer": layer - 1, "layer": layer, "slot": slot, "turn": turn}
    return _read(db, _PROPOSER_READ, params)


def read_pools(db: StageConnection, item_id: int, from_layer: int = 0, turn: int = 0) -> StageRead | None:
    """The item, its job's status and its candidate rows of layers >= `from_layer` of `turn`, in one
    query; None when there is no such item."""
    return _read(db, _POOL_READ, {"item_id": item_id, "from_layer": from_layer, "turn": turn})


_JOB_RECIPE = select(Job.recipe).where(Job.id == bindparam("job_id"))


def job_recipe(db: StageConnection, job_id: str) -> dict[str, Any] | None:
    """The recipe a job was submitted with, as stored; None when there is no such job."""
    rows = db.rows(_JOB_RECIPE, {"job_id": job_id})
    return rows[0][0] if rows else None


_MARK_DISPATCHED = update(Item).where(Item.id == bindparam("item_id")).values(dispatched_at=bindparam("now"))


def mark_item_dispatched(db: StageConnection, item_id: int) -> None:
    """Stamp an item whose next canvas was just sent (the recovery sweep leaves it alone a while)."""
    db.rows(_MARK_DISPATCHED, {"item_id": item_id, "now": utcnow()})


_RECORD_FIELDS = tuple(GenerationRecord.__dataclass_fields__)
_KEY = ("item_id", "turn", "layer", "slot")


@cache
def _candidate_upsert(dialect: str) -> Any:
    statement = dialect_insert(dialect, Candidate).values(
        {column: bindparam(column) for column in (*_KEY, *_RECORD_FIELDS)} | {"created_at": bindparam("now")}
    )
    return statement.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={key: statement.excluded[key] for key in _RECORD_FIELDS},
        where=Candidate.error.is_not(None),
    ).returning(Candidate.id)


_CANDIDATE_ID = select(Candidate.id).where(*(getattr(Candidate, key) == bindparam(key) for key in _KEY))


def record_candidate(
    db: StageConnection, item_id: int, layer: int, slot: int, record: GenerationRecord, turn: int = 0
) -> int:
    """Store a slot's result and return the row id. A finished slot is never overwritten; a failed one is."""
    key = {"item_id": item_id, "turn": turn, "layer": layer, "slot": slot}
    written = db.rows(_candidate_upsert(db.dialect.name), key | record.__dict__ | {"now": utcnow()})
    if written:
        return int(written[0][0])
    # The slot was already finished (a redelivered task): keep that row and return its id.
    return int(db.rows(_CANDIDATE_ID, key)[0][0])


_CANDIDATE_TEXT = select(Candidate.text).where(*(getattr(Candidate, key) == bindparam(key) for key in _KEY))


def record_step(
    db: StageConnection, item_id: int, turn: int, layer: int, step: int, record: GenerationRecord
) -> str:
    """Store an intermediate step of a sequential aggregation (a candidate row of the steps' `layer`,
    slot = step) once, and return the text stored: a duplicate aggregator that stored the step first
    wins, and the next step reads that text."""
    assert record.text is not None
    record_candidate(db, item_id, layer, step, record, turn)
    key = {"item_id": item_id, "turn": turn, "layer": layer, "slot": step}
    return str(db.rows(_CANDIDATE_TEXT, key)[0][0])


# What an output stores of its generation record.
_OUTPUT_FIELDS = (
    "model",
    "text",
    "prompt_tokens",
    "output_tokens",
    "latency_ms",
    "finish_reason",
    "worker",
    "started_at",
)


@cache
def _output_insert(dialect: str) -> Any:
    columns = ("item_id", "turn", "pool_size", *_OUTPUT_FIELDS)
    values: dict[str, Any] = {column: bindparam(column) for column in columns}
    values["created_at"] = bindparam("now")
    statement = dialect_insert(dialect, Output).values(values)
    return statement.on_conflict_do_nothing(index_elements=["item_id", "turn"]).returning(Output.item_id)


def _output_params(output: GenerationRecord, turn: int, pool_size: int) -> dict[str, Any]:
    assert output.text is not None
    recorded = {name: getattr(output, name) for name in _OUTPUT_FIELDS}
    return recorded | {"turn": turn, "pool_size": pool_size}


def record_turn_output(
    db: StageConnection, item_id: int, turn: int, output: GenerationRecord, pool_size: int
) -> bool:
    """Store the aggregated answer to a turn before the last one (the item stays pending for the next
    turn); False when the turn already had one (a redelivered aggregator)."""
    params = {"item_id": item_id, "now": utcnow()} | _output_params(output, turn, pool_size)
    return bool(db.rows(_output_insert(db.dialect.name), params))


_FINISH_VALUES = {
    Item.status: bindparam("new_status"),
    Item.error: bindparam("new_error"),
    Item.truncation: bindparam("new_truncation", type_=JSON),
    Item.finished_at: bindparam("now"),
}


def _item_move(which: Any) -> Any:
    """Move the pending item(s) `which` selects to their final status; returns their job ids."""
    return (
        update(Item)
        .where(which, Item.status == ItemStatus.PENDING)
        .values(_FINISH_VALUES)
        .returning(Item.job_id)
    )


def _job_count(status: ItemStatus, which: Any) -> Any:
    """Count one more item of `status` on the job `which` selects and, with its last item, end the
    job: succeeded when none failed, failed when all did, partial otherwise. Returns the job id."""
    counter = ITEM_COUNTERS[status]
    done = Job.items_succeeded + Job.items_degraded + Job.items_failed + 1
    failed = Job.items_failed + (1 if status == ItemStatus.FAILED else 0)
    ends = and_(done == Job.total_items, or_(Job.status == JobStatus.QUEUED, Job.status == JobStatus.RUNNING))
    final = case(
        (failed == 0, JobStatus.SUCCEEDED),
        (failed == Job.total_items, JobStatus.FAILED),
        else_=JobStatus.PARTIAL,
    )
    # A job that ends with failed items says how many; each item's row says why.
    failures = cast(failed, String) + literal(" of ") + cast(Job.total_items, String)
    summary = failures + literal(" items failed: see the job's items with status failed")
    values: dict[Any, Any] = {
        counter: counter + 1,
        Job.status: case((ends, final), else_=Job.status),
        Job.finished_at: case((ends, bindparam("now")), else_=Job.finished_at),
        Job.error: case((and_(ends, failed > 0), summary), else_=Job.error),
    }
    return update(Job).where(which).values(values).returning(Job.id)


def _finish(status: ItemStatus, *, with_output: bool) -> Any:
    """Postgres: the output insert (if any), the item's move and the job's count as ONE statement,
    each step feeding the next through RETURNING: one round trip, and the job's row is locked only
    for that statement."""
    which = Item.id == bindparam("item_id")
    if with_output:
        output = _output_insert("postgresql").cte("output")
        which = Item.id.in_(select(output.c.item_id))
    moved = _item_move(which).cte("moved")
    return _job_count(status, Job.id.in_(select(moved.c.job_id)))


_FINISH = {
    (status, with_output): _finish(status, with_output=with_output)
    for status in ITEM_COUNTERS
    for with_output in (False, True)
}
_ITEM_MOVE = _item_move(Item.id == bindparam("item_id"))
_JOB_COUNT = {status: _job_count(status, Job.id == bindparam("job_id")) for status in ITEM_COUNTERS}


def finish_item(
    db: StageConnection,
    item_id: int,
    status: ItemStatus,
    *,
    error: str | None = None,
    truncation: list[dict[str, Any]] | None = None,
    output: GenerationRecord | None = None,
    pool_size: int = 0,
    turn: int = 0,
) -> bool:
    """Move a pending item to its final status and count it on the job, once. With `output` (the
    aggregated answer to the item's last `turn`, made from `pool_size` candidates) the output is
    stored first, once.

    Returns False when nothing changed: the item was not pending, or already had an output (a
    redelivered aggregator).
    """
    params: dict[str, Any] = {"item_id": item_id, "new_status": str(status), "now": utcnow()}
    params |= {"new_error": error, "new_truncation": truncation}
    if output is not None:
        params |= _output_params(output, turn, pool_size)
    if db.dialect.name == "postgresql":
        return bool(db.rows(_FINISH[status, output is not None], params))
    if output is not None and not db.rows(_output_insert(db.dialect.name), params):
        return False
    moved = db.rows(_ITEM_MOVE, params)
    if not moved:
        return False
    db.rows(_JOB_COUNT[status], {"job_id": moved[0][0], "now": params["now"]})
    return True
