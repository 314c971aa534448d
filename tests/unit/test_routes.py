"""The HTTP contract in-process: the real routes (serve_app.http.routes) over in-process backends of tiny real
models (a random BERT with MiniLM's tokenizer, a random GPT-2 with GPT-2's tokenizer and a chat template),
through httpx's ASGI transport. No Ray: what needs Serve is in tests/integration."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from contract import manifest
from contract.settings import ServerSettings
from serve_app.http.routes import INLINE_TOKENIZE_CHARS, create_app
from tests.unit.conftest import EMBED, GEN

SETTINGS = ServerSettings(max_inputs_per_request=64, max_input_chars=5000, max_body_bytes=200_000,
                          max_tokens_limit=4000)


def make_app(served, **settings):
    backends, cards = served
    return create_app(backends, cards, SETTINGS.model_copy(update=settings))


async def _send_all(app, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://onnx-serve") as client:
        return await asyncio.gather(*(client.request(method, url, **kwargs) for method, url, kwargs in requests))


def send(app, method: str, url: str, **kwargs) -> httpx.Response:
    return asyncio.run(_send_all(app, [(method, url, kwargs)]))[0]


@pytest.fixture(scope="module")
def app(served):
    return make_app(served)


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_are_the_sessions_vectors_in_float_and_base64(app, served):
    session = served[0].embedders[EMBED].session
    texts = ["The capital of France is Paris.", "北京是中国的首都。", "ok"]
    r = send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["model"] == EMBED
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], session.run(session.prepare(texts)), atol=1e-6)
    assert body["usage"] == {"prompt_tokens": sum(p.tokens for p in session.prepare(texts)),
                             "total_tokens": sum(p.tokens for p in session.prepare(texts))}
    b64 = send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": "ok", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vector, np.float32(body["data"][2]["embedding"]))


def test_models_health_ready(app, tiny_bert_root, tiny_gpt2_root):
    cards = send(app, "GET", "/v1/models").json()["data"]
    assert [(c["id"], c["task"], c["dim"]) for c in cards] == [(EMBED, "embedding", 32), (GEN, "generation", None)]
    served_dirs = [manifest.load(tiny_bert_root)[EMBED].directory, manifest.load(tiny_gpt2_root)[GEN].directory]
    assert [f"{c['id']}/{c['version']}" for c in cards] == served_dirs  # the version directory each serves
    assert send(app, "GET", "/health").json()["status"] == "ok"
    assert send(app, "GET", "/ready").json() == {"status": "ok", "models": {EMBED: True, GEN: True}}


BAD = [  # body, status, param, code
    ({"model": EMBED, "input": ""}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": []}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": ["ok", ""]}, 400, "input[1]", "invalid_request"),
    ({"model": EMBED, "input": 5}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": [1, 10**9]}, 400, "input", "invalid_request"),  # an id outside the vocabulary
    ({"model": EMBED, "input": [[101, 102], []]}, 400, "input[1]", "invalid_request"),
    ({"model": EMBED, "input": [1, "x"]}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": None}, 400, "input", "invalid_request"),
    ({"model": EMBED}, 400, "input", "invalid_request"),
    ({"input": "x"}, 400, "model", "invalid_request"),
    ({"model": "no-such-model", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": "../../etc/passwd", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": EMBED, "input": ["x"] * 65}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": "word " * 300}, 400, "input", "context_length_exceeded"),
    ({"model": EMBED, "input": "x" * 5001}, 400, "input", "invalid_request"),
    ({"model": EMBED, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "invalid_request"),
    ({"model": EMBED, "input": "x", "dimensions": 128}, 400, "dimensions", "invalid_request"),
    ({"model": EMBED, "input": "x", "extra": 1}, 400, "extra", "invalid_request"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_embedding_requests_get_openai_shaped_4xx(app, body, status, param, code):
    r = send(app, "POST", "/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code
    assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize("content,headers,status", [
    (b"{not json", {"content-type": "application/json"}, 400),
    (b"\xff\xfe\x00garbage", {"content-type": "application/json"}, 400),
    (b"model=x", {"content-type": "application/x-www-form-urlencoded"}, 400),
    (b"x" * 300_000, {"content-type": "application/json"}, 413),
])
def test_malformed_bodies(app, content, headers, status):
    r = send(app, "POST", "/v1/embeddings", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert "error" in r.json() and "Traceback" not in r.text


@pytest.mark.parametrize("url,body,param", [
    ("/v1/embeddings", {"model": EMBED, "input": ["ok", "a\ud800b"]}, "input[1]"),
    ("/v1/completions", {"model": GEN, "prompt": "a\udc00", "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": GEN, "messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/embeddings", {"model": "\ud800", "input": "x"}, "model"),
])
def test_lone_surrogates_are_a_400_naming_the_field(app, url, body, param):
    """JSON may spell a lone UTF-16 surrogate; no tokenizer takes one (and no UTF-8 body can echo it back)."""
    r = send(app, "POST", url, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_a_bad_request_fails_alone_among_concurrent_ones(app, served):
    """Requests are prepared before they join a batch: over-long ones get their 400, their neighbours, batched
    together by the model's batcher, their vectors."""
    embedder = served[0].embedders[EMBED]
    before = len(embedder.sizes)
    good = [("POST", "/v1/embeddings", {"json": {"model": EMBED, "input": f"text {i}"}}) for i in range(12)]
    bad = [("POST", "/v1/embeddings", {"json": {"model": EMBED, "input": "word " * 300}})] * 4
    responses = asyncio.run(_send_all(app, good[:6] + bad + good[6:]))
    assert [r.status_code for r in responses] == [200] * 6 + [400] * 4 + [200] * 6
    assert {r.json()["error"]["code"] for r in responses[6:10]} == {"context_length_exceeded"}
    sizes = list(embedder.sizes)[before:]
    assert sum(sizes) == 12 and len(sizes) < 12, sizes


