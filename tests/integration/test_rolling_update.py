"""Rolling updates lose nothing: under a steady load of embeddings and completions (plain and streamed), a
forced re-export followed by a redeploy, then a redeploy with a changed runtime env, each replace every
replica of the app, and every request sent meanwhile is answered 200.

Both updates are ``serve.run`` of a freshly built app under the same app name, what ``make serve`` again does
(``serve deploy`` of a changed config rebuilds the app the same way): Serve gives each deployment of an app
deployed from Python a new random version, so it starts replicas of the new version and stops the old ones
(graceful shutdown, serve_app.app.drain_options). The load runs in a thread of its own. With the drain turned
off (graceful_shutdown_timeout_s 0) this test saw 4 requests per update answered 500 by Serve's proxy.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from contract import manifest
from contract.config import ModelConfig, ProjectConfig
from contract.settings import AppConfig, ServerSettings
from serve_app.app import build
from tests.tiny import make_tiny_bert, make_tiny_gpt2

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP = "rolling"
EMBED, GEN = "tiny", "tiny-gen"


@dataclass
class Sent:
    kind: str
    start: float
    end: float
    status: int  # -1: no HTTP answer (connection error, timeout)
    detail: str = ""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectConfig:
    """A tiny BERT (embedding) and a tiny GPT-2 (generation), exported and committed into a tmp artifacts dir."""
    from export_jobs.job import export_one

    base = tmp_path_factory.mktemp("rolling")
    bert = make_tiny_bert(base / "src-bert")
    gpt2 = make_tiny_gpt2(base / "src-gpt2", 128)[0]
    models = (ModelConfig(id=EMBED, source=str(bert)),
              ModelConfig(id=GEN, source=str(gpt2), task="generation", serving={"stream_interval_s": 0}))
    config = ProjectConfig(artifacts=str(base / "artifacts"), models=models)
    for cfg in models:
        manifest.commit(config.artifacts, export_one(cfg, config.artifacts), keep=config.keep_versions)
    return config


def _deploy(project: ProjectConfig) -> float:
    """serve.run of the app built from the manifest as it is now; seconds until Serve called it running."""
    from ray import serve

    app_config = AppConfig(project=project, server=ServerSettings(embed_in_ingress=False, request_timeout_s=30))
    started = time.monotonic()
    serve.run(build(app_config, manifest.load(project.artifacts)), name=APP, route_prefix="/")
    return time.monotonic() - started


def _replicas() -> dict[str, str]:
    """Live replica actors of the app: actor name (unique per replica) -> deployment name."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::") and f"::{APP}#" in name:
            out[name] = name.split("#")[1]
    return out


def _env_of(replicas: dict[str, str], name: str) -> set[str | None]:
    """The value of environment variable ``name`` in each of these replica processes."""
    import ray

    def read(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: os.environ.get(name)), timeout=10)

    return {read(ray.get_actor(replica, namespace="serve")) for replica in replicas}


def _version(url: str) -> str:
    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return next(card for card in cards if card["id"] == EMBED)["version"]


class Load:
    """A few concurrent clients, each sending one request after another until stopped: two embedding clients,
    one plain and one streamed completion client. Every request is recorded with its start and end."""

    def __init__(self, url: str):
        self.url, self.sent, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(self._client(client, "embedding", 0), self._client(client, "embedding", 1),
                                 self._client(client, "completion", 2), self._client(client, "stream", 3))

    async def _client(self, client: httpx.AsyncClient, kind: str, seed: int):
        i = 0
        while not self.stop.is_set():
            i += 1
            start = time.monotonic()
            try:
                status, detail = await getattr(self, f"_{kind}")(client, f"client {seed} request {i}")
            except httpx.HTTPError as exc:
                status, detail = -1, repr(exc)
            self.sent.append(Sent(kind, start, time.monotonic(), status, detail))
            await asyncio.sleep(0.05)  # a bounded load on the 2-core machine

    async def _embedding(self, client, text):
        r = await client.post(f"{self.url}/v1/embeddings", json={"model": EMBED, "input": [text, "and another"]})
        ok = r.status_code == 200 and len(r.json()["data"]) == 2
        return (200 if ok else r.status_code), ("" if ok else r.text[:300])

    async def _completion(self, client, text):
        r = await client.post(f"{self.url}/v1/completions",
                              json={"model": GEN, "prompt": text, "max_tokens": 8, "temperature": 0})
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        return (200 if ok else r.status_code), ("" if ok else r.text[:300])

    async def _stream(self, client, text):
        """A streamed completion counts as answered only if it ends with [DONE] and no error event."""
        body = {"model": GEN, "prompt": text, "max_tokens": 64, "temperature": 0, "stream": True}
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        if r.status_code != 200:
            return r.status_code, "\n".join(lines)[:300]
        events = [json.loads(line[6:]) for line in lines[:-1]] if lines else []
        if not lines or lines[-1] != "data: [DONE]" or any("error" in e for e in events):
            return 599, "\n".join(lines)[-300:]  # a 200 whose stream broke off: lost all the same
        return 200, ""

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=90)

    def during(self, start: float, end: float) -> list[Sent]:
        """Requests whose time in flight overlapped [start, end]."""
        return [s for s in list(self.sent) if s.start <= end and s.end >= start]


