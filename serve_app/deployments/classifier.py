"""Rerank / classify deployment: one ONNX Runtime session per replica and the batcher that decides its batches
(``serve_app.backends.classifier.ClassifierModel``). The ingress sends prepared requests, one or merged."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import ray
from ray import serve

from ..backends.classifier import ClassifierModel
from .metrics import RayMetrics


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, entry: dict[str, Any], root: str, truncate: bool = True, threads: int | None = None):
        self.model = ClassifierModel(entry, root, truncate=truncate, use_gpu=bool(ray.get_gpu_ids()),
                                     threads=threads)
        self.model.observe(RayMetrics())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.model.configure(user_config)

    async def logits_many(self, requests: list[Sequence[Any]]) -> list[np.ndarray]:
        """Prepared requests (tokenized by the ingress): one logits array each."""
        return await self.model.logits_many(requests)

    def batch_stats(self) -> list[int]:
        return list(self.model.sizes)

    def info(self) -> dict[str, Any]:
        return self.model.info()

    def check_health(self) -> None:
        self.model.check()
