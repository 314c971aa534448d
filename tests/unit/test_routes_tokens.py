"""Token ids in, /tokenize and /detokenize, and truncate_prompt_tokens: the real routes over the tiny models,
in-process (see test_routes.py). The tiny BERT takes 64 tokens; the tiny GPT-2 has a 128-token context."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from inference.string_encoder import TextOnly
from serve_app.backends import Backends
from serve_app.http.schemas import ModelCard
from tests.unit.conftest import EMBED, GEN
from tests.unit.test_routes import make_app, send

TEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def app(served):
    return make_app(served)


def _tokens(app, model: str, **body) -> dict:
    r = send(app, "POST", "/tokenize", json={"model": model, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _embed(app, value, **extra) -> httpx.Response:
    return send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": value, **extra})


def _cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_ids_from_tokenize_embed_as_the_text_does(app):
    tok = _tokens(app, EMBED, prompt=TEXT)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 64
    text = _embed(app, TEXT).json()
    ids = _embed(app, tok["tokens"]).json()
    assert _cosine(ids["data"][0]["embedding"], text["data"][0]["embedding"]) >= 0.99999
    assert ids["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"] == tok["count"]
    other = _tokens(app, EMBED, prompt="ok")["tokens"]
    both = _embed(app, [tok["tokens"], other]).json()["data"]
    assert len(both) == 2 and _cosine(both[1]["embedding"], _embed(app, "ok").json()["data"][0]["embedding"]) >= 0.99999


def test_an_id_outside_the_vocabulary_is_a_400_that_says_why(app):
    r = _embed(app, [[101, 102], [101, 30522, 102]])  # MiniLM's vocabulary: 30522 ids
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input[1]" and "token id 30522" in error["message"]
    assert "must come from this model's tokenizer" in error["message"]
    assert "check_embedding_ctx_length=False" in error["message"]
    r = send(app, "POST", "/v1/completions", json={"model": GEN, "prompt": [1, 99999], "max_tokens": 2})
    assert r.status_code == 400 and "token id 99999" in r.json()["error"]["message"], r.text
    r = send(app, "POST", "/detokenize", json={"model": GEN, "tokens": [1, -3]})
    assert r.status_code == 400 and "token id -3" in r.json()["error"]["message"], r.text


def test_over_long_ids_get_the_texts_length_check(app):
    ids = _tokens(app, EMBED, prompt="word " * 100)["tokens"]
    r = _embed(app, ids)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


class _TextInputModel:
    """A string-input model's backend: the real prepare step of those graphs (TextOnly), no graph behind it."""

    def __init__(self):
        self.preparer = TextOnly("use")

    async def embed(self, items):
        raise AssertionError("a refused request never runs")


@pytest.fixture(scope="module")
def text_input_app():
    card = ModelCard(id="use", created=0, task="embedding", dim=512, family="use", artifact="model.onnx",
                     parity_max_abs_diff=0.0)
    return make_app((Backends(embedders={"use": _TextInputModel()}), [card]))


