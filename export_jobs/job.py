"""Export one model into a staging directory, prove it, then publish it atomically.

A failure anywhere leaves the previous artifact and manifest entry untouched.
"""
from __future__ import annotations

import time
from pathlib import Path

from contract import manifest
from contract.config import SCORING_TASKS, ModelConfig, Task

from .sources import resolve
from .validate import ExportError


def _export_into(cfg: ModelConfig, staging: Path) -> dict:
    resolved = resolve(cfg.source)
    from .tf_job import export_tf, is_savedmodel

    if is_savedmodel(resolved):
        return export_tf(cfg, resolved, staging)
    if cfg.task is Task.generation:
        from .decoder_job import export_decoder_model

        return export_decoder_model(cfg, resolved, staging)
    if cfg.task in SCORING_TASKS:
        from .classifier_job import export_classifier

        return export_classifier(cfg, resolved, staging)
    from .encoder_job import export_encoder

    return export_encoder(cfg, resolved, staging)


def export_one(cfg: ModelConfig, root: str | Path) -> manifest.ManifestEntry:
    """Export ``cfg`` under ``root`` and return its (not yet committed) manifest entry."""
    root = Path(root)
    staging = manifest.new_staging(root, cfg.id)
    try:
        fields = _export_into(cfg, staging)
        files = manifest.describe_files(staging)
        if not files:
            raise ExportError(f"{cfg.id}: the export wrote no files")
        directory = manifest.publish(root, cfg.id, staging)
    except BaseException:
        manifest.discard(staging)
        raise
    return manifest.ManifestEntry(
        id=cfg.id, task=cfg.task.value, source=cfg.source, fingerprint=cfg.fingerprint(),
        directory=directory, files=files, opset=fields.pop("opset", cfg.opset),
        precision=fields.pop("precision", "fp32"), created_at=time.time(), **fields,
    )


def is_current(cfg: ModelConfig, root: str | Path) -> bool:
    """True when the manifest already holds a checked export of exactly this configuration."""
    entry = manifest.load(root).get(cfg.id)
    return entry is not None and entry.fingerprint == cfg.fingerprint() and entry.model_path(root).is_file()
