"""What the routes record, through an interface the ingress supplies: no Ray here.

``Metrics`` is the interface. ``LocalMetrics`` keeps the series in this process (prometheus_client) and renders
them itself: the in-process app and its tests. The Ray ingress supplies ``serve_app.deployments.metrics.
RayMetrics`` instead (ray.util.metrics, rendered with Ray Serve's own series by the node's metrics agent).
``MetricsMiddleware`` times every request and counts it by route, model and status.
"""
from __future__ import annotations

import time
from typing import Protocol

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SKIPPED = ("/metrics", "/health", "/ready", "/docs", "/openapi.json")


class Metrics(Protocol):
    def request(self, route: str, model: str, status: int, seconds: float) -> None: ...

    def tokens(self, model: str, kind: str, count: int) -> None:
        """``kind``: prompt or completion."""

    def batch(self, model: str, requests: int) -> None:
        """Requests one session run took (an embedder's batcher)."""

    async def render(self) -> str:
        """Prometheus text."""


class LocalMetrics:
    """The series in this process's own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("onnx_serve_requests", "HTTP requests by route, model and status",
                                ("route", "model", "status"), registry=self.registry)
        self.latency = Histogram("onnx_serve_request_seconds", "HTTP request latency", ("route", "model"),
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.token_count = Counter("onnx_serve_tokens", "Tokens by model and kind (prompt, completion)",
                                   ("model", "kind"), registry=self.registry)
        self.batches = Histogram("onnx_serve_batch_requests", "Requests per session run", ("model",),
                                 buckets=BATCH_BUCKETS, registry=self.registry)

    def request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)

    def tokens(self, model: str, kind: str, count: int) -> None:
        self.token_count.labels(model, kind).inc(count)

    def batch(self, model: str, requests: int) -> None:
        self.batches.labels(model).observe(requests)

    async def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class MetricsMiddleware:
    """Counts and times each API request (route, the model a route put in the request's state, status). A
    streamed response is timed to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in SKIPPED:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def recorded_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            model = (scope.get("state") or {}).get("model", "")
            self.metrics.request(path, model, status, time.perf_counter() - start)
