"""Ray Serve's throughput mode (HAProxy ingress + direct gRPC between replicas) serves the same API.

The flags are read when Ray starts, so the check runs in a child process with its own Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CHILD = textwrap.dedent("""
    import json, sys, httpx, psutil, ray
    from ray import serve
    from contract import manifest
    from contract.config import ModelConfig, ProjectConfig
    from serve_app.app import build, loopback_in_throughput_mode
    from contract.settings import AppConfig
    root, port = sys.argv[1], int(sys.argv[2])
    loopback_in_throughput_mode(port)  # as graph() does under serve run: Ray, then Serve on 127.0.0.1
    cfg = ModelConfig(id="tiny", source="unused/unused")
    serve.run(build(AppConfig(project=ProjectConfig(artifacts=root, models=(cfg,))), manifest.load(root)),
              name="fast", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    ok = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": ["a", "b c"]}, timeout=60)
    bad = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": []}, timeout=60)
    missing = httpx.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=60)
    ours = {p.pid for p in psutil.Process().children(recursive=True)}  # raylet, actors, HAProxy
    listeners = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    front = sorted({ip for ip, p in listeners if p == port})
    # HAProxy's front, the fallback proxy (8500), the replicas' direct-ingress ports (from 30000)
    exposed = [[ip, p] for ip, p in listeners
               if ip not in ("127.0.0.1", "::1") and (p in (port, 8500) or 30000 <= p < 31000)]
    print(json.dumps({"ok": [ok.status_code, len(ok.json()["data"])], "bad": [bad.status_code, bad.json()],
                      "missing": missing.status_code, "front": front, "exposed": exposed}))
    serve.shutdown()
    ray.shutdown()
""")


def test_throughput_mode_serves_the_same_api_on_loopback(tiny_bert_dir, tmp_path):
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from tests.tiny import free_port

    manifest.commit(tmp_path, export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir)), tmp_path))
    env = dict(os.environ, RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1", RAY_ADDRESS="local")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(free_port())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] == [200, 2]
    assert result["bad"][0] == 400 and result["bad"][1]["error"]["param"] == "input"
    assert result["missing"] == 404
    # Ray makes every interface the default host in this mode; under serve run the builder binds loopback
    assert result["front"] == ["127.0.0.1"] and result["exposed"] == []
