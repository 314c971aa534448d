"""OpenAI response shapes: embeddings, completions and chat completions, and their server-sent events."""
from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

import numpy as np
import orjson
from fastapi.responses import Response

from contract.errors import ServeError

from .errors import body_of, translate


class VectorsResponse(Response):
    """JSON with float32 arrays written by orjson: each float is the shortest decimal that reads back as the
    same float32, and a 384-d vector takes microseconds where ``json.dumps`` of ``tolist()`` took hundreds of
    them (docs/architecture.md, "The response")."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _vector(vector: np.ndarray, fmt: str) -> np.ndarray | str:
    if fmt == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(np.ascontiguousarray(vector, "<f4").tobytes()).decode()
    return np.ascontiguousarray(vector, np.float32)


def embeddings(model: str, vectors: np.ndarray, tokens: int, fmt: str) -> VectorsResponse:
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, fmt)} for i, v in enumerate(vectors)]
    return VectorsResponse({"object": "list", "data": data, "model": model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def rerank(request, scores: np.ndarray, tokens: int) -> dict[str, Any]:
    """Results sorted by score, highest first (ties: lower index first), cut at top_n."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[: request.top_n or len(scores)]
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": request.documents[i]}} if request.return_documents else {})}
               for i in order]
    return {"id": new_id("rerank"), "model": request.model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def classify(model: str, labels: tuple[str, ...], probs: np.ndarray, tokens: int) -> dict[str, Any]:
    data = [{"index": i, "label": labels[int(np.argmax(row))], "probs": [float(p) for p in row],
             "num_classes": len(labels)} for i, row in enumerate(probs)]
    return {"id": new_id("classify"), "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(model: str, result: dict[str, Any], chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                    "logprobs": None} for i, (text, reason) in enumerate(zip(result["texts"], result["finish_reasons"]))]
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices, "usage": usage}
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason) in enumerate(zip(result["texts"], result["finish_reasons"]))]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse(model: str, steps: AsyncIterator[list], chat: bool, prompt_tokens: int | None = None,
              on_done: Callable[[int], None] | None = None) -> AsyncIterator[str]:
    """One SSE event per streamed item (textgen.steps: the first token, then every stream interval) and choice,
    then ``data: [DONE]``. ``prompt_tokens`` given (``stream_options.include_usage``): a last chunk with no
    choices carries the usage, as OpenAI's does. An error mid-stream becomes a final error event (the status
    line is already sent). ``on_done`` gets the completion token count."""
    ident, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    completion_tokens = 0
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        yield _event({"id": ident, "object": kind, "created": created, "model": model,
                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    try:
        async for deltas in steps:
            for d in deltas:
                completion_tokens += d.tokens  # set once per choice, on its last delta
                choice = ({"index": d.index, "delta": {"content": d.text} if d.text else {},
                           "finish_reason": d.finish_reason} if chat else
                          {"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": None})
                yield _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]})
    except Exception as exc:  # noqa: BLE001 - reported to the client in the stream's own format
        mapped = translate(exc) or ServeError("internal server error")
        yield _event(body_of(mapped))
    else:
        if prompt_tokens is not None:
            yield _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}})
    if on_done is not None:
        on_done(completion_tokens)
    yield "data: [DONE]\n\n"
