"""What the routes call: one backend per served model, chosen once when the app is built (serve_app.app).

An embedding backend has two steps. ``prepare`` tokenizes and checks the texts (an over-long text raises
``InputTooLong`` here, before anything is queued); ``embed`` runs the prepared items and returns one vector per
item. A generation backend checks its request before it decodes anything: ``stream`` returns once the request is
accepted, with its prompt token count, so a bad request still gets its 4xx status line.

Backends raise the domain errors of ``contract.errors``; ``serve_app.http.errors`` maps them to HTTP statuses.
This module imports no Ray. The backends over deployment handles (``remote.py``) and the in-process ones
(``embedding.py``, ``generation.py``) have the same interface, so the HTTP contract runs in-process in tests.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence

import numpy as np

from contract.errors import InvalidRequest, ModelNotFound


class Item(Protocol):
    """One prepared text (``inference.encoder.Prepared``, ``inference.string_encoder.TextItem``)."""

    @property
    def tokens(self) -> int: ...


class Tokens(Protocol):
    """A model's tokenizer as /tokenize and /detokenize use it (``inference.encoder.TextPreparer``,
    ``inference.tokens.PromptTokenizer``, ``inference.string_encoder.TextOnly``, which refuses)."""

    max_length: int | None

    def tokenize(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


class Preparer(Tokens, Protocol):
    """An embedding model's prepare step: tokenize and check (no I/O, may be slow for long texts). Raises
    ``InputTooLong``, or ``InvalidRequest`` for an id outside the vocabulary. ``limit``: truncate each input to at
    most that many tokens (a request's ``truncate_prompt_tokens``) instead of the model's configured rule."""

    def prepare(self, texts: list[str], limit: int | None = None) -> Sequence[Item]: ...

    def prepare_ids(self, lists: list[list[int]], limit: int | None = None) -> Sequence[Item]: ...


class EmbeddingBackend(Protocol):
    preparer: Preparer  # runs in the caller's process (the ingress)

    async def embed(self, items: Sequence[Item]) -> np.ndarray:
        """float32 [len(items), dim]."""

    async def ready(self) -> bool: ...

    def check(self) -> None:
        """Raise if a session this process holds no longer runs (remote backends: nothing to check here)."""


@dataclass(frozen=True)
class GenerationCall:
    """A completion or chat request, checked against the server's limits (serve_app.http.validate)."""

    prompts: tuple[str | tuple[int, ...], ...] | None  # completions: texts, or the model's token ids
    messages: tuple[dict[str, str], ...] | None  # chat: rendered by the model's template
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None  # truncate_prompt_tokens: keep that many prompt tokens (-1: what fits the context)


class GenerationBackend(Protocol):
    tokens: Tokens  # the model's tokenizer and chat template, in the caller's process

    async def stream(self, call: GenerationCall) -> tuple[int, AsyncIterator[list[Any]]]:
        """Once the request is checked: its prompt token count and the text items (lists of
        ``inference.textgen.Delta``). A bad request raises here, before any decoding."""

    async def complete(self, call: GenerationCall) -> dict[str, Any]:
        """``{"texts", "finish_reasons", "prompt_tokens", "completion_tokens"}``."""

    async def ready(self) -> bool: ...

    def check(self) -> None: ...


class ClassifierBackend(Protocol):
    """A rerank or classify model: prepare (tokenize; pairs truncated longest_first or refused with
    ``InputTooLong``), then ``logits`` float32 [len(items), labels]."""

    task: str
    labels: tuple[str, ...]

    def prepare_pairs(self, query: str, documents: list[str]) -> Sequence[Item]: ...

    def prepare_texts(self, texts: list[str]) -> Sequence[Item]: ...

    async def logits(self, items: Sequence[Item]) -> np.ndarray: ...

    async def ready(self) -> bool: ...

    def check(self) -> None: ...


@dataclass
class Backends:
    """One backend per served model, by task."""

    embedders: dict[str, EmbeddingBackend] = field(default_factory=dict)
    generators: dict[str, GenerationBackend] = field(default_factory=dict)
    classifiers: dict[str, ClassifierBackend] = field(default_factory=dict)  # task rerank or classify

    def embedding(self, model: str) -> EmbeddingBackend:
        return self._lookup(self.embedders, model, "embedding")

    def generation(self, model: str) -> GenerationBackend:
        return self._lookup(self.generators, model, "generation")

    def classifier(self, model: str, task: str) -> ClassifierBackend:
        """The rerank or classify model ``model``; a served model of another task is a 400 on ``model``."""
        table = {k: v for k, v in self.classifiers.items() if v.task == task}
        return self._lookup(table, model, task)

    def _lookup(self, table: dict[str, Any], model: str, task: str):
        if model in table:
            return table[model]
        # a reranker asked to embed, a classifier asked to rerank: 400. (Embeddings on a generation model and the
        # reverse stay 404, as before these tasks came.)
        if model in self.classifiers or (task in ("rerank", "classify") and model in {**self.embedders,
                                                                                   **self.generators}):
            raise InvalidRequest(f"model {model!r} is not a {task} model; {task} models: {sorted(table)}", "model")
        raise ModelNotFound(f"model {model!r} is not a served {task} model; available: {sorted(table)}", "model")

    def tokens(self, model: str) -> Tokens:
        """The tokenizer of any served model (/tokenize, /detokenize)."""
        if model in self.embedders:
            return self.embedders[model].preparer
        if model in self.generators:
            return self.generators[model].tokens
        served = sorted({**self.embedders, **self.generators})
        raise ModelNotFound(f"model {model!r} is not served here; available: {served}", "model")

    async def ready(self) -> dict[str, bool]:
        backends = {**self.embedders, **self.generators, **self.classifiers}
        results = await asyncio.gather(*(backend.ready() for backend in backends.values()))
        return dict(zip(backends, results))

    def check(self) -> None:
        for backend in self._all():
            backend.check()

    def observe(self, metrics) -> None:
        """Models held in this process record batches, queue waits and generation times to ``metrics``; those
        behind a handle record where they run."""
        for backend in self._all():
            if hasattr(backend, "observe"):
                backend.observe(metrics)

    def _all(self) -> tuple:
        return (*self.embedders.values(), *self.generators.values(), *self.classifiers.values())
