"""The HTTP ingress deployment: the routes of ``serve_app.http.routes`` over one backend per model, built once
per replica from what ``serve_app.app.build`` decided (``serve_app.backends.specs``)."""
from __future__ import annotations

from typing import Any

import ray
from ray import serve

from contract.settings import ServerSettings

from ..backends.base import Backends
from ..backends.specs import (
    DeployedClassifier,
    DeployedEmbedder,
    DeployedGenerator,
    InIngressEmbedder,
)
from ..http.routes import create_app
from ..http.schemas import ModelCard
from .metrics import RayMetrics


@serve.deployment(name="Ingress")
@serve.ingress()  # the app is built per replica, over its backends (__serve_build_asgi_app__)
class Ingress:
    def __init__(self, cards: list[ModelCard], settings: dict[str, Any],
                 embedders: dict[str, DeployedEmbedder | InIngressEmbedder],
                 generators: dict[str, DeployedGenerator], classifiers: dict[str, DeployedClassifier] | None = None):
        self.settings = ServerSettings.model_validate(settings)
        self.settings.accepted_keys()  # a named key secret that is not mounted here fails the replica, before loading
        self.cards = cards
        use_gpu = bool(ray.get_gpu_ids())  # models held here (embed_in_ingress) get the replica's GPU share
        self.backends = Backends(
            embedders={model: spec.build(self.settings, use_gpu) for model, spec in embedders.items()},
            generators={model: spec.build(self.settings, use_gpu) for model, spec in generators.items()},
            classifiers={model: spec.build(self.settings, use_gpu) for model, spec in (classifiers or {}).items()})
        self.metrics = RayMetrics()

    def __serve_build_asgi_app__(self):
        return create_app(self.backends, self.cards, self.settings, self.metrics)

    def check_health(self) -> None:
        """Ray calls this periodically: a replica whose own sessions no longer run is replaced."""
        self.backends.check()
