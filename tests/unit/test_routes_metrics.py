"""GET /metrics: the series the routes and the embedder's batcher record, in Prometheus text (the in-process
app's own registry; the Ray ingress renders ray.util.metrics through the node's agent instead)."""
from __future__ import annotations

import pytest

from serve_app.http.metrics import LocalMetrics
from serve_app.http.routes import create_app
from tests.unit.conftest import EMBED, GEN
from tests.unit.test_routes import SETTINGS, _events, send


@pytest.fixture()
def measured(served):
    backends, cards = served
    metrics = LocalMetrics()
    embedder = backends.embedders[EMBED]
    embedder.metrics = metrics
    yield create_app(backends, cards, SETTINGS, metrics)
    embedder.metrics = None


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_requests_tokens_latency_and_batches_are_counted(measured):
    ok = send(measured, "POST", "/v1/embeddings", json={"model": EMBED, "input": ["a b", "c"]})
    assert send(measured, "POST", "/v1/embeddings", json={"model": EMBED, "input": ""}).status_code == 400
    assert send(measured, "POST", "/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
    body = {"model": GEN, "prompt": "Hello", "max_tokens": 5, "temperature": 0}
    whole = send(measured, "POST", "/v1/completions", json=body).json()
    _events(send(measured, "POST", "/v1/completions", json={**body, "stream": True}))
    r = send(measured, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    got = _samples(r.text)
    def requests(model, route, status):
        return got[f'onnx_serve_requests_total{{model="{model}",route="{route}",status="{status}"}}']

    def tokens(kind, model):
        return got[f'onnx_serve_tokens_total{{kind="{kind}",model="{model}"}}']

    assert requests(EMBED, "/v1/embeddings", 200) == requests(EMBED, "/v1/embeddings", 400) == 1
    assert requests("nope", "/v1/embeddings", 404) == 1 and requests(GEN, "/v1/completions", 200) == 2
    assert got[f'onnx_serve_request_seconds_count{{model="{GEN}",route="/v1/completions"}}'] == 2
    assert tokens("prompt", EMBED) == ok.json()["usage"]["prompt_tokens"]
    assert tokens("prompt", GEN) == 2 * whole["usage"]["prompt_tokens"]
    assert tokens("completion", GEN) == 2 * 5
    assert got[f'onnx_serve_batch_requests_count{{model="{EMBED}"}}'] == 1
    assert got[f'onnx_serve_batch_requests_sum{{model="{EMBED}"}}'] == 1  # one request, two texts
