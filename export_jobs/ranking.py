"""Does a quantized encoder rank neighbours as its fp32 source does? The int8 gate's retrieval check.

Cosine figures say how far each vector moved, not whether search results changed. This check embeds a
retrieval set with the torch source and with the ONNX variant, takes each query's top 10 of the corpus
under both, and compares the lists:

- overlap@10: the share of the source's top 10 that the variant's top 10 holds (mean over queries);
- top-1: how often both put the same sentence first;
- nDCG@10: the variant's top 10 scored with the source's cosines as gains (1.0: the same list, or one
  whose swaps are between near-ties);
- worst rank: the source's rank (0-based) of the lowest neighbour the variant put in a top 10.

The set: 1,100 English sentences of the Python language reference (`pydoc_data.topics`, PSF licence),
the first 100 the queries, the other 1,000 the corpus (export_jobs/data/retrieval_set.txt). The variant
embeds the corpus in batches of 32 and the queries one at a time, as a server sees them: a dynamically
quantized graph scales its activations per batch, so both kinds of batch are part of what is checked.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inference.encoder import l2_normalize

from . import validate

SET_PATH = Path(__file__).with_name("data") / "retrieval_set.txt"
QUERIES, CORPUS, K = 100, 1000, 10


@dataclasses.dataclass(frozen=True)
class RankingGate:
    min_overlap: float = 0.85
    min_top1: float = 0.8
    min_ndcg: float = 0.99


class RankingError(validate.ExportError):
    """The variant orders a retrieval set's neighbours too differently from its fp32 source."""

    def __init__(self, figures: dict[str, Any], gate: RankingGate):
        super().__init__(f"retrieval ranking against fp32: overlap@{K} {figures['overlap']:.3f} (gate "
                         f"{gate.min_overlap}), top-1 {figures['top1']:.2f} (gate {gate.min_top1}), nDCG@{K} "
                         f"{figures['ndcg']:.4f} (gate {gate.min_ndcg})")
        self.figures = figures


def retrieval_set() -> tuple[list[str], list[str]]:
    lines = [line for line in SET_PATH.read_text(encoding="utf-8").splitlines() if line]
    return lines[:QUERIES], lines[QUERIES:QUERIES + CORPUS]


def ranking_figures(ref_queries: np.ndarray, ref_corpus: np.ndarray, queries: np.ndarray,
                    corpus: np.ndarray, k: int = K) -> dict[str, Any]:
    """Compare the top-k neighbours (cosine) of each query under the reference and the variant."""
    def cosines(q: np.ndarray, c: np.ndarray) -> np.ndarray:
        return l2_normalize(np.asarray(q, np.float64)) @ l2_normalize(np.asarray(c, np.float64)).T

    ref_scores, scores = cosines(ref_queries, ref_corpus), cosines(queries, corpus)
    ref_order = np.argsort(-ref_scores, axis=1, kind="stable")
    ref_top = ref_order[:, :k]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, top)])
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = (np.take_along_axis(ref_scores, ref_top, 1) * discount).sum(1)
    got = (np.take_along_axis(ref_scores, top, 1) * discount).sum(1)
    ref_rank = np.argsort(ref_order, axis=1)  # each corpus sentence's place in the source's order
    return {"queries": int(len(ref_queries)), "corpus": int(len(ref_corpus)), "k": k,
            "overlap": round(float(overlap), 4), "top1": round(float(np.mean(top[:, 0] == ref_top[:, 0])), 4),
            "ndcg": round(float(np.mean(got / ideal)), 5),
            "worst_rank": int(np.take_along_axis(ref_rank, top, 1).max())}


GATE = RankingGate()  # all-MiniLM-L6-v2 int8: overlap 0.91, top-1 0.90, nDCG 0.9975


def check_ranking(reference: Callable[[list[str], int], np.ndarray],
                  variant: Callable[[list[str], int], np.ndarray],
                  gate: RankingGate | None = None) -> dict[str, Any]:
    """``reference``/``variant``: (texts, batch size) -> one vector per text. Raises RankingError below
    ``gate`` (default GATE); returns the figures (recorded in the manifest with the gate)."""
    gate = gate or GATE
    queries, corpus = retrieval_set()
    figures = ranking_figures(reference(queries, 32), reference(corpus, 32), variant(queries, 1),
                              variant(corpus, 32))
    figures["gate"] = dataclasses.asdict(gate)
    if not (figures["overlap"] >= gate.min_overlap and figures["top1"] >= gate.min_top1
            and figures["ndcg"] >= gate.min_ndcg):
        raise RankingError(figures, gate)
    return figures
