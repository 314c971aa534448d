"""Session fixtures for the TensorFlow string-op path: each SavedModel is built and
exported once per session, in child processes (this process never imports TF)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from export_jobs.tf_export import TfExportReport, build_saved_model, export_savedmodel


@dataclass(frozen=True)
class TfArtifact:
    saved_model_dir: Path
    report: TfExportReport

    @property
    def onnx_path(self) -> Path:
        return self.report.onnx_path


def _export(tmp_path_factory, name: str) -> TfArtifact:
    root = tmp_path_factory.mktemp(name)
    saved_model = build_saved_model(name, root / "saved_model")
    return TfArtifact(saved_model, export_savedmodel(saved_model, root / f"{name}.onnx"))


@pytest.fixture(scope="session")
def use_multilingual(tmp_path_factory) -> TfArtifact:
    return _export(tmp_path_factory, "use-multilingual")


@pytest.fixture(scope="session")
def use_large_style(tmp_path_factory) -> TfArtifact:
    return _export(tmp_path_factory, "use-large-style")
