"""Build the composed Ray Serve application from a models file and its manifest."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from contract import manifest
from contract.config import SCORING_TASKS, ModelConfig, Task
from contract.settings import AppConfig, load_app_config
from inference.ort import GEMM_REPLAY_TUNING_ENV

logger = logging.getLogger("serve_app")


class AppArgs(BaseModel):
    """Arguments of ``serve run serve_app:graph [config=models.yaml] [artifacts=DIR] [export=false]``.

    ``paths_from``: what a relative ``config`` or artifacts directory is relative to. ``cwd``: the builder's
    working directory (``serve run`` builds in the process you started). ``checkout``: the source checkout
    ``serve_app`` is imported from (``pip install -e .``), whatever directory Ray started the builder in;
    ``serve deploy`` runs the builder as a Ray task, and a committed config cannot hold this machine's
    absolute path (deploy/serve_local.yaml).

    ``host_defaults``: decide what the models file leaves open for this host (``for_this_host``). The generated
    Serve configs say false: they list their deployments, which must be the ones built."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = None
    artifacts: str | None = None
    export: bool = True
    paths_from: Literal["cwd", "checkout"] = "cwd"
    host_defaults: bool = True


class MissingArtifactError(RuntimeError):
    pass


def ensure_artifacts(app_config: AppConfig, export: bool) -> dict[str, manifest.ManifestEntry]:
    """Export (as Ray tasks) whatever the manifest lacks; refuse to serve anything that failed."""
    from export_jobs.job import is_current

    project = app_config.project
    stale = [m.id for m in project.models if not is_current(m, project.artifacts)]
    if stale and export:
        import ray

        from export_jobs import export_models

        if not ray.is_initialized():
            ray.init(namespace="serve")
        results = export_models(project, only=stale)
        failed = [f"{r.id}: {r.error}" for r in results if r.status == "failed"]
        if failed:
            raise MissingArtifactError("exports failed their checks, not serving: " + "; ".join(failed))
    entries = manifest.load(project.artifacts)
    missing = [m.id for m in project.models if m.id not in entries]
    if missing:
        raise MissingArtifactError(f"no checked artifact for {missing}; run `python -m export_jobs`")
    return entries


def user_config(cfg: ModelConfig) -> dict[str, Any]:
    """Batch settings an embedder applies at run time (Embedder.reconfigure / EmbeddingModel.configure)."""
    return {"max_batch_size": cfg.serving.max_batch_size, "batch_wait_timeout_s": cfg.serving.batch_wait_timeout_s,
            "inline_run_tokens": cfg.serving.inline_run_tokens}


def _runtime_env(cfg: ModelConfig) -> dict[str, Any]:
    """Environment ONNX Runtime reads in a replica of this model (GEMM tuning on a GPU)."""
    if cfg.serving.num_gpus > 0 and cfg.serving.gemm_auto_tune:
        return {"runtime_env": {"env_vars": dict(GEMM_REPLAY_TUNING_ENV)}}
    return {}


def deployment_options(cfg: ModelConfig, name: str) -> dict[str, Any]:
    s = cfg.serving
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_gpus": s.num_gpus, "num_cpus": s.num_cpus, **_runtime_env(cfg)},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "user_config": user_config(cfg),
        "health_check_period_s": 10,
    }
    if s.num_replicas == "auto":
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": max(2, s.max_batch_size)}
    else:
        options["num_replicas"] = s.num_replicas
    return options


SERVE_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0  # Ray Serve's default
DRAIN_MARGIN_S = 10.0


def drain_options(server) -> dict[str, Any]:
    """How a replica that Serve stops (a rolling update: ``serve deploy`` of a changed config, ``serve run`` of a
    rebuilt app; a scale-down) lets its requests finish. Serve first takes it out of the routers, then waits,
    checking every ``graceful_shutdown_wait_loop_s`` (Serve's 2 s, kept: the first wait also lets every router
    learn the replica is gone), until nothing is in flight, at most ``graceful_shutdown_timeout_s`` before it
    kills the replica. Serve's 20 s is shorter than the ingress lets a call run (``request_timeout_s``, 60 s by
    default): a call accepted by the old replica would be cut mid-way. So every deployment, ingress and models,
    waits ``request_timeout_s`` plus a margin. A stream is bounded by its ``max_tokens``, not by the timeout: one
    still running past this limit is cut (docs/cluster.md, "Rolling updates")."""
    timeout = max(SERVE_GRACEFUL_SHUTDOWN_TIMEOUT_S, server.request_timeout_s + DRAIN_MARGIN_S)
    return {"graceful_shutdown_timeout_s": timeout}


