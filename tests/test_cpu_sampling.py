"""The CPU engine's top-p against vLLM's own sort-based top-p, on the vocabulary size of SmolLM2."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from orchestrator.recipes import VllmModel
from workers.engines.vllm_cpu_sampling import CANDIDATES, nucleus_logits
from workers.engines.vllm_engine import CPU_WORKER_CLS, engine_args

VOCABULARY = 49_152


def vllm_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)


def kept(logits: torch.Tensor) -> torch.Tensor:
    return ~torch.isinf(logits)


def mass_before(logits: torch.Tensor) -> torch.Tensor:
    """Per token, the float64 probability mass of the tokens likelier than it."""
    probs = logits.double().softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    return torch.empty_like(probs).scatter_(1, order, ordered.cumsum(dim=-1) - ordered)


def assert_same_nucleus(
    ours: torch.Tensor, theirs: torch.Tensor, logits: torch.Tensor, p: torch.Tensor
) -> None:
    """The same tokens, but for a token whose likelier tokens hold p to float32's rounding (vLLM sums
    the whole vocabulary in float32 from the least likely token, so it decides those differently)."""
    differ = kept(ours) != kept(theirs)
    at_the_edge = (mass_before(logits) - p.double().unsqueeze(1)).abs() < 1e-4
    assert bool((at_the_edge | ~differ).all()), "tokens away from the edge decided differently"
    assert int(differ.sum(dim=-1).max()) <= 1


@pytest.mark.parametrize(
    "scale",
    [
        8.0,  # peaked, as a language model's next token mostly is: nuclei of a few tokens
        3.0,  # flat: nuclei of thousands, beyond the candidates, so the sort decides
        5.0,  # in between: some rows in the first round, some in the second
    ],
)
def test_same_tokens_as_the_sort(scale: float) -> None:
    generator = torch.Generator().manual_seed(int(scale))
    logits = torch.randn(24, VOCABULARY, generator=generator) * scale
    p = torch.tensor([0.95, 0.9, 0.5, 0.99] * 6)
    ours = nucleus_logits(logits.clone(), None, p)
    assert_same_nucleus(ours, vllm_top_p(logits, p), logits, p)
    assert torch.equal(ours[kept(ours)], logits[kept(ours)]), "kept logits are untouched"
    sizes = kept(ours).sum(dim=-1)
    assert bool((sizes >= 1).all())
    if scale == 5.0:
        assert bool((sizes < CANDIDATES[0]).any()) and bool((sizes > CANDIDATES[0]).any())


def test_rows_without_top_p_are_left_alone() -> None:
    """vLLM's sort also masks a top_p 1.0 row's tokens whose probability is 0 in float32; ours leaves
    such a row as it is, which samples the same (those tokens are never drawn)."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(6, VOCABULARY, generator=generator) * 4
    p = torch.tensor([1.0, 0.9, 1.0, 0.9, 1.0, 1.0])
    ours = nucleus_logits(logits.clone(), None, p)
    assert torch.equal(ours[p == 1], logits[p == 1])
    top_p = p < 1
    assert_same_nucleus(ours[top_p], vllm_top_p(logits, p)[top_p], logits[top_p], p[top_p])
    assert bool((kept(ours[p < 1]).sum(dim=-1) < VOCABULARY).all())
    everything = logits.clone()
    assert nucleus_logits(everything, None, torch.ones(6)) is everything
    assert torch.equal(everything, logits)


def test_a_tie_at_the_edge_keeps_both_tokens() -> None:
    logits = torch.full((1, 8), -30.0)
    logits[0, :3] = torch.tensor([2.0, 1.0, 1.0])
    ours = nucleus_logits(logits.clone(), None, torch.tensor([0.6]))
    assert kept(ours)[0].tolist() == [True, True, True, False, False, False, False, False]


def test_top_k_goes_to_vllm() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCABULARY, generator=generator)
    k = torch.tensor([5, 10, 20, 40])
    p = torch.tensor([0.9, 0.9, 1.0, 0.5])
    ours = nucleus_logits(logits.clone(), k, p)
    assert torch.equal(ours, apply_top_k_top_p_pytorch(logits.clone(), k, p))


def test_a_cpu_engine_runs_the_worker_that_installs_it() -> None:
    spec = VllmModel(engine="vllm", weights="embedded:smollm2", context_length=2048)
    assert engine_args("m", spec, "/m", on_cpu=True)["worker_cls"] == CPU_WORKER_CLS
    assert "worker_cls" not in engine_args("m", spec, "/m", on_cpu=False)
