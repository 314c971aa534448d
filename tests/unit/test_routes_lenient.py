"""What real OpenAI clients send (/work/shared/REVIEW.md part 2): explicit nulls, content parts, the developer
role and fields with no effect here are accepted; fields that would change the output get a 400 naming them.
The real routes over the tiny models, in-process (see test_routes.py)."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.unit.conftest import EMBED, GEN
from tests.unit.test_routes import make_app, send


@pytest.fixture(scope="module")
def app(served):
    return make_app(served)


CHAT = {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
COMPLETION = {"model": GEN, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
NULLS = ["temperature", "top_p", "top_k", "n", "stream", "stream_options", "seed", "stop", "user", "logprobs",
         "presence_penalty", "frequency_penalty", "logit_bias"]


@pytest.mark.parametrize("url,body", [
    ("/v1/chat/completions", {**CHAT, **dict.fromkeys(NULLS + ["max_completion_tokens", "tools",
                                                                "tool_choice", "response_format", "top_logprobs"])}),
    ("/v1/completions", {**COMPLETION, **dict.fromkeys(NULLS + ["max_tokens", "echo", "suffix", "best_of"])}),
    ("/v1/embeddings", {"model": EMBED, "input": "ok", "encoding_format": None, "dimensions": None, "user": None}),
], ids=["chat", "completions", "embeddings"])
def test_an_explicit_null_means_the_default(app, url, body):
    r = send(app, "POST", url, json=body)
    assert r.status_code == 200, r.text
    if url == "/v1/completions":  # max_tokens: null is the default 16
        assert r.json()["usage"]["completion_tokens"] == 16
    if url == "/v1/embeddings":
        assert isinstance(r.json()["data"][0]["embedding"], list)  # encoding_format: null is float


def _chat_text(app, messages) -> str:
    r = send(app, "POST", "/v1/chat/completions", json={**CHAT, "messages": messages, "max_tokens": 6})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_text_parts_developer_role_and_names_render_as_plain_messages(app):
    plain = _chat_text(app, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nhello"}])
    lenient = _chat_text(app, [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                               {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Say"},
                                                                          {"type": "text", "text": "hello"}]}])
    assert lenient == plain


def test_fields_with_no_effect_here_are_accepted(app):
    extras = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
              "parallel_tool_calls": True, "n": 1, "logprobs": False, "presence_penalty": 0, "tools": []}
    assert send(app, "POST", "/v1/chat/completions", json={**CHAT, **extras}).status_code == 200
    extras = {"user": "u1", "metadata": {"k": "v"}, "echo": False, "best_of": 1, "suffix": ""}
    assert send(app, "POST", "/v1/completions", json={**COMPLETION, **extras}).status_code == 200


@pytest.mark.parametrize("url,field,value", [
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "presence_penalty", 0.5),
    ("/v1/chat/completions", "frequency_penalty", 1),
    ("/v1/chat/completions", "logit_bias", {"50256": -100}),
    ("/v1/chat/completions", "n", 2),
    ("/v1/completions", "n", 3),
    ("/v1/completions", "logprobs", 1),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "frequency_penalty", 0.2),
])
def test_fields_that_would_change_the_output_are_refused_by_name(app, url, field, value):
    body = {**(CHAT if "chat" in url else COMPLETION), field: value}
    r = send(app, "POST", url, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"] == f"{field} is not supported by this server", error


def test_other_content_parts_and_unknown_fields_get_400s_that_name_them(app):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = send(app, "POST", "/v1/chat/completions",
             json={**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1].type", r.text
    assert "'image_url' is not supported" in r.json()["error"]["message"]
    r = send(app, "POST", "/v1/chat/completions", json={**CHAT, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate", r.text


# ----------------------------------------------------------------------------- GET /v1/models/{id}


def test_a_model_is_retrieved_as_listed_and_an_unknown_one_is_a_404(app):
    listed = send(app, "GET", "/v1/models").json()["data"]
    for card in listed:
        assert send(app, "GET", f"/v1/models/{card['id']}").json() == card
    r = send(app, "GET", "/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_the_openai_client_retrieves_and_lists_models(app):
    openai = pytest.importorskip("openai")

    async def retrieve():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://onnx-serve/v1")
        client = openai.AsyncOpenAI(base_url="http://onnx-serve/v1", api_key="unused", http_client=http,
                                    max_retries=0)
        async with client:
            model = await client.models.retrieve(EMBED)
            listed = [m.id async for m in client.models.list()]
            try:
                await client.models.retrieve("no-such-model")
            except openai.NotFoundError as exc:
                return model, listed, exc
        raise AssertionError("an unknown model was found")

    model, listed, missing = asyncio.run(retrieve())
    assert model.id == EMBED and model.object == "model" and listed == [EMBED, GEN]
    assert missing.status_code == 404 and missing.body["code"] == "model_not_found"


# ----------------------------------------------------------------------------- LangChain, as the README shows it


def test_langchain_embeddings_and_chat_work_as_the_readme_says(app):
    """OpenAIEmbeddings with check_embedding_ctx_length=False sends texts (its default would tokenize with
    tiktoken, a download, and send cl100k ids); ChatOpenAI sends what it sends by default."""
    langchain_openai = pytest.importorskip("langchain_openai")

    def client():
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://onnx-serve/v1")

    texts = ["The capital of France is Paris.", "ok"]
    embeddings = langchain_openai.OpenAIEmbeddings(model=EMBED, base_url="http://onnx-serve/v1", api_key="unused",
                                                   check_embedding_ctx_length=False, http_async_client=client())
    chat = langchain_openai.ChatOpenAI(model=GEN, base_url="http://onnx-serve/v1", api_key="unused", max_tokens=4,
                                       temperature=0, http_async_client=client())

    messages = [("system", "Be brief."), ("human", "Hi")]

    async def main():
        streamed = [chunk async for chunk in chat.astream(messages)]
        return await embeddings.aembed_documents(texts), await chat.ainvoke(messages), streamed

    vectors, reply, chunks = asyncio.run(main())
    direct = send(app, "POST", "/v1/embeddings", json={"model": EMBED, "input": texts}).json()["data"]
    np.testing.assert_allclose(vectors, [d["embedding"] for d in direct], atol=1e-6)
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] == "length"
    assert len(chunks) > 2 and "".join(chunk.content for chunk in chunks) == reply.content  # greedy: the same text
