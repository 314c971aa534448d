"""What ``serve_app.app.build`` decides for each model, and how an ingress replica builds that backend, once.

Three kinds: an embedding model in the ingress's own process (``server.embed_in_ingress``), an Embedder
deployment, a Generator deployment. The specs travel to the replicas as constructor arguments; a deployment's
handle is bound in them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract import manifest
from contract.settings import ServerSettings

from .base import EmbeddingBackend, GenerationBackend


@dataclass(frozen=True)
class InIngressEmbedder:
    """The ingress replica holds the session itself (``EmbeddingModel``): no embedder deployment, one hop fewer."""

    entry: dict[str, Any]
    root: str
    truncate: bool = False
    threads: int | None = None
    cuda_graphs: bool = True
    gemm_auto_tune: bool = True
    user_config: dict[str, Any] = field(default_factory=dict)

    def build(self, settings: ServerSettings, use_gpu: bool) -> EmbeddingBackend:
        from .embedding import EmbeddingModel

        model = EmbeddingModel(self.entry, self.root, truncate=self.truncate, use_gpu=use_gpu,
                               threads=self.threads, cuda_graphs=self.cuda_graphs,
                               gemm_auto_tune=self.gemm_auto_tune)
        model.configure(self.user_config)
        return model


@dataclass(frozen=True)
class DeployedEmbedder:
    """An Embedder deployment (``handle``). The ingress prepares each request with the artifact's tokenizer
    (token-input graphs) or passes the texts (string-input graphs, which tokenize themselves); ``merge``
    (the model's ``max_batch_size`` > 1): see ``remote.RemoteEmbedding``."""

    handle: Any
    entry: dict[str, Any]
    root: str
    truncate: bool = False
    merge: bool = True

    def build(self, settings: ServerSettings, use_gpu: bool) -> EmbeddingBackend:
        from .remote import RemoteEmbedding

        return RemoteEmbedding(self.handle, self._preparer(), merge=self.merge,
                               in_flight=settings.ingress_in_flight, timeout_s=settings.request_timeout_s)

    def _preparer(self):
        entry = manifest.ManifestEntry.model_validate(self.entry)
        if entry.input_kind == "text":
            from inference.string_encoder import TextOnly

            return TextOnly(entry.id)
        from inference.encoder import TextPreparer

        manifest.verify(self.root, entry, only={entry.metadata.tokenizer})  # what passed the gate
        return TextPreparer(entry, self.root, truncate=self.truncate)


@dataclass(frozen=True)
class DeployedClassifier:
    """A Classifier deployment (task rerank or classify); the ingress tokenizes with the artifact's tokenizer."""

    handle: Any
    entry: dict[str, Any]
    root: str
    truncate: bool = True

    def build(self, settings: ServerSettings, use_gpu: bool):
        from inference.classifier import PairPreparer

        from .remote import RemoteClassifier

        entry = manifest.ManifestEntry.model_validate(self.entry)
        manifest.verify(self.root, entry, only={entry.metadata.tokenizer})  # what passed the gate
        return RemoteClassifier(self.handle, PairPreparer.from_entry(entry, self.root, self.truncate), entry.task,
                                tuple(entry.metadata.labels), in_flight=settings.ingress_in_flight,
                                timeout_s=settings.request_timeout_s)


@dataclass(frozen=True)
class DeployedGenerator:
    """A Generator deployment (``handle``); it checks each request against the model before decoding. The
    ingress loads the artifact's tokenizer and chat template too, for /tokenize and /detokenize."""

    handle: Any
    entry: dict[str, Any]
    root: str

    def build(self, settings: ServerSettings, use_gpu: bool) -> GenerationBackend:
        from inference.tokens import PromptTokenizer

        from .remote import RemoteGeneration

        entry = manifest.ManifestEntry.model_validate(self.entry)
        manifest.verify(self.root, entry, only={entry.metadata.tokenizer})  # what passed the gate
        return RemoteGeneration(self.handle, PromptTokenizer(entry, self.root))
