"""An embedding session and the batcher that decides its batches, without Ray Serve around it.

The Embedder deployment wraps one ``EmbeddingModel``; an ingress with ``server.embed_in_ingress`` holds its
own and calls it in-process (it is an ``EmbeddingBackend``). Requests are prepared (tokenized and checked)
before they join a batch, so a bad request fails alone. Batches are greedy (serve_app.batching): a lone request
runs at once; requests that arrive while the session runs go together in the next run, at most
``max_batch_size`` requests a run. This batcher is the one that decides session batches: an ingress only
merges waiting requests into one call (``remote.RemoteEmbedding``).
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Sequence

import numpy as np

from contract import manifest
from inference.encoder import EncoderSession
from inference.ort import encoder_threads, providers

from ..batching import GreedyBatcher, rows_per_request

MAX_ROWS_PER_RUN = 64

Request = Sequence[Any]  # one request's prepared items (inference.encoder.Prepared or string_encoder.TextItem)


class EmbeddingModel:
    def __init__(self, entry: dict[str, Any] | manifest.ManifestEntry, root: str, *, truncate: bool = False,
                 use_gpu: bool = False, threads: int | None = None, cuda_graphs: bool = True, gemm_auto_tune: bool = True):
        parsed = manifest.ManifestEntry.model_validate(entry)
        manifest.verify(root, parsed)  # never serve files that differ from what passed the gate
        threads = encoder_threads(threads, use_gpu)
        if parsed.input_kind == "text":  # tokenizer inside the graph (TensorFlow string ops)
            from inference.string_encoder import TextInputEncoder

            self.session = TextInputEncoder(parsed.model_path(root), providers(use_gpu), threads, parsed.id)
        else:
            self.session = EncoderSession(parsed, root, truncate=truncate, use_gpu=use_gpu, threads=threads,
                                          cuda_graphs=cuda_graphs, gemm_auto_tune=gemm_auto_tune)
        self.model_id = parsed.id
        self.preparer = self.session.preparer  # prepare, prepare_ids, tokenize, detokenize (in this process)
        self.max_rows = MAX_ROWS_PER_RUN
        # an item is a group of requests (one request, or part of an ingress's merged call): weight = requests
        self.batcher = GreedyBatcher(self._run_batch, max_batch_size=32, weight=len)
        self.batcher.name = parsed.id
        self.sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # requests per run

    def observe(self, metrics) -> None:
        """Batch sizes and queue waits go to ``metrics`` (the deployment or ingress holding this model)."""
        self.batcher.metrics = metrics

    def configure(self, user_config: dict[str, Any]) -> None:
        """Batch settings (``user_config``: ``Embedder.reconfigure`` applies them at run time)."""
        self.batcher.configure(user_config)
        self.max_rows = int(user_config.get("max_rows_per_run", self.max_rows))
        graphs = getattr(self.session, "graphs", None)
        if graphs is not None and "inline_run_tokens" in user_config:
            graphs.inline_tokens = int(user_config["inline_run_tokens"])

    def prepare(self, texts: list[str]) -> list[Any]:
        """Tokenize and check (raises InputTooLong); string-input graphs take the texts as they are."""
        return self.preparer.prepare(texts)

    async def embed(self, items: Request) -> np.ndarray:
        """One prepared request."""
        return (await self.batcher.submit([items]))[0]

    async def embed_many(self, requests: list[Request]) -> list[np.ndarray]:
        """Prepared requests merged by an ingress, one array of vectors each. They join the batcher as one item
        (one future and one wake-up per call, not per request: this replica's one event loop serves every
        ingress), or as several when the call holds more than ``max_batch_size`` requests."""
        return await self.batcher.submit_groups(requests)

    async def _run_batch(self, groups: list[list[Request]]) -> list[list[np.ndarray]]:
        """Returns, per group, one array of vectors per request."""
        requests = [request for group in groups for request in group]
        self.sizes.append(len(requests))
        rows = [item for request in requests for item in request]
        if len(requests) == 1 and self.session.quick(rows):
            # A lone request (nothing else was queued) on a small captured graph: a sub-millisecond replay costs less
            # here than the hop to a thread and back. Under load the thread stays, so tokenizing and
            # (de)serializing the next requests overlaps the GPU run.
            vectors = self.session.run_sorted(rows, self.max_rows)
        else:
            vectors = await asyncio.to_thread(self.session.run_sorted, rows, self.max_rows)
        return rows_per_request(vectors, groups)

    async def ready(self) -> bool:
        return True  # loaded in __init__

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "dim": self.session.dim, "max_length": self.session.max_length}

    def check(self) -> None:
        """Raises if the session no longer returns a finite embedding of the right size."""
        out = self.session.run(self.session.prepare(["ok"]))
        if out.shape != (1, self.session.dim) or not np.isfinite(out).all():
            raise RuntimeError("the ONNX session returned an invalid embedding")
