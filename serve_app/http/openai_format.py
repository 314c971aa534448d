"""OpenAI response and server-sent-event shapes for completions and chat completions."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from contract.errors import ServeError

from .errors import body_of, translate


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


async def sse(model: str, steps: AsyncIterator[list], chat: bool, prompt_tokens: int | None = None) -> AsyncIterator[str]:
    """One SSE event per streamed item (textgen.steps: the first token, then every stream interval) and choice,
    then ``data: [DONE]``. ``prompt_tokens`` given (``stream_options.include_usage``): a last chunk with no
    choices carries the usage, as OpenAI's does. An error mid-stream becomes a final error event (the status
    line is already sent)."""
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
    yield "data: [DONE]\n\n"