def test_a_merged_call_runs_in_batches_the_model_decides(served):
    """An ingress merges whatever is waiting into one call; the model's batcher still caps a run at
    max_batch_size requests (16 here), and each request gets its own vectors."""
    embedder = served[0].embedders[EMBED]
    requests = [embedder.prepare([f"text {i}", "and one more"]) for i in range(40)]
    before = len(embedder.sizes)
    merged = asyncio.run(embedder.embed_many(requests))
    sizes = list(embedder.sizes)[before:]
    assert sum(sizes) == 40 and max(sizes) == 16, sizes
    assert [v.shape for v in merged] == [(2, 32)] * 40
    np.testing.assert_allclose(merged[39], asyncio.run(embedder.embed(requests[39])), atol=1e-6)


def test_a_large_request_is_prepared_in_a_thread_with_the_same_result(app):
    big = ["Paris " * 50] * 60  # 52 tokens each
    assert sum(map(len, big)) > INLINE_TOKENIZE_CHARS
    r = send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": big})
    lone = send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": big[0]})
    assert r.status_code == 200 and len(r.json()["data"]) == 60
    np.testing.assert_allclose(r.json()["data"][59]["embedding"], lone.json()["data"][0]["embedding"], atol=1e-6)


def test_api_keys_guard_v1_and_a_slow_request_is_a_504(served):
    guarded = make_app(served, api_keys=("s3cret",))
    body = {"model": EMBED, "input": "x"}
    missing = send(guarded, "POST", "/v1/embeddings", json=body)
    wrong = send(guarded, "POST", "/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer" and missing.json()["error"]["code"] == "invalid_api_key"
    assert send(guarded, "GET", "/health").status_code == 200
    assert send(guarded, "POST", "/tokenize", json={"model": EMBED, "prompt": "x"}).status_code == 401
    assert send(guarded, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    late = send(make_app(served, request_timeout_s=1e-6), "POST", "/v1/embeddings", json=body)
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"


# ----------------------------------------------------------------------------- generation


def _events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_streamed_completion_equals_the_whole_one_and_usage_counts_it(app):
    body = {"model": GEN, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = send(app, "POST", "/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 12
    events = _events(send(app, "POST", "/v1/completions",
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    *chunks, last = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == whole["usage"]


def test_chat_goes_through_the_template_and_streams_the_same_text(app):
    body = {"model": GEN, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0}
    whole = send(app, "POST", "/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    first, *chunks = _events(send(app, "POST", "/v1/chat/completions", json={**body, "stream": True}))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


BAD_COMPLETIONS = [  # patch of a good body, status, param
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -5}, 400, "max_tokens"),
    ({"max_tokens": 4001}, 400, "max_tokens"),
    ({"temperature": -0.1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": ["a", ""]}, 400, "stop"),
    ({"model": "nope"}, 404, "model"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream: true
    ({"stream": True, "stream_options": {"usage": True}}, 400, "stream_options"),
    ({"prompt": "word " * 130}, 400, "prompt"),  # over the 128-token context
    ({"prompt": "word " * 70, "max_tokens": 64}, 400, "prompt"),  # with max_tokens, over it
    ({"prompt": "word " * 70, "max_tokens": 64, "stream": True}, 400, "prompt"),  # refused before the stream
]


@pytest.mark.parametrize("patch,status,param", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(app, patch, status, param):
    r = send(app, "POST", "/v1/completions", json={"model": GEN, "prompt": "Hello", "max_tokens": 4, **patch})
    assert r.status_code == status, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.text


@pytest.mark.parametrize("patch,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"max_completion_tokens": 4001}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 5001}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 130}]}, "prompt"),  # the rendered chat, over the context
])
def test_bad_chat_requests(app, patch, param):
    body = {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **patch}
    r = send(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.text


def test_each_route_serves_only_its_task(app):
    r = send(app, "POST", "/v1/embeddings", json={"model": GEN, "input": "x"})
    assert r.status_code == 404 and GEN not in r.json()["error"]["message"].split("available")[1]
    r = send(app, "POST", "/v1/completions", json={"model": EMBED, "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
