"""A decoder and the threads its steps run on, without Ray Serve around it.

The Generator deployment wraps one ``GenerationModel``; tests call one in-process (it is a
``GenerationBackend``). Each request is checked (chat template, tokens against the context) before any decoding
starts, then streamed in items of ``stream_interval_s`` (``inference.textgen.TextGenerator.steps``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, AsyncIterator

from contract import manifest
from inference.textgen import Delta, Prepared, TextGenerator

from .base import GenerationCall

_DONE = object()


class GenerationModel:
    def __init__(self, entry: dict[str, Any] | manifest.ManifestEntry, root: str, *, use_gpu: bool = False,
                 threads: int | None = None, continuous: bool = False, stream_interval_s: float = 0.0,
                 gemm_auto_tune: bool = True):
        parsed = manifest.ManifestEntry.model_validate(entry)
        manifest.verify(root, parsed)
        self.model_id = parsed.id
        self.runtime = TextGenerator(parsed, root, use_gpu=use_gpu, threads=threads or 1,
                                     continuous=continuous, stream_interval_s=stream_interval_s,
                                     gemm_auto_tune=gemm_auto_tune)
        # Each stream's next step runs in this pool. With continuous batching a stream's thread only waits for the
        # batcher's next step, so there is one thread per row (a pool of cpus + 4 would cap the batch there).
        batcher = self.runtime.batcher
        self._steps_pool = concurrent.futures.ThreadPoolExecutor(
            batcher.rows + 4 if batcher is not None else None, thread_name_prefix="stream")
        self.active_streams = 0
        self.tokens = self.runtime.tokens
        self.metrics = None

    def observe(self, metrics) -> None:
        """Time to first token and per output token go to ``metrics`` (the deployment or ingress holding this
        model)."""
        self.metrics = metrics

    def prepare(self, call: GenerationCall) -> Prepared:
        """Check a request against the model (raises a 4xx-mapped error) before any decoding starts."""
        prompts, special = list(call.prompts or ()), None
        if call.messages is not None:
            prompts = [self.runtime.render_chat(list(call.messages))]
            special = False  # the template already holds BOS
        return self.runtime.prepare(prompts, max_tokens=call.max_tokens, temperature=call.temperature,
                                    top_p=call.top_p, top_k=call.top_k, seed=call.seed, stop=list(call.stop),
                                    add_special_tokens=special, truncate=call.truncate)

    async def stream(self, call: GenerationCall) -> tuple[int, AsyncIterator[list[Delta]]]:
        prepared = self.prepare(call)
        return prepared.prompt_tokens, self._deltas(prepared)

    async def _deltas(self, prepared: Prepared) -> AsyncIterator[list[Delta]]:
        """Each item of `runtime.steps` (the first token, then a stream interval's tokens) is awaited from a
        thread; a cancelled caller stops the loop."""
        steps = self.runtime.steps(prepared)
        self.active_streams += 1
        running, start, first, last, tokens = None, time.perf_counter(), None, None, 0
        try:
            while True:
                running = self._steps_pool.submit(next, steps, _DONE)
                if (deltas := await asyncio.wrap_future(running)) is _DONE:
                    break
                if deltas:
                    last, tokens = time.perf_counter(), tokens + sum(d.tokens for d in deltas)
                    first = first or last
                    yield deltas
            if self.metrics is not None and first is not None:
                per_token = (last - first) / (tokens - 1) if tokens > 1 else None
                self.metrics.generation(self.model_id, first - start, per_token)
        finally:
            self.active_streams -= 1
            # A cancelled caller can leave a step running in its thread: close the steps once it returns (a
            # generator cannot be closed while it runs), which frees its KV bucket or batcher rows.
            if running is not None and not running.done():
                running.add_done_callback(lambda _: steps.close())
            else:
                steps.close()

    async def complete(self, call: GenerationCall) -> dict[str, Any]:
        prepared = self.prepare(call)
        texts = [""] * len(prepared.prompts)
        reasons: list[str | None] = [None] * len(prepared.prompts)
        tokens = 0
        async for deltas in self._deltas(prepared):
            for d in deltas:
                texts[d.index] += d.text
                reasons[d.index] = d.finish_reason or reasons[d.index]
                tokens += d.tokens
        return {"texts": texts, "finish_reasons": reasons, "prompt_tokens": prepared.prompt_tokens,
                "completion_tokens": tokens}

    async def ready(self) -> bool:
        return True  # loaded in __init__

    def info(self) -> dict[str, Any]:
        batcher = self.runtime.batcher
        return {"id": self.model_id, "context": self.runtime.context, "active_streams": self.active_streams,
                "decode_steps": self.runtime.decode_steps,
                "batched_steps": batcher.steps_run if batcher is not None else None,
                "batched_rows": batcher.active_rows if batcher is not None else None,
                # rows the steps ran (each over the smallest prefix holding the active rows), prefill calls
                "batched_rows_decoded": batcher.rows_decoded if batcher is not None else None,
                "batched_prefills": batcher.prefills_run if batcher is not None else None,
                "batched_prefill_s": round(batcher.prefill_seconds, 4) if batcher is not None else None}

    def check(self) -> None:
        if self.runtime.session is None:
            raise RuntimeError("session not loaded")
