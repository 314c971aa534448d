"""Generation deployment: one ONNX Runtime decoder per replica (``serve_app.backends.generation.GenerationModel``),
streaming text in items of ``stream_interval_s``."""
from __future__ import annotations

from typing import Any, AsyncIterator

import ray
from ray import serve

from inference.textgen import Delta

from ..backends.base import GenerationCall
from ..backends.generation import GenerationModel
from .metrics import RayMetrics


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, entry: dict[str, Any], root: str, threads: int | None = None, continuous: bool = False,
                 stream_interval_s: float = 0.0, gemm_auto_tune: bool = True):
        self.model = GenerationModel(entry, root, use_gpu=bool(ray.get_gpu_ids()), threads=threads,
                                     continuous=continuous, stream_interval_s=stream_interval_s,
                                     gemm_auto_tune=gemm_auto_tune)
        self.model.observe(RayMetrics())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings belong to embedders; generators accept and ignore them."""

    async def stream(self, call: GenerationCall) -> AsyncIterator[int | list[Delta]]:
        """One call per streamed request: the first item is the prompt's token count once the request is checked
        (a bad request raises before it, so the caller can still answer 4xx), then the text items."""
        prompt_tokens, items = await self.model.stream(call)
        yield prompt_tokens
        try:
            async for deltas in items:
                yield deltas
        finally:  # a caller that stops here closes the steps now, not when the generator is collected
            await items.aclose()

    async def complete(self, call: GenerationCall) -> dict[str, Any]:
        """One call per request: check it (4xx-mapped errors), generate, return the whole text."""
        return await self.model.complete(call)

    def info(self) -> dict[str, Any]:
        return self.model.info()

    def check_health(self) -> None:
        self.model.check()
