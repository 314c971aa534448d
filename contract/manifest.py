"""The contract between export and serving: an artifact directory and its manifest.

A manifest entry exists only for an export that passed its parity gate. Files are written into a
staging directory, checked, then moved into place with one rename, as a new version directory
(``<id>/<UTC time>-<suffix>``) beside the older ones; the manifest itself is replaced atomically under a
file lock, and only then are versions past the newest few removed. A crash at any point leaves the
previous entry and files intact.
No torch, no Ray here: serving replicas import this module.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger("contract")
MANIFEST_NAME = "manifest.json"
STAGING_DIR = ".staging"
VERSION_NAME = re.compile(r"\d{8}-\d{6}")  # how publish names a version directory: it sorts by time


class FileInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    bytes: int
    sha256: str


class Parity(BaseModel):
    """What the gate measured: worst absolute difference against the source framework."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float
    tolerance: float
    cases: int
    details: dict[str, float | int | str] = Field(default_factory=dict)


class _Meta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EncoderMeta(_Meta):
    """A token-input encoder: the runtime tokenizes, runs the graph, pools (plain) or reads the pooled output."""

    kind: Literal["encoder"] = "encoder"
    tokenizer: str  # tokenizer.json, relative to the artifact directory
    mode: Literal["plain", "sentence"]
    pooling: str | None = None
    normalize: bool = False
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    pad_token_id: int = 0
    model_type: str
    speed: dict[str, Any] | None = None  # the speed option's build and gate figures
    cpu_file: str | None = None  # optimize: auto: the int8 graph CPU replicas serve instead of model_file


class ClassifierMeta(_Meta):
    """A sequence classifier (task rerank or classify): token ids of a text or a (query, document) pair in,
    logits [n, len(labels)] out; the runtime applies sigmoid (one logit) or softmax."""

    kind: Literal["classifier"] = "classifier"
    tokenizer: str
    labels: tuple[str, ...]  # id2label in index order; ("score",) for a one-logit reranker
    pairs: bool  # rerank: (query, document) pairs; classify: single texts
    truncation: Literal["longest_first", "refuse"] = "longest_first"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ("logits",)
    pad_token_id: int = 0
    model_type: str
    speed: dict[str, Any] | None = None


class StringEncoderMeta(_Meta):
    """A text-input graph (TensorFlow string ops through onnxruntime-extensions): it tokenizes itself."""

    kind: Literal["string_encoder"] = "string_encoder"
    tf_ops: tuple[str, ...] = ()
    onnx_ops: tuple[str, ...] = ()
    custom_ops: str = "onnxruntime-extensions"


class _DecoderMeta(_Meta):
    tokenizer: str
    pad_token_id: int
    add_special_tokens: bool = True
    model_type: str


class DecoderMeta(_DecoderMeta):
    """The dynamic-cache decoder graph; `decoder` is its export info (inference.decode_dynamic.DecoderSession)."""

    kind: Literal["decoder"] = "decoder"
    decoder: dict[str, Any]


class StaticDecoderMeta(_DecoderMeta):
    """The static-cache GroupQueryAttention graph (optimize: fused), or its fp16 / int8 / int4 copy that the
    entry's model_file names; each dict holds that variant's gate figures."""

    kind: Literal["static_decoder"] = "static_decoder"
    static_decoder: dict[str, Any]
    fp16: dict[str, Any] | None = None
    weight_only: dict[str, Any] | None = None


ArtifactMeta = Annotated[Union[EncoderMeta, ClassifierMeta, StringEncoderMeta, DecoderMeta, StaticDecoderMeta],
                         Field(discriminator="kind")]


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    task: Literal["embedding", "generation", "rerank", "classify"]
    family: str
    input_kind: Literal["tokens", "text"] = "tokens"
    source: str
    fingerprint: str
    directory: str = Field(description="relative to the artifacts root")
    model_file: str = "model.onnx"
    files: tuple[FileInfo, ...]
    opset: int
    precision: str = "fp32"
    parity: Parity
    dim: int | None = None
    max_length: int | None = None
    metadata: ArtifactMeta
    created_at: float = Field(default_factory=time.time)

    def model_path(self, root: str | Path) -> Path:
        return Path(root) / self.directory / self.model_file

    def dir_path(self, root: str | Path) -> Path:
        return Path(root) / self.directory


class ManifestError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> tuple[FileInfo, ...]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return tuple(
        FileInfo(name=str(p.relative_to(directory)), bytes=p.stat().st_size, sha256=sha256_file(p))
        for p in files
    )


def load(root: str | Path) -> dict[str, ManifestEntry]:
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    entries = {}
    for key, value in raw.get("models", {}).items():
        try:
            entries[key] = ManifestEntry.model_validate(value)
        except ValidationError as exc:  # written by an older exporter: not served, exported again
            logger.warning("manifest entry %s was written by an older exporter (%s); it will be exported again",
                           key, str(exc).splitlines()[0])
    return entries


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def commit(root: str | Path, entry: ManifestEntry, keep: int | None = None) -> list[str]:
    """Record ``entry`` (whose files are already in place) as the served version of its model.

    ``keep``: then remove the model's version directories past the newest ``keep`` (the one just recorded
    always stays), and return them. Only after the switch: a replica built on the previous entry can still
    start and verify its files while that version is kept. None keeps every version."""
    root = Path(root)
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    if not entry.model_path(root).is_file():
        raise ManifestError(f"{entry.id}: {entry.model_file} missing in {entry.directory}")
    with _locked(root):
        entries = load(root)
        entries[entry.id] = entry
        payload = {"version": 1, "models": {k: v.model_dump(mode="json") for k, v in sorted(entries.items())}}
        _atomic_write_text(root / MANIFEST_NAME, json.dumps(payload, indent=2) + "\n")
        return _prune(root, entry, keep) if keep is not None else []


def versions(root: str | Path, model_id: str) -> list[str]:
    """The model's version directories, oldest first (publish names them by UTC time)."""
    base = Path(root) / model_id
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and VERSION_NAME.match(p.name))


def _prune(root: Path, entry: ManifestEntry, keep: int) -> list[str]:
    current = Path(entry.directory).name
    others = [name for name in versions(root, entry.id) if name != current]
    removed = others[:max(0, len(others) - (keep - 1))]
    for name in removed:
        shutil.rmtree(root / entry.id / name, ignore_errors=True)
        logger.info("%s: removed artifact version %s (keeping the newest %d)", entry.id, name, keep)
    return [f"{entry.id}/{name}" for name in removed]


def verify(root: str | Path, entry: ManifestEntry, only: set[str] | None = None) -> None:
    """Check that every file the entry names (or those of them in ``only``) is there with its recorded size
    and hash."""
    directory = entry.dir_path(root)
    for info in entry.files:
        if only is not None and info.name not in only:
            continue
        path = directory / info.name
        if not path.is_file() or path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
            raise ManifestError(f"{entry.id}: {info.name} is missing or differs from the manifest")


def new_staging(root: str | Path, model_id: str) -> Path:
    path = Path(root) / STAGING_DIR / f"{model_id}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish(root: str | Path, model_id: str, staging: Path) -> str:
    """Move a checked staging directory into place; returns its path relative to ``root``."""
    now = time.time()  # UTC, to the microsecond: the names sort in publish order (versions, _prune)
    version = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}.{int(now % 1 * 1e6):06d}-" \
              + staging.name.rsplit("-", 1)[-1]
    final = Path(root) / model_id / version
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, final)
    return str(final.relative_to(root))


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
