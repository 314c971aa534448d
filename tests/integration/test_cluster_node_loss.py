"""A node lost under load: the worker node that holds one of the embedder's two replicas is removed (its Ray
processes killed, no drain) while clients keep sending embedding requests.

Every request must be answered, 200 or a 503 with Retry-After, within the client's timeout; 200s resume; Serve
brings the deployment back to its two replicas on the head. The test prints the time from the loss until every
request is a 200 again and until both replicas run.

Placement: a two-node ``ray.cluster_utils.Cluster`` (private_cluster) whose head has 4 CPUs (the ingress takes 2,
one replica 1, one spare for the replacement) and whose worker has 1 CPU: room for one 1-CPU embedder replica and
too little for the ingress, so the ingress (and, with ``proxy_location="HeadOnly"``, the proxy and the controller)
stay on the head. Serve places replicas with Ray's SPREAD strategy, so the two replicas land one per node; the
test checks that before it removes the worker. private_cluster skips when this process already has a Ray
connection: files run in name order, so in ``make test`` this one runs with test_cluster*.py, before any test
connects the shared Ray; alone: ``pytest tests/integration/test_cluster_node_loss.py -s -q``.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.tiny import export_tiny_berts, free_port, private_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP, MODEL = "nodeloss", "tiny"
DEPLOYMENT = f"embed-{MODEL}"
CLIENTS = 4
REQUEST_TIMEOUT_S = 30.0  # the client's; the server's request_timeout_s is 20 s
AFTER_RECOVERY_S = 5.0  # load kept flowing once the deployment is whole again


@dataclass
class Sent:
    start: float
    end: float
    status: int  # -1: no HTTP answer (connection error, client timeout)
    retry_after: str | None = None
    detail: str = ""


def _load(url: str, stop: threading.Event, out: list[Sent]) -> None:
    """CLIENTS clients, each sending one embedding request after another until ``stop``."""
    async def client(n: int, http: httpx.AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            start = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": f"client {n} text {i}"})
                out.append(Sent(start, time.monotonic(), r.status_code, r.headers.get("retry-after"),
                                "" if r.status_code == 200 else r.text[:300]))
            except httpx.HTTPError as exc:
                out.append(Sent(start, time.monotonic(), -1, None, repr(exc)))

    async def main() -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
            await asyncio.gather(*(client(n, http) for n in range(CLIENTS)))

    asyncio.run(main())


def _replicas() -> list:
    """The embedder's replicas as Serve reports them (state, node_id)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return list(details.applications[APP].deployments[DEPLOYMENT].replicas)


def _served_on(replica) -> int:
    """Requests the replica's embedder has run (its batch_stats), read through the replica actor's private
    attributes (Ray 2.60's ReplicaActor): a deployment handle cannot pick a replica."""
    import ray

    actor = ray.get_actor(replica.actor_name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(
        lambda self: sum(self._replica_impl._user_callable_wrapper.user_callable.batch_stats())), timeout=10)


def test_worker_node_lost_under_load(tmp_path):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from contract import manifest
    from contract.config import ModelConfig
    from contract.settings import AppConfig, ServerSettings
    from serve_app.app import build

    with private_cluster({"num_cpus": 4}, ({"num_cpus": 1},)) as (cluster, (worker,)):
        project, results = export_tiny_berts(tmp_path, ids=(MODEL,))
        assert [r.status for r in results] == ["ok"], [r.error for r in results]
        cfg = project.models[0].model_dump()
        cfg["serving"] = {"num_replicas": 2, "num_cpus": 1.0}
        project = project.model_copy(update={"models": (ModelConfig(**cfg),)})
        server = ServerSettings(embed_in_ingress=False, num_cpus=2.0, request_timeout_s=20)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build(AppConfig(project=project, server=server), manifest.load(project.artifacts)),
                      name=APP, route_prefix="/")
            head = cluster.head_node.node_id
            details = ServeInstanceDetails(**_get_global_client().get_serve_details())
            ingress = details.applications[APP].deployments["Ingress"].replicas
            assert [r.node_id for r in ingress] == [head]
            placed = sorted(r.node_id for r in _replicas() if r.state == "RUNNING")
            assert placed == sorted([head, worker.node_id]), f"replicas not one per node: {placed}"
            assert httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "warm"},
                              timeout=REQUEST_TIMEOUT_S).status_code == 200

            sent: list[Sent] = []
            stop = threading.Event()
            load = threading.Thread(target=_load, args=(url, stop, sent), daemon=True)
            load.start()
            time.sleep(3.0)
            on_worker = _served_on(next(r for r in _replicas() if r.node_id == worker.node_id))
            assert on_worker > 0, "the worker's replica got no request before the loss: the test would prove nothing"
            before = len(sent)
            lost_at = time.monotonic()
            cluster.remove_node(worker, allow_graceful=False)
            removed_s = time.monotonic() - lost_at

            whole_at, seen = None, []  # whole: two RUNNING replicas, both on the head
            deadline = lost_at + 120
            while time.monotonic() < deadline:
                seen = [(r.state, r.node_id == head) for r in _replicas()]
                running = [r for r in _replicas() if r.state == "RUNNING"]
                if len(running) == 2 and all(r.node_id == head for r in running):
                    whole_at = time.monotonic()
                    break
                time.sleep(0.25)
            time.sleep(AFTER_RECOVERY_S)
            stop.set()
            load.join(timeout=REQUEST_TIMEOUT_S + 10)
            assert not load.is_alive(), "the load did not finish"
        finally:
            serve.shutdown()

    counts: dict[int, int] = {}
    for s in sent:
        counts[s.status] = counts.get(s.status, 0) + 1
    after_loss = [s for s in sent if s.end >= lost_at]
    bad = [s for s in after_loss if s.status != 200]
    # (a) 200s for every request from: the end of the last answer that was not a 200 (none: the first 200 of a
    # request sent after the loss)
    last_bad = max((s.end for s in bad), default=None)
    first_ok = min((s.end for s in sent if s.start >= lost_at and s.status == 200), default=float("nan"))
    resumed_s = (last_bad if last_bad is not None else first_ok) - lost_at
    in_flight = [s.end - s.start for s in sent if s.start < lost_at <= s.end]  # answered across the loss
    slowest = max(s.end - s.start for s in sent)
    whole_s = whole_at - lost_at if whole_at else float("nan")
    print(f"\nnode loss: {len(sent)} requests ({before} before the loss, {on_worker} of the embedder's by the "
          f"worker's replica, {len(in_flight)} in flight at the loss), "
          f"{counts.get(200, 0)} x 200, {counts.get(503, 0)} x 503, "
          f"other {({k: v for k, v in counts.items() if k not in (200, 503)})}; "
          f"200s for every request {resumed_s:.1f} s after the loss ({len(bad)} non-200 after it); "
          f"two replicas running on the head {whole_s:.1f} s after the loss; slowest request {slowest:.1f} s "
          f"(in flight at the loss: {max(in_flight, default=0):.1f} s); remove_node took {removed_s:.1f} s")

    others = [s for s in sent if s.status not in (200, 503)]
    assert not others, [(s.status, s.detail) for s in others[:5]]  # no 500, no hang (-1: client timeout)
    assert all(s.retry_after for s in sent if s.status == 503), "a 503 without Retry-After"
    assert slowest < REQUEST_TIMEOUT_S
    assert whole_at is not None, f"the deployment did not get back to 2 replicas on the head: (state, on head) {seen}"
    assert [s for s in sent if s.start >= whole_at and s.status == 200], "no 200 after the recovery"
    assert all(s.status == 200 for s in sent if s.start >= whole_at), "non-200 answers after the recovery"

