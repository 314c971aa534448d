"""export_jobs.ranking: the int8 gate's retrieval check, on vectors whose neighbour order is known."""
from __future__ import annotations

import numpy as np
import pytest

from export_jobs import ranking


def _vectors(seed: int, rows: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, dim))


def test_the_same_vectors_rank_the_same():
    queries, corpus = _vectors(0, 20), _vectors(1, 200)
    figures = ranking.ranking_figures(queries, corpus, queries * 3.0, corpus)  # scale does not change cosine
    assert figures["overlap"] == 1.0 and figures["top1"] == 1.0 and figures["ndcg"] == pytest.approx(1.0)
    assert figures["worst_rank"] == ranking.K - 1


def test_small_noise_keeps_most_neighbours_and_large_noise_loses_them():
    queries, corpus = _vectors(0, 50), _vectors(1, 500)
    noise = _vectors(2, 500)
    close = ranking.ranking_figures(queries, corpus, queries, corpus + 0.02 * noise)
    far = ranking.ranking_figures(queries, corpus, queries, corpus + 2.0 * noise)
    assert close["overlap"] > 0.85 and close["ndcg"] > 0.999
    assert far["overlap"] < 0.5 and far["top1"] < 0.5 and far["worst_rank"] > 100


def test_a_variant_that_reorders_fails_the_gate_with_its_figures():
    queries, corpus = ranking.retrieval_set()
    assert (len(queries), len(corpus)) == (ranking.QUERIES, ranking.CORPUS)
    assert not set(queries) & set(corpus)

    def reference(texts, batch):  # a deterministic "embedding" per text
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts])

    def shuffled(texts, batch):  # every text gets another text's vector
        return reference(texts[::-1], batch)

    assert ranking.check_ranking(reference, reference)["overlap"] == 1.0
    with pytest.raises(ranking.RankingError) as info:
        ranking.check_ranking(reference, shuffled)
    assert info.value.figures["overlap"] < 0.85 and "overlap@10" in str(info.value)
