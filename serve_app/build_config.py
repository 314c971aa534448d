"""Write the Ray Serve config (what ``serve build`` writes) for a models file, without exporting.

``python -m serve_app.build_config serve_config.yaml --config models.cluster.yaml
--deployed-config /home/ray/models.yaml``: a cluster's config.
``python -m serve_app.build_config deploy/serve_local.yaml --paths-from checkout --http-host 127.0.0.1``:
one machine's, the default models (what ``make serve`` serves) from ``artifacts/`` of the checkout.

``serve build`` cannot do this itself: it imports an ``Application`` while ``serve_app:graph`` is a
builder that needs a manifest (it exports what is missing). Here the same :func:`serve_app.app.build`
runs on placeholder manifest entries: they only fill constructor arguments, which the config never
contains. What the config holds (deployment names and options) comes from the models file alone, so
the file is the same on any machine, artifacts or not. On the cluster, ``serve deploy`` calls
``serve_app:graph`` with the ``args`` written here and reads the real manifest there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from contract import manifest
from contract.config import ModelConfig, Task
from contract.settings import AppConfig, load_app_config

from .app import AppArgs, build

APP_NAME = "onnx-serve"
IMPORT_PATH = "serve_app:graph"


def _placeholder(cfg: ModelConfig) -> manifest.ManifestEntry:
    """Stands in for the real entry when binding; never served, never written out."""
    if cfg.task is Task.generation:
        meta = manifest.DecoderMeta(tokenizer="", pad_token_id=0, model_type="placeholder", decoder={})
    else:
        meta = manifest.EncoderMeta(tokenizer="", mode=cfg.mode.value, inputs=(), outputs=(), model_type="placeholder")
    return manifest.ManifestEntry(
        id=cfg.id, task=cfg.task.value, family="placeholder", source=cfg.source,
        fingerprint=cfg.fingerprint(), directory=".", files=(), opset=cfg.opset,
        parity={"max_abs_diff": 0.0, "tolerance": 0.0, "cases": 0}, metadata=meta, created_at=0.0,
    )


def application_schema(app_config: AppConfig, args: AppArgs) -> dict[str, Any]:
    """One application of a ServeDeploySchema: import path, builder args and deployment options."""
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema

    entries = {cfg.id: _placeholder(cfg) for cfg in app_config.project.models}
    built = build_app(build(app_config, entries), name=APP_NAME)
    schema = ServeApplicationSchema(
        name=APP_NAME, route_prefix="/", import_path=IMPORT_PATH, runtime_env={},
        args=args.model_dump(mode="json"),
        deployments=[deployment_to_schema(d) for d in built.deployments],
    )
    return schema.model_dump(exclude_unset=True)


def render(config: str | None, deployed_config: str | None, export: bool = False, out: str = "serve_config.yaml",
           paths_from: str = "cwd", http_host: str = "0.0.0.0") -> str:
    """The YAML text, with a header that says how to regenerate it (same layout as ``serve build``).
    ``config`` None: the default models."""
    import ray
    from ray.serve.schema import LoggingConfig, ServeDeploySchema
    from ray.serve.scripts import ServeDeploySchemaDumper

    app_config = load_app_config(config)
    args = AppArgs(config=deployed_config, artifacts=app_config.project.artifacts, export=export,
                   paths_from=paths_from, host_defaults=False)
    deploy_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": 8000},
        "logging_config": LoggingConfig().model_dump(),
        "applications": [application_schema(app_config, args)],
    }
    ServeDeploySchema.model_validate(deploy_config)
    command = _command(config, deployed_config, export, out, paths_from, http_host)
    header = (f"# Generated on Ray v{ray.__version__} by `make serve-config`; do not edit by hand.\n"
              f"#   {command}\n"
              f"# Deploy: serve deploy {out}  (from a machine that reaches the head's dashboard)\n\n")
    body = yaml.dump(deploy_config, Dumper=ServeDeploySchemaDumper, default_flow_style=False,
                     sort_keys=False, width=80, indent=2)
    return header + body.rstrip("\n") + "\n"


def _command(config, deployed_config, export, out, paths_from, http_host) -> str:
    """The command line that writes this file again; tests/integration/test_cluster.py runs it."""
    words = ["python -m serve_app.build_config", out]
    if config:
        words += ["--config", config]
    if deployed_config and deployed_config != config:
        words += ["--deployed-config", deployed_config]
    if paths_from != "cwd":
        words += ["--paths-from", paths_from]
    if http_host != "0.0.0.0":
        words += ["--http-host", http_host]
    if export:
        words.append("--export")
    return " ".join(words)


def render_args(args: argparse.Namespace) -> str:
    """:func:`render` for parsed command-line arguments."""
    return render(args.config, args.deployed_config or args.config, args.export,
                  out=args.out if args.out != "-" else "serve_config.yaml", paths_from=args.paths_from,
                  http_host=args.http_host)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.build_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the Serve config (e.g. serve_config.yaml); - for stdout")
    parser.add_argument("--config", help="models YAML file read here (default: the default models, what "
                                          "`make serve` serves)")
    parser.add_argument("--deployed-config",
                        help="path of the same models file on the cluster nodes (default: --config)")
    parser.add_argument("--export", action="store_true",
                        help="let the builder export missing models on deploy (default: export=false, "
                             "run `python -m export_jobs` first)")
    parser.add_argument("--paths-from", choices=("cwd", "checkout"), default="cwd",
                        help="what relative config and artifacts paths are relative to on deploy: the builder's "
                             "working directory, or the source checkout serve_app is imported from")
    parser.add_argument("--http-host", default="0.0.0.0",
                        help="address Serve's proxy binds (default 0.0.0.0: a cluster behind a load balancer)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    text = render_args(args)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