def _changed_env(monkeypatch, value: str) -> None:
    """Every deployment of the next build gets runtime_env env_vars {ROLLING_TEST_ENV: value}: what a changed
    ``runtime_env`` in a Serve config does to each replica (the app here is built from Python)."""
    import serve_app.app as app_module
    from serve_app.deployments import ingress as ingress_module

    env = {"runtime_env": {"env_vars": {"ROLLING_TEST_ENV": value}}}
    monkeypatch.setattr(app_module, "_runtime_env", lambda cfg: env)
    real = ingress_module.Ingress

    class Ingress:
        @staticmethod
        def options(**options):
            return real.options(**{**options, "ray_actor_options": {**options["ray_actor_options"], **env}})

    monkeypatch.setattr(ingress_module, "Ingress", Ingress)


def _replaced(before: dict[str, str], timeout_s: float = 60.0) -> dict[str, str]:
    """The app's replicas once none of ``before`` is left (the old ones drain, then stop)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _replicas()
        if not set(now) & set(before):
            return now
        time.sleep(0.5)
    raise AssertionError(f"old replicas still alive after {timeout_s} s: {set(_replicas()) & set(before)}")


def test_reexport_and_env_change_roll_without_losing_a_request(serve_url, project, monkeypatch):
    from ray import serve

    from export_jobs import export_models

    _deploy(project)
    try:
        version_before = _version(serve_url)
        replicas_before = _replicas()
        assert sorted(set(replicas_before.values())) == sorted(["Ingress", f"embed-{EMBED}", f"generate-{GEN}"])
        with Load(serve_url) as load:
            time.sleep(3)  # the load is running before the first update
            # (a) python -m export_jobs --only tiny --force, in-process, then the app again from the new manifest
            a_start = time.monotonic()
            results = export_models(project, only=[EMBED], force=True, out=None)
            assert [r.status for r in results] == ["ok"], results
            a_exported = time.monotonic()
            a_deploy_s = _deploy(project)
            after_a = _replaced(replicas_before)
            a_end = time.monotonic()  # the window closes once the last old replica has stopped
            version_after, env_a = _version(serve_url), _env_of(after_a, "ROLLING_TEST_ENV")
            time.sleep(2)
            # (b) the same app with a changed runtime env: every replica replaced again
            _changed_env(monkeypatch, "2")
            b_start = time.monotonic()
            b_deploy_s = _deploy(project)
            after_b = _replaced(after_a)
            b_end = time.monotonic()
            env_b = _env_of(after_b, "ROLLING_TEST_ENV")
            time.sleep(3)  # and the load goes on after it
        assert sorted(set(after_a.values())) == sorted(set(after_b.values())) == sorted(set(replicas_before.values()))
        served = Path(manifest.load(project.artifacts)[EMBED].directory).name
        assert version_after != version_before and version_after == served  # the new replicas serve the re-export
        assert not set(after_a) & set(replicas_before) and not set(after_b) & set(after_a)
        assert env_a == {None} and env_b == {"2"}  # (b)'s replicas run in the changed runtime env
        windows = {"re-export + redeploy": (a_start, a_end), "redeploy of the export": (a_exported, a_end),
                   "env change redeploy": (b_start, b_end)}
        report = []
        for label, (start, end) in windows.items():
            during = load.during(start, end)
            kinds = {k: sum(s.kind == k for s in during) for k in ("embedding", "completion", "stream")}
            bad = [s for s in during if s.status != 200]
            report.append(f"{label}: {end - start:.1f} s, {len(during)} requests in flight {kinds}, "
                          f"{len(bad)} not 200")
            assert all(kinds.values()), (label, kinds)  # each kind of request overlapped each update
        failed = [s for s in load.sent if s.status != 200]
        print(f"\nrolling: {len(load.sent)} requests, {len(failed)} not 200; serve.run (a) {a_deploy_s:.1f} s, "
              f"(b) {b_deploy_s:.1f} s; replicas {len(replicas_before)} -> {len(after_a)} -> {len(after_b)}, "
              f"all new each time\n  " + "\n  ".join(report))
        assert not failed, [(s.kind, s.status, s.detail, round(s.start - a_start, 1)) for s in failed[:5]]
    finally:
        serve.delete(APP)
