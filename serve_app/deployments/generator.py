"""Generation deployment: one ONNX Runtime decoder session per replica; streams text in chunks (textgen.steps)."""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, AsyncIterator

import ray
from ray import serve

from contract import manifest
from inference.textgen import Delta, Prepared, TextGenerator

_DONE = object()


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, entry: dict[str, Any], root: str, num_cpus: float = 1.0, continuous: bool = False,
                 stream_interval_s: float = 0.0, gemm_auto_tune: bool = True):
        parsed = manifest.ManifestEntry.model_validate(entry)
        manifest.verify(root, parsed)
        self.model_id = parsed.id
        self.runtime = TextGenerator(parsed, root, use_gpu=bool(ray.get_gpu_ids()), threads=int(max(1, num_cpus)),
                                     continuous=continuous, stream_interval_s=stream_interval_s,
                                     gemm_auto_tune=gemm_auto_tune)
        # Each stream's next step runs in this pool. With continuous batching a stream's thread only waits for the
        # batcher's next step, so there is one thread per row (a pool of cpus + 4 would cap the batch there).
        batcher = self.runtime.batcher
        self._steps_pool = concurrent.futures.ThreadPoolExecutor(
            batcher.rows + 4 if batcher is not None else None, thread_name_prefix="stream")
        self.active_streams = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings belong to embedders; generators accept and ignore them."""

    def prepare(self, prompts: list[str] | None, messages: list[dict[str, str]] | None, **params) -> Prepared:
        """Check a request (raises a 4xx-mapped error) before any decoding starts."""
        if messages is not None:
            prompts = [self.runtime.render_chat(messages)]
            params.setdefault("add_special_tokens", False)  # the template already holds BOS
        return self.runtime.prepare(prompts or [], **params)

    async def stream(self, prompts: list[str] | None, messages: list[dict[str, str]] | None,
                     **params) -> AsyncIterator[int | list[Delta]]:
        """One call per streamed request: the first item is the prompt's token count once the request is checked
        (a bad request raises before it, so the caller can still answer 4xx), then the text items."""
        prepared = self.prepare(prompts, messages, **params)
        yield prepared.prompt_tokens
        items = self._deltas(prepared)
        try:
            async for deltas in items:
                yield deltas
        finally:  # a caller that stops here closes the steps now, not when the generator is collected
            await items.aclose()

    async def _deltas(self, prepared: Prepared) -> AsyncIterator[list[Delta]]:
        """Async generator: each item of `runtime.steps` (the first token, then a stream interval's tokens) is
        awaited from a thread; a cancelled caller stops the loop."""
        steps = self.runtime.steps(prepared)
        self.active_streams += 1
        running = None
        try:
            while True:
                running = self._steps_pool.submit(next, steps, _DONE)
                if (deltas := await asyncio.wrap_future(running)) is _DONE:
                    break
                if deltas:
                    yield deltas
        finally:
            self.active_streams -= 1
            # A cancelled caller can leave a step running in its thread: close the steps once it returns (a
            # generator cannot be closed while it runs), which frees its KV bucket or batcher rows.
            if running is not None and not running.done():
                running.add_done_callback(lambda _: steps.close())
            else:
                steps.close()

    async def complete(self, prompts: list[str] | None, messages: list[dict[str, str]] | None,
                       **params) -> dict[str, Any]:
        """One call per request: check it (4xx-mapped errors), generate, return the whole text."""
        prepared = self.prepare(prompts, messages, **params)
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

    def check_health(self) -> None:
        if self.runtime.session is None:
            raise RuntimeError("session not loaded")
