"""GET /metrics: the series the routes and the embedder's batcher record, in Prometheus text (the in-process
app's own registry; the Ray ingress renders ray.util.metrics through the node's agent instead)."""
from __future__ import annotations

import pytest

from serve_app.http.metrics import LocalMetrics
from serve_app.http.routes import create_app
from tests.unit.conftest import EMBED, GEN
from tests.tiny import metric_samples
from tests.unit.test_routes import SETTINGS, _events, send


@pytest.fixture()
def measured(served):
    backends, cards = served
    return create_app(backends, cards, SETTINGS, LocalMetrics())


def test_requests_tokens_latency_and_batches_are_counted(measured):
    ok = send(measured, "POST", "/v1/embeddings", json={"model": EMBED, "input": ["a b", "c"]})
    assert send(measured, "POST", "/v1/embeddings", json={"model": EMBED, "input": ""}).status_code == 400
    assert send(measured, "POST", "/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
    body = {"model": GEN, "prompt": "Hello", "max_tokens": 5, "temperature": 0}
    whole = send(measured, "POST", "/v1/completions", json=body).json()
    _events(send(measured, "POST", "/v1/completions", json={**body, "stream": True}))
    r = send(measured, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    got = metric_samples(r.text)
    def requests(model, route, status):
        return got[f'onnx_serve_requests_total{{model="{model}",route="{route}",status="{status}"}}']

    def tokens(kind, model):
        return got[f'onnx_serve_tokens_total{{kind="{kind}",model="{model}"}}']

    assert requests(EMBED, "/v1/embeddings", 200) == requests(EMBED, "/v1/embeddings", 400) == 1
    assert requests("unknown", "/v1/embeddings", 404) == 1 and requests(GEN, "/v1/completions", 200) == 2
    assert got[f'onnx_serve_request_seconds_count{{model="{GEN}",route="/v1/completions"}}'] == 2
    assert tokens("prompt", EMBED) == ok.json()["usage"]["prompt_tokens"]
    assert tokens("prompt", GEN) == 2 * whole["usage"]["prompt_tokens"]
    assert tokens("completion", GEN) == 2 * 5
    assert got[f'onnx_serve_batch_requests_count{{model="{EMBED}"}}'] == 1
    assert got[f'onnx_serve_batch_requests_sum{{model="{EMBED}"}}'] == 1  # one request, two texts
    assert got[f'onnx_serve_queue_wait_seconds_count{{model="{EMBED}"}}'] == 1
    assert 0 <= got[f'onnx_serve_queue_wait_seconds_sum{{model="{EMBED}"}}'] < 5
    assert got[f'onnx_serve_time_to_first_token_seconds_count{{model="{GEN}"}}'] == 2
    assert got[f'onnx_serve_time_per_output_token_seconds_count{{model="{GEN}"}}'] == 2
    assert 0 < got[f'onnx_serve_time_per_output_token_seconds_sum{{model="{GEN}"}}'] < 5
    for model in (EMBED, GEN):
        parity = [v for k, v in got.items() if k.startswith("onnx_serve_parity_max_abs_diff{") and f'"{model}"' in k]
        card = send(measured, "GET", f"/v1/models/{model}").json()
        assert parity == [card["parity_max_abs_diff"]] and card["artifact"].endswith(".onnx")


def test_model_labels_are_served_ids_only(measured):
    """What a client puts in ``model`` cannot grow the number of series."""
    for name in ("a", "b", "../../x", "Traceback"):
        send(measured, "POST", "/v1/embeddings", json={"model": name, "input": "x"})
    text = send(measured, "GET", "/metrics").text
    assert "Traceback" not in text and "../../x" not in text
    assert metric_samples(text)['onnx_serve_requests_total{model="unknown",route="/v1/embeddings",status="404"}'] == 4


def test_the_grafana_dashboard_charts_series_we_record():
    """deploy/grafana-dashboard.json's queries name only series of SERIES (Ray's ``ray_`` prefix and the
    exposition suffixes aside), and chart each of them."""
    import json
    import re
    from pathlib import Path

    from serve_app.http.metrics import SERIES

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {re.sub(r"_(total|bucket|sum|count)$", "", name) for q in queries
             for name in re.findall(r"ray_(onnx_serve_\w+)", q)}
    assert named == set(SERIES)


AGENT_TEXT = """\
# HELP python_gc_collections_total Number of times this generation was collected
# TYPE python_gc_collections_total counter
python_gc_collections_total{generation="0"} 599.0
# HELP ray_component_rss_mb RSS usage of all components on the node.
# TYPE ray_component_rss_mb gauge
ray_component_rss_mb{Component="/srv/app/.venv/bin/python",ip="10.0.0.2",pid=""} 1044.4
# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{application="default",method="POST",route="/"} 7.0
# HELP ray_onnx_serve_requests_total HTTP requests by route, model and status
# TYPE ray_onnx_serve_requests_total counter
ray_onnx_serve_requests_total{model="m",route="/v1/embeddings",status="200"} 3.0
process_open_fds 54.0
"""


def test_the_ray_ingress_answers_serving_families_only():
    """The public port gets Ray Serve's series and ours, with their HELP and TYPE lines; the node's own series,
    which name the host's processes and paths, stay on the agent's port."""
    from serve_app.deployments.metrics import serving_families

    text = serving_families(AGENT_TEXT)
    assert metric_samples(text) == {
        'ray_serve_num_http_requests_total{application="default",method="POST",route="/"}': 7.0,
        'ray_onnx_serve_requests_total{model="m",route="/v1/embeddings",status="200"}': 3.0}
    assert text.count("# HELP ") == 2 and text.count("# TYPE ") == 2 and "/srv/" not in text
