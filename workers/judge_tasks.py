"""The judge task: one pairwise verdict of an evaluation, stored once.

Like the stage tasks it takes an id, re-reads its row and returns early when the verdict is stored, so
a redelivered task or a resumed evaluation never judges an item twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Task
from sqlalchemy.orm import Session

from db import evaluations
from db.evaluations import Verdict
from db.models import JudgmentStatus
from db.session import session_scope
from orchestrator.celery_app import TASK_JUDGE, app
from orchestrator.errors import NoVerdict
from orchestrator.judging import (
    JUDGE_LOGPROBS,
    JUDGE_SAMPLING,
    judge_messages,
    verdict_preference,
)
from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import get_settings
from workers.engine_host import Spec
from workers.engines import ChatRequest, Engine, Generation
from workers.outcomes import Failure
from workers.stage_runner import STAGE_RETRY, attempt_stage, attempts, ride_out_database

__all__ = ["run_judge"]

log = logging.getLogger(__name__)

_SPECS: dict[str, type[VllmModel | OpenAIModel | SyntheticModel]] = {
    "vllm": VllmModel,
    "openai": OpenAIModel,
    "synthetic": SyntheticModel,
}


@dataclass(frozen=True)
class _Case:
    """What a judge reads of its judgment: the instruction, both outputs in the order shown, the judge."""

    job_id: str
    instruction: str
    first: str
    second: str
    model_first: bool
    judge: str
    spec: Spec


def _read(session: Session, judgment_id: int) -> _Case | float | None:
    """The case to judge; or the stored preference (None too) when there is nothing left to do."""
    judgment = evaluations.get_judgment(session, judgment_id)
    if judgment is None:
        return None
    if judgment.status == JudgmentStatus.DONE:
        return judgment.preference
    evaluation, output = judgment.evaluation, judgment.item.output
    if output is None:
        error = "the item has no output to judge"
        evaluations.record_judgment(session, judgment_id, Verdict(preference=None, error=error))
        return None
    reference = judgment.reference_output
    first, second = (output.text, reference) if judgment.swapped else (reference, output.text)
    spec_data = dict(evaluation.judge_spec)
    name = str(spec_data.pop("name"))
    spec = _SPECS[spec_data["engine"]].model_validate(spec_data)
    return _Case(evaluation.job_id, judgment.item.instruction, first, second, judgment.swapped, name, spec)


# The same runner as the stages: transient failures retried (declared), the rest recorded at once,
# a database restart ridden out in the task. NoVerdict (neither verdict token among the first
# tokens) is permanent: the judge would say the same again.
@app.task(name=TASK_JUDGE, bind=True, acks_late=True, **STAGE_RETRY)
def run_judge(self: Task, judgment_id: int) -> float | None:
    """Judge one item against its reference; returns P(the job's output is better), None if no verdict."""
    url = get_settings().database_url

    def read() -> _Case | float | None:
        with session_scope(url) as session:
            return _read(session, judgment_id)

    case = ride_out_database(read)
    if not isinstance(case, _Case):
        return case

    def prepare(engine: Engine) -> ChatRequest:
        messages = judge_messages(
            case.instruction, case.first, case.second, system_supported=engine.system_supported
        )
        request_id = f"judge_{judgment_id}_{attempts(self)}"
        return ChatRequest.build(request_id, messages, JUDGE_SAMPLING, logprobs=JUDGE_LOGPROBS)

    outcome = attempt_stage(self, case.judge, case.spec, prepare, case.job_id)
    verdict = _verdict(outcome, case, attempts(self))
    if verdict.error:
        log.warning("judgment %s failed: %s", judgment_id, verdict.error)

    def write() -> None:
        with session_scope(url) as session:
            evaluations.record_judgment(session, judgment_id, verdict)

    ride_out_database(write)
    return verdict.preference


def _verdict(outcome: Generation | Failure, case: _Case, attempt: int) -> Verdict:
    if isinstance(outcome, Failure):
        return Verdict(preference=None, error=outcome.message, attempt=attempt)
    try:
        preference = verdict_preference(outcome.top_logprobs or {}, model_first=case.model_first)
    except NoVerdict as exc:
        return Verdict(preference=None, error=f"{case.judge}: {exc}", attempt=attempt)
    return Verdict(
        preference=preference,
        verdict_logprobs=outcome.top_logprobs,
        judge_text=outcome.text,
        prompt_tokens=outcome.prompt_tokens,
        attempt=attempt,
    )
