"""Embedding deployment: one ONNX Runtime session per replica, dynamic batching of small requests.

Each request is tokenized and checked before it joins a batch, so a bad request fails alone. Batches are
greedy (serve_app.batching): a lone request runs at once; requests that arrive while the session runs
go together in the next run. `EmbeddingModel` is the session and its batcher without Ray Serve around
it: the Embedder deployment wraps one, and an ingress with `server.embed_in_ingress` holds its own.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np
import ray
from ray import serve

from contract import manifest
from inference.encoder import EncoderSession, Prepared
from inference.ort import providers

from ..batching import GreedyBatcher

MAX_ROWS_PER_RUN = 64


class EmbeddingModel:
    def __init__(self, entry: dict[str, Any], root: str, truncate: bool = False, num_cpus: float = 1.0,
                 cuda_graphs: bool = True, gemm_auto_tune: bool = True):
        parsed = manifest.ManifestEntry.model_validate(entry)
        manifest.verify(root, parsed)  # never serve files that differ from what passed the gate
        use_gpu, threads = bool(ray.get_gpu_ids()), int(max(1, num_cpus))
        if parsed.input_kind == "text":  # tokenizer inside the graph (TensorFlow string ops)
            from inference.string_encoder import TextInputEncoder

            self.session = TextInputEncoder(parsed.model_path(root), providers(use_gpu), threads)
        else:
            self.session = EncoderSession(parsed, root, truncate=truncate, use_gpu=use_gpu, threads=threads,
                                          cuda_graphs=cuda_graphs, gemm_auto_tune=gemm_auto_tune)
        self.model_id = parsed.id
        self.max_rows = MAX_ROWS_PER_RUN
        self.batcher = GreedyBatcher(self._run_batch, max_batch_size=32, weight=len)  # requests per group
        self.sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # requests per run

    def configure(self, user_config: dict[str, Any]) -> None:
        if "max_batch_size" in user_config:
            self.batcher.max_batch_size = int(user_config["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            self.batcher.wait_s = float(user_config["batch_wait_timeout_s"])
        self.max_rows = int(user_config.get("max_rows_per_run", self.max_rows))
        graphs = getattr(self.session, "graphs", None)
        if graphs is not None and "inline_run_tokens" in user_config:
            graphs.inline_tokens = int(user_config["inline_run_tokens"])

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        prepared = self.session.prepare(texts)  # raises InputTooLong before batching
        return await self.embed_prepared(prepared)

    async def embed_prepared(self, prepared: list[Prepared]) -> tuple[np.ndarray, int]:
        """One request the ingress has already tokenized and checked (``TextPreparer``)."""
        vectors = (await self.batcher.submit([prepared]))[0]
        return vectors, sum(p.tokens for p in prepared)

    async def embed_many(self, requests: list[list[str]]) -> list[tuple[np.ndarray, int] | Exception]:
        """Several requests in one call (an ingress batches its own): each gets its vectors or its own error."""
        prepared: list[list[Prepared] | Exception] = []
        for texts in requests:
            try:
                prepared.append(self.session.prepare(texts))
            except Exception as exc:  # noqa: BLE001 - this request's own error (InputTooLong)
                prepared.append(exc)
        return await self.embed_prepared_many(prepared)

    async def embed_prepared_many(self, requests: list[list[Prepared] | Exception]
                                  ) -> list[tuple[np.ndarray, int] | Exception]:
        """Tokenized requests merged by an ingress. They join the batcher as one item: one future and one
        wake-up per call, not per request (this replica's one event loop serves every ingress)."""
        valid = [r for r in requests if not isinstance(r, Exception)]
        try:
            vectors = iter(await self.batcher.submit(valid) if valid else [])
        except Exception as exc:  # noqa: BLE001 - the run failed: every request in it gets the error
            return [r if isinstance(r, Exception) else exc for r in requests]
        return [r if isinstance(r, Exception) else (next(vectors), sum(p.tokens for p in r)) for r in requests]

    async def _run_batch(self, groups: list[list[list[Prepared]]]) -> list[list[np.ndarray]]:
        """Each batcher item is a group of requests (one, or an ingress's merged call); returns, per group, one
        array of vectors per request."""
        requests = [request for group in groups for request in group]
        self.sizes.append(len(requests))
        rows = [item for request in requests for item in request]
        if len(requests) == 1 and self.session.quick(rows):
            # A lone request (nothing else was queued) on a small captured graph: a 0.3 ms replay costs less
            # here than the hop to a thread and back. Under load the thread stays, so tokenizing and
            # (de)serializing the next requests overlaps the GPU run.
            vectors = self.session.run_sorted(rows, self.max_rows)
        else:
            vectors = await asyncio.to_thread(self.session.run_sorted, rows, self.max_rows)
        bounds = np.cumsum([0] + [len(r) for r in requests])
        per_request = iter(vectors[bounds[i] : bounds[i + 1]] for i in range(len(requests)))
        return [[next(per_request) for _ in group] for group in groups]

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "dim": self.session.dim, "max_length": self.session.max_length}

    def check(self) -> None:
        """Raises if the session no longer returns a finite embedding of the right size."""
        out = self.session.run(self.session.prepare(["ok"]))
        if out.shape != (1, self.session.dim) or not np.isfinite(out).all():
            raise RuntimeError("the ONNX session returned an invalid embedding")


@serve.deployment(name="Embedder")
class Embedder:
    def __init__(self, entry: dict[str, Any], root: str, truncate: bool = False, num_cpus: float = 1.0,
                 cuda_graphs: bool = True, gemm_auto_tune: bool = True):
        self.model = EmbeddingModel(entry, root, truncate, num_cpus, cuda_graphs, gemm_auto_tune)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings change at run time (``serve deploy`` with a new user_config, no restart)."""
        self.model.configure(user_config)

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return await self.model.embed(texts)

    async def embed_many(self, requests: list[list[str]]) -> list[tuple[np.ndarray, int] | Exception]:
        return await self.model.embed_many(requests)

    async def embed_prepared(self, prepared: list[Prepared]) -> tuple[np.ndarray, int]:
        return await self.model.embed_prepared(prepared)

    async def embed_prepared_many(self, requests: list[list[Prepared]]) -> list[tuple[np.ndarray, int] | Exception]:
        return await self.model.embed_prepared_many(requests)

    def batch_stats(self) -> list[int]:
        """Requests per executed session run, most recent last (for tests and tuning)."""
        return list(self.model.sizes)

    def info(self) -> dict[str, Any]:
        return self.model.info()

    def check_health(self) -> None:
        """Ray calls this periodically; a replica whose session no longer runs is replaced."""
        self.model.check()
