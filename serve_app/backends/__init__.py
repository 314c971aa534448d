"""The backends the HTTP routes call, one per served model (``base.py`` holds the interface).

``embedding.EmbeddingModel``, ``classifier.ClassifierModel`` (rerank, classify) and ``generation.GenerationModel``
run in this process; ``remote`` reaches an Embedder, Classifier or Generator deployment through its handle. ``specs`` holds what the app builder decides per model.
"""
from .base import Backends, EmbeddingBackend, GenerationBackend, GenerationCall

__all__ = ["Backends", "EmbeddingBackend", "GenerationBackend", "GenerationCall"]
