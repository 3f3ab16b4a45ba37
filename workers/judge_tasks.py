"""The judge task: one pairwise verdict of an evaluation, stored once.

Like the stage tasks it takes an id, re-reads its row and returns early when the verdict is stored, so
a redelivered task or a resumed evaluation never judges an item twice.
"""

from __future__ import annotations

import logging
import random

from celery import Task

from db import evaluations
from db.evaluations import Verdict
from db.models import JudgmentStatus
from db.session import session_scope
from orchestrator.celery_app import DATABASE_RETRY, TASK_JUDGE, app
from orchestrator.judging import (
    JUDGE_LOGPROBS,
    JUDGE_SAMPLING,
    NoVerdict,
    judge_messages,
    verdict_preference,
)
from orchestrator.recipes import OpenAIModel, SyntheticModel, VllmModel
from orchestrator.settings import get_settings
from workers.engines import ChatRequest, EngineError, EngineUnavailable
from workers.tasks import engine_host

__all__ = ["run_judge"]

log = logging.getLogger(__name__)

_SPECS: dict[str, type[VllmModel | OpenAIModel | SyntheticModel]] = {
    "vllm": VllmModel,
    "openai": OpenAIModel,
    "synthetic": SyntheticModel,
}


# Retried: EngineUnavailable (rate limits, timeouts, lost connections).
# Not retried: RequestRejected (prompt too long, refused) and NoVerdict, which would repeat.
# A database restart is retried (DATABASE_RETRY): the verdict is stored once whatever happens.
@app.task(name=TASK_JUDGE, bind=True, acks_late=True, **DATABASE_RETRY)
def run_judge(self: Task, judgment_id: int) -> float | None:
    """Judge one item against its reference; returns P(the job's output is better), None if no verdict."""
    url = get_settings().database_url
    with session_scope(url) as session:
        judgment = evaluations.get_judgment(session, judgment_id)
        if judgment is None:
            return None
        if judgment.status == JudgmentStatus.DONE:
            return judgment.preference
        evaluation = judgment.evaluation
        output = judgment.item.output
        if output is None:
            error = "the item has no output to judge"
            evaluations.record_judgment(session, judgment_id, Verdict(preference=None, error=error))
            return None
        instruction, model_text, reference = judgment.item.instruction, output.text, judgment.reference_output
        model_first = judgment.swapped
        spec_data = dict(evaluation.judge_spec)
        job_id = evaluation.job_id
    name = str(spec_data.pop("name"))
    spec = _SPECS[spec_data["engine"]].model_validate(spec_data)
    attempt = self.request.retries + 1
    host = engine_host()
    try:
        with host.lease(name, spec, job_id=job_id) as engine:
            first, second = (model_text, reference) if model_first else (reference, model_text)
            messages = judge_messages(instruction, first, second, system_supported=engine.system_supported)
            request = ChatRequest.build(
                f"judge_{judgment_id}_{attempt}", messages, JUDGE_SAMPLING, logprobs=JUDGE_LOGPROBS
            )
            generation = host.generate(engine, request)
        preference = verdict_preference(generation.top_logprobs or {}, model_first=model_first)
        verdict = Verdict(
            preference=preference,
            verdict_logprobs=generation.top_logprobs,
            judge_text=generation.text,
            prompt_tokens=generation.prompt_tokens,
            attempt=attempt,
        )
    except EngineUnavailable as exc:
        settings = get_settings()
        if self.request.retries < settings.stage_max_retries:
            countdown = settings.stage_retry_backoff_s * (2**self.request.retries) * (0.5 + random.random())
            raise self.retry(exc=exc, countdown=countdown, max_retries=settings.stage_max_retries) from exc
        verdict = Verdict(preference=None, error=f"{name}: {exc} (after {attempt} attempts)", attempt=attempt)
    except (EngineError, NoVerdict) as exc:
        verdict = Verdict(preference=None, error=f"{name}: {exc}", attempt=attempt)
    if verdict.error:
        log.warning("judgment %s failed: %s", judgment_id, verdict.error)
    with session_scope(url) as session:
        evaluations.record_judgment(session, judgment_id, verdict)
    return verdict.preference
