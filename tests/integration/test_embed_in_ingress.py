"""server.embed_in_ingress: the ingress replicas run the embedding session themselves (no embedder deployment)."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from contract import manifest
from contract.settings import ServerSettings
from inference.encoder import EncoderSession
from tests.tiny import deploy_minilm

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(serve_url, minilm_root):
    from ray import serve

    deploy_minilm(minilm_root, "colocated", {"max_batch_size": 16, "num_cpus": 0.5},
                  ServerSettings(embed_in_ingress=True, ingress_replicas=2, max_input_chars=5000))
    yield serve_url
    serve.delete("colocated")


def test_no_embedder_deployment_and_ready(server):
    from ray import serve

    deployments = serve.status().applications["colocated"].deployments
    assert set(deployments) == {"Ingress"}
    assert httpx.get(f"{server}/ready").json() == {"status": "ok", "models": {MODEL: True}}


def test_vectors_equal_the_session_and_bad_input_fails_alone(server, minilm_root):
    texts = [f"sentence number {i} about trains" for i in range(24)]

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            good = [client.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": t}) for t in texts]
            bad = [client.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "word " * 300})
                   for _ in range(3)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(texts) + [400] * 3
    assert responses[-1].json()["error"]["code"] == "context_length_exceeded"
    got = np.array([r.json()["data"][0]["embedding"] for r in responses[: len(texts)]])
    session = EncoderSession(manifest.load(minilm_root)[MODEL], minilm_root)
    np.testing.assert_allclose(got, session.run(session.prepare(texts)), atol=1e-5)
