"""Every check a request gets from the server, in one place, before anything is queued.

The pydantic schemas (``schemas.py``) have checked shapes and types; here come the server's limits
(``ServerSettings``) and what the model card says. Checks that need the model's tokenizer (a text over the
model's token limit, a prompt over its context) are the backend's prepare step, still before any batch or
decoding (``serve_app.backends.base``). Each failure is an ``InvalidRequest`` naming the field at fault.
"""
from __future__ import annotations

from contract.errors import InvalidRequest
from contract.settings import ServerSettings

from ..backends.base import GenerationCall
from .schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    RerankRequest,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit


def texts(values: list[str], field: str, settings: ServerSettings, *, allow_empty: bool = False) -> list[str]:
    """A non-empty list of at most ``max_inputs_per_request`` texts, each at most ``max_input_chars`` long;
    ``field[i]`` names the one at fault."""
    limit = settings.max_inputs_per_request
    if not values:
        raise InvalidRequest(f"{field} must not be empty", field)
    if len(values) > limit:
        raise InvalidRequest(f"{field} has {len(values)} items; at most {limit} per request", field)
    for i, text in enumerate(values):
        where = f"{field}[{i}]" if len(values) > 1 else field
        if not text and not allow_empty:
            raise InvalidRequest(f"{where} is an empty string", where)
        if len(text) > settings.max_input_chars:
            raise InvalidRequest(f"{where} has {len(text)} characters; at most {settings.max_input_chars}", where)
    return values


def embedding(request: EmbeddingRequest, card: ModelCard, settings: ServerSettings) -> list[str]:
    """The texts to embed."""
    inputs = texts(request.texts(), "input", settings)
    if request.dimensions is not None and request.dimensions != card.dim:
        raise InvalidRequest(f"dimensions must be {card.dim} for {request.model}", "dimensions")
    return inputs


def rerank(request: RerankRequest, settings: ServerSettings) -> tuple[str, list[str]]:
    """The query and the documents: at most ``max_inputs_per_request`` documents, none empty."""
    texts([request.query], "query", settings)
    return request.query, texts(request.documents, "documents", settings)


def classify(request: ClassifyRequest, settings: ServerSettings) -> list[str]:
    return texts(request.texts(), "input", settings)


def completion(request: CompletionRequest, settings: ServerSettings) -> GenerationCall:
    prompts = texts(request.prompts(), "prompt", settings)
    return _generation(request, settings, request.max_tokens, prompts=tuple(prompts))


def chat(request: ChatCompletionRequest, settings: ServerSettings) -> GenerationCall:
    messages = tuple(m.model_dump() for m in request.messages)
    texts([m["content"] for m in messages], "messages", settings, allow_empty=True)
    return _generation(request, settings, request.token_budget(), messages=messages)


def _generation(request: CompletionRequest | ChatCompletionRequest, settings: ServerSettings, max_tokens: int,
                **inputs) -> GenerationCall:
    if max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                             "max_tokens")
    stops = request.stops()
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must not be empty", "stop")
    return GenerationCall(prompts=inputs.get("prompts"), messages=inputs.get("messages"), max_tokens=max_tokens,
                          temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                          seed=request.seed, stop=tuple(stops))
