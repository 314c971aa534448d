"""Export one TensorFlow string-input model (tokenizer inside the graph) and prove it against TF.

TensorFlow and ONNX Runtime each run in child processes (see tf_export); this module imports neither.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from contract.config import ModelConfig

from .sources import ResolvedSource
from .specs import TfStringSpec, spec_for
from .tf_export import build_saved_model, export_savedmodel, validate_string_model


def is_savedmodel(resolved: ResolvedSource) -> bool:
    return resolved.kind == "builtin" or (
        resolved.kind == "local" and (Path(resolved.location) / "saved_model.pb").is_file())


def _output_dim(onnx_path: Path) -> int | None:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value or None


def export_tf(cfg: ModelConfig, resolved: ResolvedSource, staging: Path) -> dict[str, Any]:
    spec = spec_for(cfg.task, "tf-savedmodel")
    assert isinstance(spec, TfStringSpec)
    workdir = staging.parent / f"{staging.name}-savedmodel"  # beside staging: not part of the artifact
    try:
        if resolved.kind == "builtin":
            saved_model = build_saved_model(resolved.location, workdir)
        else:
            saved_model = Path(resolved.location)
        opset = min(cfg.opset, spec.opset)  # tf2onnx with the extensions opset is proven up to 17
        report = export_savedmodel(saved_model, staging / "model.onnx", opset=opset)
        tolerance = cfg.tolerance or spec.tolerance
        figures = validate_string_model(saved_model, staging / "model.onnx", tolerance=tolerance)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "family": spec.family,
        "input_kind": "text",
        "opset": opset,
        "dim": _output_dim(staging / "model.onnx"),
        "parity": {"max_abs_diff": figures["max_abs_diff"], "tolerance": tolerance, "cases": figures["cases"]},
        "metadata": {"kind": "string_encoder", "tf_ops": sorted(set(report.tf_ops)), "onnx_ops": sorted(set(report.onnx_ops)),
                     "custom_ops": "onnxruntime-extensions"},
    }
