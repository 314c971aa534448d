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

    def batch(self, model: str, requests: int, waits: list[float]) -> None:
        """One session run of a model's batcher: the requests it took, and how long each of its items waited."""

    def generation(self, model: str, first_token_s: float, per_token_s: float | None) -> None:
        """One finished generation: time to its first token, then per output token after it."""

    def served(self, model: str, artifact: str, parity_max_abs_diff: float) -> None:
        """What a served model's export passed: its gate's worst difference against the source framework."""

    async def render(self) -> str:
        """Prometheus text."""


# name: (kind, help, labels, buckets). Both implementations build these; Ray prefixes them with ``ray_``.
SERIES: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "onnx_serve_requests": ("counter", "HTTP requests by route, model and status", ("route", "model", "status"), None),
    "onnx_serve_request_seconds": ("histogram", "HTTP request latency", ("route", "model"), LATENCY_BUCKETS_S),
    "onnx_serve_tokens": ("counter", "Tokens by model and kind (prompt, completion)", ("model", "kind"), None),
    "onnx_serve_batch_requests": ("histogram", "Requests per session run", ("model",), BATCH_BUCKETS),
    "onnx_serve_queue_wait_seconds": ("histogram", "Time a request waited in its model's batcher",
                                      ("model",), LATENCY_BUCKETS_S),
    "onnx_serve_time_to_first_token_seconds": ("histogram", "Time from a checked request to its first token",
                                               ("model",), LATENCY_BUCKETS_S),
    "onnx_serve_time_per_output_token_seconds": ("histogram", "Time per output token after the first",
                                                 ("model",), LATENCY_BUCKETS_S),
    "onnx_serve_parity_max_abs_diff": ("gauge", "A served export's gate: worst absolute difference to its "
                                       "source framework", ("model", "artifact"), None),
}
UPDATE = {"counter": "inc", "histogram": "observe", "gauge": "set"}  # the method that records a value


class Recorder:
    """The recording half of ``Metrics`` over a table of series objects (``series[name]``) and a way to
    update one (``_update(name, value, labels)``)."""

    series: dict

    def _update(self, name: str, value: float, labels: dict[str, str]) -> None:
        raise NotImplementedError

    def request(self, route: str, model: str, status: int, seconds: float) -> None:
        self._update("onnx_serve_requests", 1, {"route": route, "model": model, "status": str(status)})
        self._update("onnx_serve_request_seconds", seconds, {"route": route, "model": model})

    def tokens(self, model: str, kind: str, count: int) -> None:
        if count:
            self._update("onnx_serve_tokens", count, {"model": model, "kind": kind})

    def batch(self, model: str, requests: int, waits: list[float]) -> None:
        self._update("onnx_serve_batch_requests", requests, {"model": model})
        for wait in waits:
            self._update("onnx_serve_queue_wait_seconds", wait, {"model": model})

    def generation(self, model: str, first_token_s: float, per_token_s: float | None) -> None:
        self._update("onnx_serve_time_to_first_token_seconds", first_token_s, {"model": model})
        if per_token_s is not None:
            self._update("onnx_serve_time_per_output_token_seconds", per_token_s, {"model": model})

    def served(self, model: str, artifact: str, parity_max_abs_diff: float) -> None:
        self._update("onnx_serve_parity_max_abs_diff", parity_max_abs_diff, {"model": model, "artifact": artifact})


class LocalMetrics(Recorder):
    """The series in this process's own registry."""

    def __init__(self):
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        kinds = {"counter": prometheus_client.Counter, "histogram": prometheus_client.Histogram,
                 "gauge": prometheus_client.Gauge}
        self.series = {}
        for name, (kind, doc, labels, buckets) in SERIES.items():
            extra = {"buckets": buckets} if buckets else {}
            self.series[name] = kinds[kind](name, doc, labels, registry=self.registry, **extra)

    def _update(self, name: str, value: float, labels: dict[str, str]) -> None:
        series = self.series[name].labels(**labels)
        getattr(series, UPDATE[SERIES[name][0]])(value)

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