@pytest.mark.parametrize("method,url,body", [
    ("POST", "/v1/embeddings", {"input": [101, 102]}),
    ("POST", "/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 8}),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [1]}),
])
def test_a_text_input_model_refuses_ids_and_says_why(text_input_app, method, url, body):
    r = send(text_input_app, method, url, json={"model": "use", **body})
    assert r.status_code == 400, r.text
    assert "takes text only: its graph tokenizes the text itself" in r.json()["error"]["message"]


def test_completions_take_ids_and_lists_of_them(app):
    body = {"model": GEN, "max_tokens": 6, "temperature": 0}
    text = send(app, "POST", "/v1/completions", json={**body, "prompt": "Once upon a time"}).json()
    ids = _tokens(app, GEN, prompt="Once upon a time")["tokens"]
    by_ids = send(app, "POST", "/v1/completions", json={**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"] == len(ids)
    two = send(app, "POST", "/v1/completions", json={**body, "prompt": [ids, ids[:2]]}).json()
    assert len(two["choices"]) == 2 and two["choices"][0]["text"] == text["choices"][0]["text"]


def test_tokenize_renders_chat_messages_and_detokenize_inverts_it(app):
    messages = [{"role": "user", "content": "Say hello"}]
    tok = _tokens(app, GEN, messages=messages)
    chat = send(app, "POST", "/v1/chat/completions", json={"model": GEN, "messages": messages, "max_tokens": 2})
    assert tok["count"] == chat.json()["usage"]["prompt_tokens"] and tok["max_model_len"] == 128
    r = send(app, "POST", "/detokenize", json={"model": GEN, "tokens": _tokens(app, GEN, prompt=TEXT)["tokens"]})
    assert r.json() == {"prompt": TEXT}
    r = send(app, "POST", "/detokenize", json={"model": EMBED, "tokens": _tokens(app, EMBED, prompt="paris")["tokens"]})
    assert r.json()["prompt"] == "[CLS] paris [SEP]"


@pytest.mark.parametrize("body,status,param", [
    ({"model": EMBED, "messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
    ({"model": GEN}, 400, "prompt"),
    ({"model": GEN, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_bad_tokenize_requests(app, body, status, param):
    r = send(app, "POST", "/tokenize", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


# ----------------------------------------------------------------------------- truncate_prompt_tokens


def test_embeddings_truncate_on_request_keeping_the_closing_token(app):
    long = "word " * 100  # 102 tokens: over the 64-token limit
    ids = _tokens(app, EMBED, prompt=long)["tokens"]
    r = _embed(app, long, truncate_prompt_tokens=10)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10, r.text
    kept = _embed(app, ids[:9] + ids[-1:]).json()["data"][0]["embedding"]
    assert _cosine(r.json()["data"][0]["embedding"], kept) >= 0.99999
    by_ids = _embed(app, ids, truncate_prompt_tokens=10).json()["data"][0]["embedding"]
    assert _cosine(by_ids, kept) >= 0.99999
    whole = _embed(app, [long, "ok"], truncate_prompt_tokens=-1).json()
    assert whole["usage"]["prompt_tokens"] == 64 + 3
    for bad in (0, -2, 65):
        r = _embed(app, "ok", truncate_prompt_tokens=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


def test_completions_truncate_on_request(app):
    body = {"model": GEN, "prompt": "word " * 130, "max_tokens": 4, "temperature": 0}
    assert send(app, "POST", "/v1/completions", json=body).status_code == 400  # over the context
    head = send(app, "POST", "/v1/completions", json={**body, "truncate_prompt_tokens": 20}).json()
    assert head["usage"]["prompt_tokens"] == 20
    ids = _tokens(app, GEN, prompt=body["prompt"])["tokens"][:20]
    same = send(app, "POST", "/v1/completions", json={**body, "prompt": ids}).json()
    assert same["choices"][0]["text"] == head["choices"][0]["text"]
    fit = send(app, "POST", "/v1/completions", json={**body, "truncate_prompt_tokens": -1}).json()
    assert fit["usage"]["prompt_tokens"] == 128 - 4


def test_the_openai_client_sends_token_ids(app):
    openai = pytest.importorskip("openai")
    ids = _tokens(app, EMBED, prompt=TEXT)["tokens"]

    async def embed():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://onnx-serve/v1")
        async with openai.AsyncOpenAI(base_url="http://onnx-serve/v1", api_key="unused", http_client=http,
                                      max_retries=0) as client:
            return await client.embeddings.create(model=EMBED, input=[ids, ids[:3]])

    result = asyncio.run(embed())  # the client asks for base64 and decodes it
    text = _embed(app, TEXT).json()["data"][0]["embedding"]
    assert len(result.data) == 2 and _cosine(result.data[0].embedding, text) >= 0.99999
