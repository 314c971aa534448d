"""The HTTP API: every route, as a thin layer over the backends of ``serve_app.backends``. No Ray here.

``create_app`` returns the FastAPI app with the guards (body size, API keys), the one error -> status table and
the routes. Ray Serve wraps it in the Ingress deployment; tests call it in-process through httpx's ASGI
transport. A request is checked by its schema and ``validate`` before its backend sees it, and a backend
prepares (tokenizes and checks) it before anything is queued.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Awaitable, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from contract.errors import ModelNotFound, NotReady, RequestTimeout
from contract.settings import ServerSettings

from ..backends.base import Backends, GenerationCall
from . import errors, openai_format, validate
from .guards import GuardMiddleware
from .openai_format import VectorsResponse
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

INLINE_TOKENIZE_CHARS = 16_384  # larger requests are prepared in a worker thread, off the event loop
T = TypeVar("T")
router = APIRouter()


@dataclass(frozen=True)
class Served:
    """What the routes read: the backends, the model cards by id, the server's limits."""

    backends: Backends
    cards: dict[str, ModelCard]
    settings: ServerSettings


def create_app(backends: Backends, cards: list[ModelCard], settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="onnx-serve", version="0.1.0",
                  description="OpenAI-shaped HTTP API over ONNX Runtime models served by Ray Serve.")
    errors.install(app)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_keys=settings.api_keys)
    app.state.served = Served(backends, {card.id: card for card in cards}, settings)
    app.include_router(router)
    return app


def _served(request: Request) -> Served:
    return request.app.state.served


ServedHere = Annotated[Served, Depends(_served)]


async def _within(seconds: float, work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
        raise RequestTimeout("the request took longer than the server's limit") from None


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, served: ServedHere) -> VectorsResponse:
    backend, card = served.backends.embedding(request.model), served.cards[request.model]
    inputs = validate.embedding(request, card, served.settings)
    limit = validate.truncation(request.truncate_prompt_tokens, card.max_length)
    prepare = backend.preparer.prepare if isinstance(inputs[0], str) else backend.preparer.prepare_ids
    big = sum(map(len, inputs)) > INLINE_TOKENIZE_CHARS  # the event loop serves every request of this replica
    items = await asyncio.to_thread(prepare, inputs, limit) if big else prepare(inputs, limit)
    vectors = await _within(served.settings.request_timeout_s, backend.embed(items))
    return openai_format.embeddings(request.model, vectors, sum(item.tokens for item in items),
                                    request.encoding_format)


@router.post("/v1/completions", responses={200: {"description": "text_completion, or SSE chunks if stream"}})
async def completions(request: CompletionRequest, served: ServedHere):
    return await _generate(served, request, validate.completion(request, served.settings), chat=False)


@router.post("/v1/chat/completions", responses={200: {"description": "chat.completion, or SSE chunks if stream"}})
async def chat_completions(request: ChatCompletionRequest, served: ServedHere):
    return await _generate(served, request, validate.chat(request, served.settings), chat=True)


async def _generate(served: Served, request: CompletionRequest | ChatCompletionRequest, call: GenerationCall,
                    chat: bool):
    backend = served.backends.generation(request.model)
    timeout = served.settings.request_timeout_s
    if request.stream:  # the status line goes once the backend has accepted the request
        prompt_tokens, steps = await _within(timeout, backend.stream(call))
        usage = request.stream_options is not None and request.stream_options.include_usage
        return StreamingResponse(openai_format.sse(request.model, steps, chat, prompt_tokens if usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await _within(timeout, backend.complete(call))
    return JSONResponse(openai_format.completion(request.model, result, chat))


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: TokenizeRequest, served: ServedHere) -> TokenizeResponse:
    """vLLM's /tokenize: the ids a prompt (or chat messages, through the template) runs as, special tokens
    included; they can be sent back as /v1/embeddings ``input`` or /v1/completions ``prompt``."""
    tokens = served.backends.tokens(request.model)
    ids = tokens.tokenize(*validate.tokenize(request, served.settings))
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=tokens.max_length)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(request: DetokenizeRequest, served: ServedHere) -> DetokenizeResponse:
    tokens = served.backends.tokens(request.model)
    ids = validate.token_lists([request.tokens], "tokens", served.settings)[0]
    return DetokenizeResponse(prompt=tokens.detokenize(ids))


@router.get("/v1/models", response_model=ModelList)
async def models(served: ServedHere) -> ModelList:
    return ModelList(data=list(served.cards.values()))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"description": "unknown id"}})
async def model(model_id: str, served: ServedHere) -> ModelCard:
    """One model, as /v1/models lists it (models.retrieve)."""
    if model_id not in served.cards:
        raise ModelNotFound(f"model {model_id!r} is not served here; available: {sorted(served.cards)}", "model")
    return served.cards[model_id]


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Liveness: the ingress answers."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"description": "a model is not loaded"}})
async def ready(served: ServedHere) -> Health:
    """Readiness: every configured model's backend answers."""
    status = await served.backends.ready()
    if not all(status.values()):
        raise NotReady(f"models not ready: {sorted(k for k, ok in status.items() if not ok)}")
    return Health(status="ok", models=status)
