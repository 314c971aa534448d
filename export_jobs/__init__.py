"""Export PyTorch and TensorFlow models to ONNX, prove each export, record it in a manifest.

Public entry points: :func:`export_models` (Ray fan-out) and the ``python -m export_jobs`` CLI.
Importing this package is cheap: torch, TensorFlow and Ray load only when an export runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contract.config import ModelConfig, ProjectConfig, default_config

if TYPE_CHECKING:
    from .run import ExportResult, export_models

__all__ = ["ModelConfig", "ProjectConfig", "default_config", "export_models", "ExportResult"]


def __getattr__(name: str) -> Any:
    if name in ("export_models", "ExportResult"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
