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
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from contract.errors import ModelNotFound, NotReady, RequestTimeout
from contract.settings import ServerSettings
from inference.classifier import sigmoid, softmax

from ..backends.base import Backends, GenerationCall
from . import errors, openai_format, validate
from .guards import GuardMiddleware
from .metrics import LocalMetrics, Metrics, MetricsMiddleware
from .openai_format import VectorsResponse
from .schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    Health,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    TokenizeRequest,
    TokenizeResponse,
)

INLINE_TOKENIZE_CHARS = 16_384  # larger requests are prepared in a worker thread, off the event loop
T = TypeVar("T")
router = APIRouter()


@dataclass(frozen=True)
class Served:
    """What the routes read: the backends, the model cards by id, the server's limits, where to record."""

    backends: Backends
    cards: dict[str, ModelCard]
    settings: ServerSettings
    metrics: Metrics


def create_app(backends: Backends, cards: list[ModelCard], settings: ServerSettings,
               metrics: Metrics | None = None) -> FastAPI:
    """``metrics``: the Ray ingress supplies its own (serve_app.deployments.metrics); otherwise this process's."""
    app = FastAPI(title="onnx-serve", version="0.1.0",
                  description="OpenAI-shaped HTTP API over ONNX Runtime models served by Ray Serve.")
    errors.install(app)
    metrics = metrics if metrics is not None else LocalMetrics()
    backends.observe(metrics)
    for card in cards:
        metrics.served(card.id, card.artifact, card.parity_max_abs_diff)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_keys=settings.accepted_keys())
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: refused requests count too
    app.state.served = Served(backends, {card.id: card for card in cards}, settings, metrics)
    app.include_router(router)
    return app


def _served(request: Request) -> Served:
    return request.app.state.served


ServedHere = Annotated[Served, Depends(_served)]


def _tag(http: Request, served: Served, model: str) -> None:
    """The model label of this request's metrics (MetricsMiddleware reads it): a served model's id, or
    "unknown", so that what clients send cannot grow the number of series."""
    http.state.model = model if model in served.cards else "unknown"


async def _within(seconds: float, work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
        raise RequestTimeout("the request took longer than the server's limit") from None


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, served: ServedHere, http: Request) -> VectorsResponse:
    _tag(http, served, request.model)
    backend, card = served.backends.embedding(request.model), served.cards[request.model]
    inputs = validate.embedding(request, card, served.settings)
    limit = validate.truncation(request.truncate_prompt_tokens, card.max_length)
    prepare = backend.preparer.prepare if isinstance(inputs[0], str) else backend.preparer.prepare_ids
    big = sum(map(len, inputs)) > INLINE_TOKENIZE_CHARS  # the event loop serves every request of this replica
    items = await asyncio.to_thread(prepare, inputs, limit) if big else prepare(inputs, limit)
    vectors = await _within(served.settings.request_timeout_s, backend.embed(items))
    tokens = sum(item.tokens for item in items)
    served.metrics.tokens(request.model, "prompt", tokens)
    return openai_format.embeddings(request.model, vectors, tokens, request.encoding_format)


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(request: RerankRequest, served: ServedHere, http: Request) -> dict:
    """Documents by relevance to the query, highest first (Cohere's and Jina's shape): sigmoid of the
    cross-encoder's logit, as sentence-transformers' CrossEncoder.predict returns it."""
    _tag(http, served, request.model)
    backend = served.backends.classifier(request.model, "rerank")
    query, documents = validate.rerank(request, served.settings)
    big = len(query) * len(documents) + sum(map(len, documents)) > INLINE_TOKENIZE_CHARS
    prepare = backend.prepare_pairs
    items = await asyncio.to_thread(prepare, query, documents) if big else prepare(query, documents)
    logits = await _within(served.settings.request_timeout_s, backend.logits(items))
    return openai_format.rerank(request, sigmoid(logits[:, 0]), sum(item.tokens for item in items))


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(request: ClassifyRequest, served: ServedHere, http: Request) -> dict:
    """Softmax probabilities in label order and the arg-max label (vLLM's shape)."""
    _tag(http, served, request.model)
    backend = served.backends.classifier(request.model, "classify")
    texts = validate.classify(request, served.settings)
    big = sum(map(len, texts)) > INLINE_TOKENIZE_CHARS
    items = await asyncio.to_thread(backend.prepare_texts, texts) if big else backend.prepare_texts(texts)
    logits = await _within(served.settings.request_timeout_s, backend.logits(items))
    return openai_format.classify(request.model, backend.labels, softmax(logits), sum(i.tokens for i in items))


@router.post("/v1/completions", responses={200: {"description": "text_completion, or SSE chunks if stream"}})
async def completions(request: CompletionRequest, served: ServedHere, http: Request):
    _tag(http, served, request.model)
    return await _generate(served, request, validate.completion(request, served.settings), chat=False)


@router.post("/v1/chat/completions", responses={200: {"description": "chat.completion, or SSE chunks if stream"}})
async def chat_completions(request: ChatCompletionRequest, served: ServedHere, http: Request):
    _tag(http, served, request.model)
    return await _generate(served, request, validate.chat(request, served.settings), chat=True)


async def _generate(served: Served, request: CompletionRequest | ChatCompletionRequest, call: GenerationCall,
                    chat: bool):
    backend = served.backends.generation(request.model)
    timeout, model = served.settings.request_timeout_s, request.model
    if request.stream:  # the status line goes once the backend has accepted the request
        prompt_tokens, steps = await _within(timeout, backend.stream(call))
        served.metrics.tokens(model, "prompt", prompt_tokens)
        usage = request.stream_options is not None and request.stream_options.include_usage
        events = openai_format.sse(model, steps, chat, prompt_tokens if usage else None,
                                   on_done=lambda n: served.metrics.tokens(model, "completion", n))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await _within(timeout, backend.complete(call))
    served.metrics.tokens(model, "prompt", result["prompt_tokens"])
    served.metrics.tokens(model, "completion", result["completion_tokens"])
    return JSONResponse(openai_format.completion(model, result, chat))


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: TokenizeRequest, served: ServedHere, http: Request) -> TokenizeResponse:
    """vLLM's /tokenize: the ids a prompt (or chat messages, through the template) runs as, special tokens
    included; they can be sent back as /v1/embeddings ``input`` or /v1/completions ``prompt``."""
    _tag(http, served, request.model)
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


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(served: ServedHere) -> PlainTextResponse:
    """Prometheus text: requests by route, model and status, latency, tokens, batch sizes (and, under Ray,
    Ray Serve's own series)."""
    return PlainTextResponse(await served.metrics.render(), media_type="text/plain; version=0.0.4")


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
