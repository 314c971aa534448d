"""Where a model's weights come from: hub id, local directory, or a Python package that ships them."""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["hub", "local", "package", "builtin"]
    location: str  # hub id, or an absolute directory
    gguf_file: str | None = None  # set when the weights are a single GGUF file in ``location``

    @property
    def offline(self) -> bool:
        return self.kind != "hub"


def _package_dir(dist_name: str) -> tuple[Path, str | None]:
    """Find the model directory inside an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceError(f"package {dist_name!r} is not installed (pip install {dist_name})") from exc
    files = [Path(str(dist.locate_file(f))) for f in dist.files or ()]
    ggufs = sorted(p for p in files if p.suffix == ".gguf")
    if ggufs:
        return ggufs[0].parent, ggufs[0].name
    configs = sorted((p for p in files if p.name == "config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise SourceError(f"package {dist_name!r} holds no config.json or .gguf model")
    return configs[0].parent, None


def resolve(source: str) -> ResolvedSource:
    if source.startswith("package:"):
        directory, gguf = _package_dir(source.removeprefix("package:"))
        return ResolvedSource("package", str(directory), gguf)
    if source.startswith("builtin:"):
        return ResolvedSource("builtin", source.removeprefix("builtin:"))
    path = Path(os.path.expanduser(source))
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source!r} is a file; give the model's directory")
        ggufs = sorted(path.glob("*.gguf"))
        return ResolvedSource("local", str(path.resolve()), ggufs[0].name if ggufs else None)
    if source.count("/") == 1 and not source.startswith(("/", ".")):
        return ResolvedSource("hub", source)
    raise SourceError(f"{source!r} is neither a local directory, a hub id, package: nor builtin:")
