"""Serve ONNX artifacts from the manifest with Ray Serve.

``serve run serve_app:graph`` builds the composed app on the default models;
``serve run serve_app:graph config=models.yaml`` on yours.
"""
from .app import AppArgs, graph

__all__ = ["AppArgs", "graph"]
