"""Embedding deployment: one ONNX Runtime session per replica and the batcher that decides its batches
(``serve_app.backends.embedding.EmbeddingModel``). The ingress sends prepared requests, one or merged."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import ray
from ray import serve

from ..backends.embedding import EmbeddingModel
from .metrics import RayMetrics


@serve.deployment(name="Embedder")
class Embedder:
    def __init__(self, entry: dict[str, Any], root: str, truncate: bool = False, threads: int | None = None,
                 cuda_graphs: bool = True, gemm_auto_tune: bool = True):
        self.model = EmbeddingModel(entry, root, truncate=truncate, use_gpu=bool(ray.get_gpu_ids()),
                                    threads=threads, cuda_graphs=cuda_graphs, gemm_auto_tune=gemm_auto_tune)
        self.model.observe(RayMetrics())  # batch sizes and queue waits, tagged with the model

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings change at run time (``serve deploy`` with a new user_config, no restart)."""
        self.model.configure(user_config)

    async def embed_many(self, requests: list[Sequence[Any]]) -> list[np.ndarray]:
        """Prepared requests (``EmbeddingModel.prepare``, run by the ingress): one array of vectors each."""
        return await self.model.embed_many(requests)

    def batch_stats(self) -> list[int]:
        """Requests per executed session run, most recent last (for tests and tuning)."""
        return list(self.model.sizes)

    def info(self) -> dict[str, Any]:
        """The model's id, dimension and token limit, and the GPU ids Ray gave this replica (its placement)."""
        return {**self.model.info(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def check_health(self) -> None:
        """Ray calls this periodically; a replica whose session no longer runs is replaced."""
        self.model.check()
