"""``python -m export_jobs [--config models.yaml] [--artifacts DIR] [--only ID ...] [--force] [--keep-versions N]``

A re-export writes a new version directory beside the served one and switches the manifest to it; then
versions past the newest N (models file ``keep_versions``, default 2) are removed."""
from __future__ import annotations

import argparse
import sys

from contract.config import ProjectConfig, default_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnx-export", description=__doc__)
    parser.add_argument("--config", help="models YAML file (default: the built-in default models)")
    parser.add_argument("--artifacts", help="artifact directory (overrides the config's)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="export only these model ids")
    parser.add_argument("--force", action="store_true", help="export even when the manifest is current")
    parser.add_argument("--keep-versions", type=int, metavar="N",
                        help="artifact versions kept per model, the served one included (overrides the config's)")
    parser.add_argument("--gpus-per-task", type=float, default=None,
                        help="GPUs each export asks for (default: 1 if the live cluster has GPUs, else 0)")
    parser.add_argument("--address", help="Ray cluster address (default: start or join a local one)")
    args = parser.parse_args(argv)
    config = ProjectConfig.from_yaml(args.config) if args.config else default_config()
    if args.artifacts:
        config = config.model_copy(update={"artifacts": args.artifacts})
    if args.keep_versions is not None:
        config = ProjectConfig.model_validate({**config.model_dump(), "keep_versions": args.keep_versions})
    import ray

    from .run import export_models

    ray.init(address=args.address, log_to_driver=False)
    results = export_models(config, only=args.only, force=args.force, num_gpus=args.gpus_per_task,
                            out=sys.stdout)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
