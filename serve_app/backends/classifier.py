"""A sequence-classifier session (task rerank or classify) and the batcher that decides its batches, without Ray
Serve around it: the Classifier deployment wraps one ``ClassifierModel``; tests hold one in-process.

Requests are prepared (tokenized, pairs truncated or refused) before they join a batch, so a bad request fails
alone. A run takes the waiting requests' rows sorted by length, cut at ``max_tokens_per_run`` padded tokens.
The model returns logits; the route turns them into scores (``inference.classifier.sigmoid`` / ``softmax``).
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Sequence

import numpy as np

from contract import manifest
from inference.classifier import ClassifierSession
from inference.encoder import Prepared
from inference.ort import encoder_threads

from ..batching import GreedyBatcher, rows_per_request

MAX_TOKENS_PER_RUN = 8192

Request = Sequence[Prepared]


class ClassifierModel:
    def __init__(self, entry: dict[str, Any] | manifest.ManifestEntry, root: str, *, truncate: bool = True,
                 use_gpu: bool = False, threads: int | None = None):
        parsed = manifest.ManifestEntry.model_validate(entry)
        manifest.verify(root, parsed)  # never serve files that differ from what passed the gate
        self.session = ClassifierSession(parsed, root, truncate=truncate, use_gpu=use_gpu,
                                         threads=encoder_threads(threads, use_gpu))
        self.model_id, self.task, self.labels = parsed.id, parsed.task, self.session.labels
        self.max_tokens = MAX_TOKENS_PER_RUN
        self.batcher = GreedyBatcher(self._run_batch, max_batch_size=32, weight=len)
        self.batcher.name = parsed.id
        self.sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # requests per run

    def observe(self, metrics) -> None:
        """Batch sizes and queue waits go to ``metrics`` (the deployment or ingress holding this model)."""
        self.batcher.metrics = metrics

    def configure(self, user_config: dict[str, Any]) -> None:
        self.batcher.configure(user_config)
        self.max_tokens = int(user_config.get("max_tokens_per_run", self.max_tokens))

    def prepare_pairs(self, query: str, documents: list[str]) -> list[Prepared]:
        return self.session.preparer.pairs(query, documents)

    def prepare_texts(self, texts: list[str]) -> list[Prepared]:
        return self.session.preparer.prepare(texts)

    async def logits(self, items: Request) -> np.ndarray:
        return (await self.batcher.submit([items]))[0]

    async def logits_many(self, requests: list[Request]) -> list[np.ndarray]:
        return await self.batcher.submit_groups(requests)

    async def _run_batch(self, groups: list[list[Request]]) -> list[list[np.ndarray]]:
        requests = [request for group in groups for request in group]
        self.sizes.append(len(requests))
        rows = [item for request in requests for item in request]
        logits = await asyncio.to_thread(self.session.run_sorted, rows, self.max_tokens)
        return rows_per_request(logits, groups)

    async def ready(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "task": self.task, "labels": list(self.labels)}

    def check(self) -> None:
        out = self.session.run(self.session.preparer.prepare([("ok", "ok")] if self.session.pairs else ["ok"]))
        if out.shape != (1, len(self.labels)) or not np.isfinite(out).all():
            raise RuntimeError("the ONNX session returned invalid logits")
