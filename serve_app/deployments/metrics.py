"""The metrics interface of ``serve_app.http.metrics`` over Ray: ``ray.util.metrics`` series, exported by each
node's metrics agent beside Ray Serve's own (``ray_serve_*``). GET /metrics on the HTTP port answers with the
serving families of that agent's text for the ingress's node: Ray Serve's and ours, which carry a ``ray_`` prefix
there (``ray_onnx_serve_requests``...). The node's own series (processes by command line, memory, CPU) stay on
the agent's port (``ray start --metrics-export-port``), for a Prometheus inside the cluster: the HTTP port is
public, and they name the host's paths.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from ..http.metrics import SERIES, UPDATE, Recorder

logger = logging.getLogger("serve_app")


def agent_url() -> str | None:
    """The metrics agent of this process's node (``ray start --metrics-export-port`` fixes its port)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


GAUGE_REFRESH_S = 5.0  # Ray's agent drops a gauge value not set again for about 20 s


class RayMetrics(Recorder):
    def __init__(self):
        kinds = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}
        self.series = {}
        for name, (kind, doc, labels, buckets) in SERIES.items():
            extra = {"boundaries": list(buckets)} if buckets else {}
            self.series[name] = kinds[kind](name, doc, tag_keys=labels, **extra)
        self.url: str | None = None
        self._gauges: dict[tuple[str, tuple], tuple[float, dict[str, str]]] = {}
        self._refresher: threading.Thread | None = None

    def _update(self, name: str, value: float, labels: dict[str, str]) -> None:
        series = self.series[name]
        getattr(series, UPDATE[SERIES[name][0]])(value, labels)
        if SERIES[name][0] == "gauge":  # kept, and set again while this process lives
            self._gauges[(name, tuple(sorted(labels.items())))] = (value, labels)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="metrics-gauges", daemon=True)
                self._refresher.start()

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            for (name, _), (value, labels) in list(self._gauges.items()):
                self.series[name].set(value, labels)

    async def render(self) -> str:
        """The node agent's text (Ray Serve's series and ours); a comment line when it cannot be reached."""
        try:
            self.url = self.url or await asyncio.to_thread(agent_url)
            if self.url is None:
                return "# no metrics agent on this node\n"
            return serving_families(await asyncio.to_thread(_get, self.url))
        except Exception as exc:  # noqa: BLE001 - /metrics never fails the ingress
            logger.warning("metrics agent unreachable: %s", exc)
            return f"# metrics agent unreachable: {type(exc).__name__}\n"


SERVING_PREFIXES = ("ray_serve_", "ray_onnx_serve_")


def serving_families(text: str) -> str:
    """The lines of Prometheus text (samples, HELP and TYPE) whose metric name starts with SERVING_PREFIXES."""
    def name(line: str) -> str:
        if line.startswith("#"):
            parts = line.split(None, 3)
            return parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
        return line.split("{", 1)[0].split(" ", 1)[0]

    return "".join(line + "\n" for line in text.splitlines() if name(line).startswith(SERVING_PREFIXES))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
