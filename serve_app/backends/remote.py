"""Backends over Ray Serve deployment handles: the ingress's view of an Embedder or a Generator replica.

Errors that cross a handle are mapped onto the domain taxonomy here, so the routes never see a Ray type:
a replica's own ``ServeError`` (wrapped by Ray in ``RayTaskError``) is raised as itself, Serve's
``BackPressureError`` (a full queue) becomes ``Overloaded`` (503, Retry-After). A call whose replica died, not
through the request's fault, is sent once more.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from contract.errors import Overloaded, ServeError

from ..batching import GreedyBatcher
from .base import GenerationCall, Item, Preparer, Tokens

T = TypeVar("T")


def translate(exc: BaseException) -> BaseException:
    """The domain error for an error that crossed a handle; anything else unchanged."""
    cause = getattr(exc, "cause", None)  # RayTaskError(cause): the replica's own exception
    if isinstance(cause, ServeError):
        return cause
    if isinstance(exc, BackPressureError):
        return Overloaded("the model is at capacity; retry shortly")
    if replica_died(exc):  # a lost node or a killed replica: capacity is gone until Serve replaces it
        return Overloaded("the model's replica was lost; retry shortly")
    return exc


def replica_died(exc: BaseException) -> bool:
    """The replica serving the call went away (killed, crashed, node lost): the request is not at fault."""
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


async def send(make_call: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
    """Await a handle call; ``retry``: once more if its replica died (only for work that is safe to repeat)."""
    for attempt in range(2 if retry else 1):
        try:
            return await make_call()
        except Exception as exc:
            if attempt == 0 and retry and replica_died(exc):
                continue
            mapped = translate(exc)
            if mapped is exc:
                raise
            raise mapped from None
    raise AssertionError("unreachable")


async def _ping(handle: DeploymentHandle) -> bool:
    try:
        await asyncio.wait_for(handle.info.remote(), 5.0)
        return True
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


class RemoteEmbedding:
    """An Embedder deployment. ``preparer`` runs here, in the ingress (``TextPreparer`` for token-input graphs,
    ``string_encoder.text_items`` for string-input ones), so an over-long text gets its 400 before any hop and
    the embedder replica, one per GPU share, spends its CPU on batches.

    ``merge``: requests waiting for this model leave the ingress as one call per free slot, at most
    ``in_flight`` calls open (``server.ingress_in_flight``); the embedder takes a merged call as one batcher
    item, and its batcher, not this merge, decides session batches (``max_batch_size``). Without ``merge``
    (``max_batch_size: 1``) each request is its own call, so Serve's queue limits refuse load per request.
    ``timeout_s`` bounds a merged call, which holds a slot for many requests."""

    def __init__(self, handle: DeploymentHandle, preparer: Preparer, *, merge: bool, in_flight: int,
                 timeout_s: float):
        self.handle, self.preparer, self.timeout_s = handle, preparer, timeout_s
        self.merger = GreedyBatcher(self._send, max_batch_size=None, max_in_flight=in_flight) if merge else None
        self.embed = self.merger.submit if merge else self._alone  # chosen once, with the model's settings

    async def _alone(self, items: Sequence[Item]) -> np.ndarray:
        (vectors,) = await send(lambda: self.handle.embed_many.remote([items]))
        return vectors

    async def _send(self, requests: list[Sequence[Item]]) -> list[np.ndarray]:
        """One merged call: every request that was waiting when a slot came free."""
        return await send(lambda: asyncio.wait_for(self.handle.embed_many.remote(requests), self.timeout_s))

    async def ready(self) -> bool:
        return await _ping(self.handle)

    def check(self) -> None:
        """The embedder replica has its own health check."""


class RemoteClassifier:
    """A Classifier deployment (rerank or classify). The ingress tokenizes (``inference.classifier.PairPreparer``),
    so an over-long pair refused by the model's settings gets its 400 before any hop; waiting requests leave as
    one merged call per free slot, as ``RemoteEmbedding``'s do."""

    def __init__(self, handle: DeploymentHandle, preparer, task: str, labels: tuple[str, ...], *, in_flight: int,
                 timeout_s: float):
        self.handle, self.preparer, self.task, self.labels, self.timeout_s = handle, preparer, task, labels, timeout_s
        self.merger = GreedyBatcher(self._send, max_batch_size=None, max_in_flight=in_flight)

    def prepare_pairs(self, query: str, documents: list[str]) -> Sequence[Item]:
        return self.preparer.pairs(query, documents)

    def prepare_texts(self, texts: list[str]) -> Sequence[Item]:
        return self.preparer.prepare(texts)

    async def logits(self, items: Sequence[Item]) -> np.ndarray:
        return await self.merger.submit(items)

    async def _send(self, requests: list[Sequence[Item]]) -> list[np.ndarray]:
        return await send(lambda: asyncio.wait_for(self.handle.logits_many.remote(requests), self.timeout_s))

    async def ready(self) -> bool:
        return await _ping(self.handle)

    def check(self) -> None:
        """The classifier replica has its own health check."""


class RemoteGeneration:
    """A Generator deployment: one call per request, which the Generator checks before it decodes. Until it
    answers, nothing has reached the client, so a call whose replica died is sent once more."""

    def __init__(self, handle: DeploymentHandle, tokens: Tokens):
        self.handle, self.tokens = handle, tokens  # the model's tokenizer, here in the ingress: /tokenize

    async def stream(self, call: GenerationCall) -> tuple[int, AsyncIterator[list[Any]]]:
        async def accepted():
            steps = self.handle.options(stream=True).stream.remote(call)
            return steps, await steps.__anext__()  # the prompt's token count, or the request's 4xx error

        steps, prompt_tokens = await send(accepted)
        return prompt_tokens, _translated(steps)

    async def complete(self, call: GenerationCall) -> dict[str, Any]:
        return await send(lambda: self.handle.complete.remote(call))

    async def ready(self) -> bool:
        return await _ping(self.handle)

    def check(self) -> None:
        """The generator replica has its own health check."""


async def _translated(steps) -> AsyncIterator[list[Any]]:
    """The stream's items; an error mid-stream as its domain error (the SSE writer reports it in the stream)."""
    try:
        async for item in steps:
            yield item
    except Exception as exc:  # noqa: BLE001 - re-raised, mapped
        mapped = translate(exc)
        if mapped is exc:
            raise
        raise mapped from None
