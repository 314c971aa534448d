"""Serve ONNX artifacts from the manifest with Ray Serve.

``serve run serve_app:graph`` builds the composed app on the default models;
``serve run serve_app:graph config=models.yaml`` on yours.

`graph` and `AppArgs` load on first use, so that the runtime modules (inference.decode_dynamic,
inference.encoder, ...) import with numpy + onnxruntime alone, without Ray.
"""
from __future__ import annotations

__all__ = ["AppArgs", "graph"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