def build(app_config: AppConfig, entries: dict[str, manifest.ManifestEntry]) -> Application:
    """One deployment per model (unless ``server.embed_in_ingress`` keeps embedding models in the ingress) and
    the Ingress, told which backend each model gets (serve_app.backends.specs)."""
    from .backends.specs import (
        DeployedClassifier,
        DeployedEmbedder,
        DeployedGenerator,
        InIngressEmbedder,
    )
    from .deployments.classifier import Classifier
    from .deployments.embedder import Embedder
    from .deployments.generator import Generator
    from .deployments.ingress import Ingress
    from .http.schemas import model_card

    root = str(Path(app_config.project.artifacts).resolve())
    server = app_config.server
    drain = drain_options(server)
    embedders, generators, classifiers, cards = {}, {}, {}, []
    gpus, cpus = 0.0, server.num_cpus
    for cfg in app_config.project.models:
        entry, serving = entries[cfg.id], cfg.serving
        cards.append(model_card(entry))
        dumped = entry.model_dump(mode="json")
        if cfg.task is Task.embedding and server.embed_in_ingress:
            embedders[cfg.id] = InIngressEmbedder(dumped, root, cfg.truncate, serving.configured_threads,
                                                  serving.cuda_graphs, serving.gemm_auto_tune, user_config(cfg))
            gpus, cpus = gpus + serving.num_gpus, cpus + serving.num_cpus
        elif cfg.task is Task.embedding:
            handle = Embedder.options(**deployment_options(cfg, f"embed-{cfg.id}"), **drain).bind(
                dumped, root, cfg.truncate, serving.configured_threads, serving.cuda_graphs, serving.gemm_auto_tune)
            embedders[cfg.id] = DeployedEmbedder(handle, dumped, root, cfg.truncate, merge=serving.max_batch_size > 1)
        elif cfg.task in SCORING_TASKS:
            handle = Classifier.options(**deployment_options(cfg, f"{cfg.task.value}-{cfg.id}"), **drain).bind(
                dumped, root, cfg.truncate, serving.configured_threads)
            classifiers[cfg.id] = DeployedClassifier(handle, dumped, root, cfg.truncate)
        else:
            handle = Generator.options(**deployment_options(cfg, f"generate-{cfg.id}"), **drain).bind(
                dumped, root, serving.configured_threads, serving.continuous_batching, serving.stream_interval_s,
                serving.gemm_auto_tune)
            generators[cfg.id] = DeployedGenerator(handle, dumped, root)
    actor = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
    ingress = Ingress.options(num_replicas=server.ingress_replicas, max_ongoing_requests=server.max_ongoing_requests,
                              max_queued_requests=server.max_queued_requests, ray_actor_options=actor, **drain)
    return ingress.bind(cards, server.model_dump(mode="json"), embedders, generators, classifiers)


def checkout_root() -> Path:
    """The repository checkout this package is imported from: where ``make serve`` writes ``artifacts/``."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ValueError(f"paths_from: checkout needs serve_app imported from a source checkout (pip install -e .); "
                         f"it is imported from {root}")
    return root


def app_config_of(args: AppArgs) -> AppConfig:
    """The models file and artifacts directory the args name, relative paths resolved as ``paths_from`` says."""
    if args.paths_from == "cwd":
        return load_app_config(args.config, args.artifacts)
    root = checkout_root()
    app_config = load_app_config(str(root / args.config) if args.config else None, args.artifacts)
    project = app_config.project.model_copy(update={"artifacts": str(root / app_config.project.artifacts)})
    return app_config.model_copy(update={"project": project})


def graph(args: AppArgs) -> Application:
    """Ray Serve application builder: ``serve run serve_app:graph``."""
    if isinstance(args, dict):  # called directly from Python
        args = AppArgs.model_validate(args)
    loopback_in_throughput_mode()
    app_config = app_config_of(args)
    app_config = for_this_host(app_config) if args.host_defaults else app_config
    entries = ensure_artifacts(app_config, args.export)
    return build(app_config, entries)


SMALL_HOST_CPUS = 4
LOOPBACK = "127.0.0.1"


def loopback_in_throughput_mode(port: int = 8000) -> None:
    """In throughput mode (RAY_SERVE_ENABLE_HA_PROXY=1) Ray makes every interface Serve's default HTTP host, so
    that HAProxy on other nodes reaches the replicas: under ``serve run serve_app:graph``, which names no host,
    HAProxy's port 8000, each replica's direct-ingress port and the fallback proxy would answer on the network.
    Where ``serve run`` is about to start Serve (no Ray in this process yet), start it here on 127.0.0.1, as
    Serve's default mode binds; ``serve run`` then uses it. A cluster's Serve config names its own host."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    import ray
    from ray import serve

    if ray.is_initialized():  # a Ray task (serve deploy builds there) or a script that set Serve up itself
        return
    ray.init(namespace="serve")
    serve.start(http_options={"host": LOOPBACK, "port": port})  # 8000: serve run's port
    logger.info("throughput mode: Serve started on %s:%d", LOOPBACK, port)


def for_this_host(app_config: AppConfig) -> AppConfig:
    """What the models file leaves open, decided for the host that runs ``serve run``: on a small CPU host (at
    most SMALL_HOST_CPUS cores, no embedding model on a GPU) the ingress holds the embedding models, since the hop
    to an embedder replica costs as much CPU as the model (BENCHMARKS.md, "Small CPU hosts")."""
    server = app_config.server
    if server.embed_in_ingress is not None:
        return app_config
    gpus = any(cfg.serving.num_gpus for cfg in app_config.project.models if cfg.task is Task.embedding)
    small = not gpus and (os.cpu_count() or 1) <= SMALL_HOST_CPUS
    logger.info("embed_in_ingress=%s (%d CPUs, embedding on a GPU: %s)", small, os.cpu_count() or 1, gpus)
    return app_config.model_copy(update={"server": server.model_copy(update={"embed_in_ingress": small})})
