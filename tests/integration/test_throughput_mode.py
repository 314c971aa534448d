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
    import json, sys, httpx, ray
    from ray import serve
    from contract import manifest
    from contract.config import ModelConfig, ProjectConfig
    from serve_app.app import build
    from contract.settings import AppConfig
    root, port = sys.argv[1], int(sys.argv[2])
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="serve")
    serve.start(http_options={"port": port})
    cfg = ModelConfig(id="tiny", source="unused/unused")
    serve.run(build(AppConfig(project=ProjectConfig(artifacts=root, models=(cfg,))), manifest.load(root)),
              name="fast", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    ok = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": ["a", "b c"]}, timeout=60)
    bad = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": []}, timeout=60)
    missing = httpx.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=60)
    print(json.dumps({"ok": [ok.status_code, len(ok.json()["data"])], "bad": [bad.status_code, bad.json()],
                      "missing": missing.status_code}))
    serve.shutdown()
    ray.shutdown()
""")


def test_throughput_mode_serves_the_same_api(tiny_bert_dir, tmp_path):
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from tests.tiny import free_port

    manifest.commit(tmp_path, export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir)), tmp_path))
    env = dict(os.environ, RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(free_port())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] == [200, 2]
    assert result["bad"][0] == 400 and result["bad"][1]["error"]["param"] == "input"
    assert result["missing"] == 404
