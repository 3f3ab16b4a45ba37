"""Top-p (nucleus) sampling for vLLM's CPU engine without sorting the whole vocabulary.

vLLM's CPU sampler applies top-p by sorting every row's full vocabulary (49,152 tokens for SmolLM2)
whenever any request in the step asks for top-p, including the rows that do not (top_p 1.0, the
aggregator's): on this project's 2-core machine the sort was two fifths of the engine's time
(`bench/cpu_sampling.py`: 1.67x the tokens/s without it). The nucleus is almost
always among a row's few hundred likeliest tokens, so `nucleus_logits` finds it with `topk` and
falls back to the sort only for a row whose candidates do not reach `p`. The mask is the same set of
tokens (those whose likelier tokens hold less than `p` of the mass), except that a token tied with
the last one kept is kept too.

The engine's worker process loads `NucleusCPUWorker` by its dotted path (`worker_cls`); it installs
the function in vLLM's sampler module before the model runner is built.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.ops import topk_topp_sampler
from vllm.v1.worker.cpu_worker import CPUWorker

__all__ = ["CANDIDATES", "NucleusCPUWorker", "nucleus_logits"]

# Candidates looked at before the full sort, in rounds: most rows' nuclei lie in the first.
CANDIDATES = (128, 2048)


def nucleus_logits(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """`apply_top_k_top_p` for top-p alone: logits outside each row's nucleus set to -inf, in place.

    Rows with top_p 1.0 are left alone; top-k (unused by the recipes) goes to vLLM's own function."""
    if k is not None or p is None:
        return topk_topp_sampler.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)
    rows = torch.nonzero(p < 1).flatten()
    if rows.numel() == 0:
        return logits
    # Every row at top-p (a step of proposers only): work on the logits themselves, not a copy.
    whole = rows.numel() == logits.shape[0]
    part = logits if whole else logits.index_select(0, rows)
    part_p = p.index_select(0, rows).to(torch.float32)
    probs = part.softmax(dim=-1, dtype=torch.float32)
    pending = torch.arange(rows.numel())
    for count in CANDIDATES:
        if pending.numel() == 0:
            break
        count = min(count, probs.shape[-1])
        top = probs.index_select(0, pending).topk(count, dim=-1).values
        # A candidate is kept when the likelier candidates hold less than p of the mass.
        before = top.cumsum(dim=-1) - top
        wanted = part_p.index_select(0, pending).unsqueeze(1)
        inside = before < wanted
        # Found when the last candidate is not needed, i.e. the candidates reach p.
        found = ~inside[:, -1] | (count == probs.shape[-1])
        done = pending[found]
        if done.numel():
            last = inside[found].sum(dim=-1, keepdim=True) - 1
            threshold = top[found].gather(1, last)
            part[done] = part[done].masked_fill(probs[done] < threshold, -float("inf"))
        pending = pending[~found]
    if pending.numel():
        part[pending] = topk_topp_sampler.apply_top_k_top_p_pytorch(
            part[pending], None, part_p[pending], allow_cpu_sync=True
        )
    if not whole:
        logits[rows] = part
    return logits


class NucleusCPUWorker(CPUWorker):  # type: ignore[misc]
    """vLLM's CPU worker with `nucleus_logits` as its sampler's top-p."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        topk_topp_sampler.apply_top_k_top_p = nucleus_logits
        super().__init__(*args, **kwargs)
