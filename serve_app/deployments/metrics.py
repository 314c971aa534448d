"""The metrics interface of ``serve_app.http.metrics`` over Ray: ``ray.util.metrics`` series, exported by each
node's metrics agent beside Ray Serve's own (``ray_serve_*``). GET /metrics on the HTTP port answers with that
agent's text for the ingress's node; our series carry a ``ray_`` prefix there (``ray_onnx_serve_requests``...).
"""
from __future__ import annotations

import asyncio
import logging
import urllib.request

import ray
from ray.util.metrics import Counter, Histogram

from ..http.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S

logger = logging.getLogger("serve_app")


def agent_url() -> str | None:
    """The metrics agent of this process's node (``ray start --metrics-export-port`` fixes its port)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


class RayMetrics:
    def __init__(self):
        self.requests = Counter("onnx_serve_requests", "HTTP requests by route, model and status",
                                tag_keys=("route", "model", "status"))
        self.latency = Histogram("onnx_serve_request_seconds", "HTTP request latency",
                                 boundaries=list(LATENCY_BUCKETS_S), tag_keys=("route", "model"))
        self.token_count = Counter("onnx_serve_tokens", "Tokens by model and kind (prompt, completion)",
                                   tag_keys=("model", "kind"))
        self.batches = Histogram("onnx_serve_batch_requests", "Requests per session run",
                                 boundaries=[float(b) for b in BATCH_BUCKETS], tag_keys=("model",))
        self.url: str | None = None

    def request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {"route": route, "model": model, "status": str(status)})
        self.latency.observe(seconds, {"route": route, "model": model})

    def tokens(self, model: str, kind: str, count: int) -> None:
        if count:
            self.token_count.inc(count, {"model": model, "kind": kind})

    def batch(self, model: str, requests: int) -> None:
        self.batches.observe(requests, {"model": model})

    async def render(self) -> str:
        """The node agent's text (Ray Serve's series and ours); a comment line when it cannot be reached."""
        try:
            self.url = self.url or await asyncio.to_thread(agent_url)
            if self.url is None:
                return "# no metrics agent on this node\n"
            return await asyncio.to_thread(_get, self.url)
        except Exception as exc:  # noqa: BLE001 - /metrics never fails the ingress
            logger.warning("metrics agent unreachable: %s", exc)
            return f"# metrics agent unreachable: {type(exc).__name__}\n"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
