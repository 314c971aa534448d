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
    TokenizeRequest,
)

MAX_STOP_STRINGS = 4  # OpenAI's limit
# Fields that would change the output and are not implemented, with the values that change nothing.
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "echo": (False,), "suffix": ("",), "best_of": (1,),
}


def unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """A 400 naming the first field set that this server would have to ignore to answer."""
    for name, harmless in UNSUPPORTED.items():
        value = getattr(request, name, None)
        if value is not None and value not in harmless:
            raise InvalidRequest(f"{name} is not supported by this server", name)


def count(values: list, field: str, settings: ServerSettings) -> None:
    limit = settings.max_inputs_per_request
    if not values:
        raise InvalidRequest(f"{field} must not be empty", field)
    if len(values) > limit:
        raise InvalidRequest(f"{field} has {len(values)} items; at most {limit} per request", field)


def texts(values: list[str], field: str, settings: ServerSettings, *, allow_empty: bool = False) -> list[str]:
    """A non-empty list of at most ``max_inputs_per_request`` texts, each at most ``max_input_chars`` long;
    ``field[i]`` names the one at fault."""
    count(values, field, settings)
    for i, text in enumerate(values):
        where = f"{field}[{i}]" if len(values) > 1 else field
        if not text and not allow_empty:
            raise InvalidRequest(f"{where} is an empty string", where)
        if len(text) > settings.max_input_chars:
            raise InvalidRequest(f"{where} has {len(text)} characters; at most {settings.max_input_chars}", where)
        _unicode(text, where)
    return values


def _unicode(text: str, where: str) -> None:
    """JSON can spell a lone UTF-16 surrogate (``"\\ud800"``); no tokenizer takes one."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{where} is not valid Unicode: a lone surrogate at character {exc.start}",
                                 where) from None


def token_lists(values: list[list[int]], field: str, settings: ServerSettings) -> list[list[int]]:
    """Lists of token ids: the same count limit as texts, each list non-empty and at most ``max_input_chars``
    ids (whether an id is in the vocabulary is the model's check: ``inference.tokens.check_ids``)."""
    count(values, field, settings)
    for i, ids in enumerate(values):
        where = f"{field}[{i}]" if len(values) > 1 else field
        if not ids:
            raise InvalidRequest(f"{where} is an empty list of token ids", where)
        if len(ids) > settings.max_input_chars:
            raise InvalidRequest(f"{where} has {len(ids)} token ids; at most {settings.max_input_chars}", where)
    return values


def inputs(values: list, field: str, settings: ServerSettings) -> list[str] | list[list[int]]:
    if values and not isinstance(values[0], str):
        return token_lists(values, field, settings)
    return texts(values, field, settings)


def truncation(value: int | None, limit: int | None) -> int | None:
    """``truncate_prompt_tokens``: 1..limit, or -1 for the limit itself (``limit``: the model's token limit;
    None where only the model knows it, which then resolves -1 itself)."""
    if value is None:
        return None
    if value == -1 or (value >= 1 and (limit is None or value <= limit)):
        return limit if value == -1 and limit is not None else value
    bound = f"1..{limit}" if limit is not None else "at least 1"
    raise InvalidRequest(f"truncate_prompt_tokens must be -1 or {bound}, got {value}", "truncate_prompt_tokens")


def embedding(request: EmbeddingRequest, card: ModelCard, settings: ServerSettings) -> list[str] | list[list[int]]:
    """The texts (or token id lists) to embed."""
    values = inputs(request.inputs(), "input", settings)
    if request.dimensions is not None and request.dimensions != card.dim:
        raise InvalidRequest(f"dimensions must be {card.dim} for {request.model}", "dimensions")
    return values


def rerank(request: RerankRequest, settings: ServerSettings) -> tuple[str, list[str]]:
    """The query and the documents: at most ``max_inputs_per_request`` documents, none empty."""
    texts([request.query], "query", settings)
    return request.query, texts(request.documents, "documents", settings)


def classify(request: ClassifyRequest, settings: ServerSettings) -> list[str]:
    return texts(request.texts(), "input", settings)


def completion(request: CompletionRequest, settings: ServerSettings) -> GenerationCall:
    unsupported(request)
    prompts = inputs(request.prompts(), "prompt", settings)
    return _generation(request, settings, request.max_tokens, truncation(request.truncate_prompt_tokens, None),
                       prompts=tuple(p if isinstance(p, str) else tuple(p) for p in prompts))


def _content(content: str | list, where: str) -> str:
    """A message's text: a string, or its text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type != "text":
            raise InvalidRequest(f"{where}.content[{j}]: content part type {part.type!r} is not supported; "
                                 "only text parts", f"{where}.content[{j}].type")
        if part.text is None:
            raise InvalidRequest(f"{where}.content[{j}]: a text part needs text", f"{where}.content[{j}].text")
    return "\n".join(part.text for part in content)


def chat_messages(request: ChatCompletionRequest | TokenizeRequest, settings: ServerSettings) -> tuple[dict, ...]:
    """The messages as the chat template takes them: text parts joined, developer as system, names dropped."""
    rendered = tuple({"role": "system" if m.role == "developer" else m.role,
                      "content": _content(m.content, f"messages[{i}]")} for i, m in enumerate(request.messages))
    texts([m["content"] for m in rendered], "messages", settings, allow_empty=True)
    return rendered


def tokenize(request: TokenizeRequest, settings: ServerSettings) -> tuple[str | None, list[dict] | None]:
    """(prompt, messages): exactly one of them."""
    if (request.prompt is None) == (request.messages is None):
        raise InvalidRequest("send either prompt or messages", "prompt")
    if request.messages is not None:
        return None, list(chat_messages(request, settings))
    return texts([request.prompt], "prompt", settings, allow_empty=True)[0], None


def chat(request: ChatCompletionRequest, settings: ServerSettings) -> GenerationCall:
    unsupported(request)
    return _generation(request, settings, request.token_budget(), None, messages=chat_messages(request, settings))


def _generation(request: CompletionRequest | ChatCompletionRequest, settings: ServerSettings, max_tokens: int,
                truncate: int | None, **inputs) -> GenerationCall:
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
                          seed=request.seed, stop=tuple(stops), truncate=truncate)
