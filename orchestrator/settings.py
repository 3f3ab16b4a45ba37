"""One settings object for the whole service, read from the environment (and `.env`)."""

from __future__ import annotations

import builtins
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PROJECT_ROOT", "FaultSpec", "Settings", "get_settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class FaultSpec(BaseModel):
    """Injected engine faults for one model; tests only, never reachable from recipes or the API."""

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # With probability hang_rate a request sleeps hang_seconds before answering (a hung engine).
    hang_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    hang_seconds: float = Field(default=0.0, ge=0.0)
    # The rates draw from a generator seeded with this, so a spec injects the same number of faults,
    # in the same order of requests, on every run: a test that needs some faults always gets them.
    seed: int = 0
    # A start that sleeps this long first (a hung load).
    load_hang_seconds: float = Field(default=0.0, ge=0.0)
    # A built-in exception type (e.g. "KeyError") raised at start or at every request: an error of a
    # kind no part of the service expects.
    load_exception: str | None = None
    generate_exception: str | None = None
    # A streamed answer that fails (transient) after this many deltas: an engine dying mid-answer.
    stream_break_after: int | None = Field(default=None, ge=0)

    @field_validator("load_exception", "generate_exception")
    @classmethod
    def _builtin_exception(cls, value: str | None) -> str | None:
        if value is not None:
            found = getattr(builtins, value, None)
            if not (isinstance(found, type) and issubclass(found, Exception)):
                raise ValueError(f"{value!r} is not a built-in exception type")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Empty means "embedded": `slimmoa run` then uses ./slimmoa.db and a private Redis.
    database_url: str = ""
    redis_url: str = ""

    recipes_dir: Path = PROJECT_ROOT / "recipes"
    model_cache_dir: Path = Field(default=Path.home() / ".cache" / "slimmoa" / "models")

    queue_control: str = "slimmoa.control"
    queue_inference: str = "slimmoa.inference"

    # Redis redelivers an unacked task after this many seconds; it must exceed the longest stage.
    visibility_timeout_s: int = 6 * 3600
    # Chord counters live as long as results: a backlog longer than this would never fire its callback.
    result_expires_s: int = 7 * 24 * 3600
    # Transient engine errors are retried this many times before the stage records its failure.
    stage_max_retries: int = 3
    stage_retry_backoff_s: float = 2.0
    # A request that has not finished after this long is treated as a hung engine.
    engine_request_timeout_s: float = 600.0
    # Time limits on an engine's start (a cold load), wake, sleep and close: past them the attempt
    # is a transient failure and the host's load lock is free for other models again.
    engine_start_timeout_s: float = Field(default=900.0, gt=0)
    engine_wake_timeout_s: float = Field(default=120.0, gt=0)
    engine_sleep_timeout_s: float = Field(default=120.0, gt=0)
    engine_close_timeout_s: float = Field(default=120.0, gt=0)
    # A model whose load failed permanently (a broken folder, a bad config) is not loaded again for
    # this long: its stages fail at once with the loader's message instead of each waiting for a load.
    load_failure_ttl_s: float = Field(default=600.0, ge=0)
    # Stage tasks ride out a database restart for this long (retried in the task, so that the task's
    # own retries count engine attempts only); past it the recovery sweep re-sends the stage.
    database_retry_s: float = Field(default=300.0, ge=0)
    # Sequences a vLLM engine batches at once (its `max_num_seqs`; vLLM's own default): the most
    # requests it admits, beyond which they wait in its queue.
    engine_max_num_seqs: int = Field(default=128, gt=0)
    # Threads of an inference worker for bulk stages: the generations it has in flight. Empty: as many
    # as an engine batches (ENGINE_MAX_NUM_SEQS), so that a job offers each engine a full batch.
    inference_concurrency: int | None = Field(default=None, gt=0)
    # More threads, which only chat stages take (opened while a chat request's stage waits or runs):
    # a request's proposers start at once although bulk stages hold the others.
    chat_reserve: int = Field(default=4, ge=0)
    # Memory an inference worker may fill with resident models, GB (device memory on a GPU, RAM on a
    # CPU); empty: no budget, every model stays loaded. `slimmoa worker --memory-gb` sets it.
    worker_memory_gb: float | None = Field(default=None, gt=0)
    # How often an inference worker looks at its models' queues to choose which ones to consume.
    affinity_interval_s: float = Field(default=0.5, gt=0)
    # The models an inference worker serves: comma-separated names, globs (`llama-*`) or recipe names
    # (their models); empty: every model. `slimmoa worker --models` sets it.
    worker_models: str = ""
    # Celery task events (received, started, succeeded...) from every worker: what Flower shows.
    task_events: bool = True
    # `json`: one JSON object a line, with the job, item, layer, slot and model of stage work.
    log_format: Literal["text", "json"] = "text"
    # Port of a worker's Prometheus /metrics (0: not served).
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"

    # `slimmoa run`, `status --watch` and `eval` give up when nothing has moved for this long while
    # work is due and no live worker consumes its queue.
    stall_timeout_s: float = Field(default=300.0, gt=0)

    # The recovery sweep leaves items alone that had a dispatch or a candidate this recently.
    recovery_grace_s: float = 120.0
    # How often a worker started with --beat runs the sweep.
    recovery_interval_s: float = 300.0

    # Evaluation. The reference outputs AlpacaEval 2.0 compares against (GPT-4-Turbo's), as JSONL or a
    # JSON list of {instruction, output, generator}; `slimmoa eval --reference` overrides it.
    eval_reference: Path = PROJECT_ROOT.parent / "shared" / "data" / "alpaca_eval_gpt4_turbo_reference.jsonl"
    # The judge when `--judge` is not given: AlpacaEval 2.0's official one, GPT-4-Turbo over the OpenAI API.
    eval_judge: str = "https://api.openai.com/v1"
    eval_judge_model: str = "gpt-4-1106-preview"
    eval_judge_key_env: str = "OPENAI_API_KEY"
    # Optional CSV `index,instruction_difficulty` keyed by the reference file's row (AlpacaEval publishes
    # one for its 805 instructions); without it the length-controlled GLM leaves that term out.
    eval_instruction_difficulty: Path | None = None

    slimmoa_faults: dict[str, FaultSpec] = Field(default_factory=dict)

    # HTTP API. With a token set, every /v1 route needs `Authorization: Bearer <token>`.
    api_token: str = Field(default="", validation_alias=AliasChoices("SLIMMOA_API_TOKEN", "api_token"))
    # Largest request body accepted (413 above): 10,000 prompts of a few KB fit comfortably.
    max_request_bytes: int = 64 * 1024 * 1024
    max_items_per_job: int = 100_000
    page_size_default: int = 50
    page_size_max: int = 1000

    @property
    def stage_threads(self) -> int:
        """Bulk stage threads of an inference worker: INFERENCE_CONCURRENCY, else an engine's batch."""
        return self.inference_concurrency or self.engine_max_num_seqs

    def database_url_or_embedded(self) -> str:
        """DATABASE_URL, or the embedded ./slimmoa.db that the all-in-one commands use without one."""
        return self.database_url or f"sqlite:///{Path('slimmoa.db').resolve()}"

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        # Plain postgres URLs mean psycopg 3, the driver this project installs.
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
