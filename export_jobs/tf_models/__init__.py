"""TensorFlow SavedModels with string ops, built in code for the TF -> ONNX path.

Each builder imports TensorFlow; import it only in a process that will never load
onnxruntime-extensions (see export_jobs.tf_export). Build from the shell:

    python -m export_jobs.tf_models use-multilingual OUTDIR
    python -m export_jobs.tf_models use-large-style OUTDIR
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

# model name -> module holding build(out_dir) -> Path
BUILDERS = {
    "use-multilingual": "export_jobs.tf_models.use_multilingual",
    "use-large-style": "export_jobs.tf_models.use_large_style",
}


def build(name: str, out_dir: str | os.PathLike) -> Path:
    if name not in BUILDERS:
        raise KeyError(f"unknown TF model {name!r}; known: {sorted(BUILDERS)}")
    return importlib.import_module(BUILDERS[name]).build(out_dir)
