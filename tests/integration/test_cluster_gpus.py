"""Several GPUs on one host: a Ray node with 2 logical GPUs (no GPU is needed) under a private RAY_TMPDIR.

Exports take one GPU each and run side by side; replicas with fractional `num_gpus` shares pack onto the GPUs
of the host, several models per GPU, and each replica sees the GPU Ray gave it.
"""
from __future__ import annotations

import pytest

from tests.tiny import export_tiny_berts, free_port, private_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def host():
    """One node: 4 CPUs, 2 logical GPUs."""
    with private_cluster({"num_cpus": 4, "num_gpus": 2}) as (cluster, _):
        yield cluster


@pytest.fixture(scope="module")
def exported(host, tmp_path_factory):
    return export_tiny_berts(tmp_path_factory.mktemp("gpus"))


def test_exports_take_one_gpu_each_and_run_side_by_side(exported):
    from export_jobs.run import summary_table

    project, results = exported
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert sorted(r.gpus for r in results) == [("0",), ("1",)]  # the live cluster has GPUs: one each
    assert max(r.started for r in results) < min(r.finished for r in results), "exports did not overlap"
    table = summary_table(results).splitlines()
    column = table[0].index(" gpu ") + 1  # the summary shows which GPU each export ran on
    assert sorted(row[column:].split()[0] for row in table[1:]) == ["0", "1"]


def test_two_models_pack_half_gpu_replicas_onto_the_hosts_gpus(host, exported):
    import httpx
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from contract import manifest
    from contract.config import ModelConfig, ServingOptions
    from contract.settings import AppConfig
    from serve_app.app import build

    project, _ = exported
    serving = ServingOptions(num_replicas=2, num_gpus=0.5, num_cpus=0.5)
    models = tuple(ModelConfig(**{**m.model_dump(), "serving": serving}) for m in project.models)
    app = build(AppConfig(project=project.model_copy(update={"models": models})), manifest.load(project.artifacts))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="gpus", route_prefix="/")
        details = ServeInstanceDetails(**_get_global_client().get_serve_details())
        for model in ("tiny-a", "tiny-b"):
            replicas = details.applications["gpus"].deployments[f"embed-{model}"].replicas
            assert len(replicas) == 2 and all(r.state == "RUNNING" for r in replicas)
        assert ray.available_resources().get("GPU", 0) == 0  # 4 replicas x 0.5: both GPUs fully shared out
        seen = set()  # each replica sees the one GPU it shares; 2 GPUs of work need both
        for model in ("tiny-a", "tiny-b"):
            embedder = serve.get_deployment_handle(f"embed-{model}", app_name="gpus")
            seen |= {tuple(embedder.info.remote().result()["gpu_ids"]) for _ in range(40)}
        assert seen == {("0",), ("1",)}
        for model in ("tiny-a", "tiny-b"):
            response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": model, "input": "hi"},
                                  timeout=60)
            assert response.status_code == 200, response.text
    finally:
        serve.shutdown()
