"""Typed application configuration: the models file plus server limits, checked when the app is built."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from contract.config import ProjectConfig, default_config


class ServerSettings(BaseModel):
    """Request limits and access control for the HTTP ingress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_inputs_per_request: int = Field(2048, ge=1)
    max_input_chars: int = Field(100_000, ge=1, description="Per text, before tokenization.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(60.0, gt=0)
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a completion may ask for.")
    api_keys: tuple[str, ...] = Field((), description="Bearer tokens accepted on /v1/*; with api_keys_env and "
                                      "api_keys_file all empty: no auth.")
    api_keys_env: str | None = Field(None, min_length=1, description="Name of an environment variable of the "
                                     "ingress replicas holding more keys, comma- or newline-separated: the keys "
                                     "stay out of the models file and the Serve config.")
    api_keys_file: str | None = Field(None, min_length=1, description="Path, on the ingress replicas' nodes, of a "
                                      "file of more keys (a mounted secret): one per line, blank lines and # "
                                      "comments ignored.")
    max_ongoing_requests: int = Field(1024, ge=1)
    max_queued_requests: int = Field(2048, ge=-1)
    num_cpus: float = Field(0.25, ge=0.0, description="Logical CPUs each ingress replica reserves.")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas; on a GPU host one ingress, "
                                  "not the model, caps small-request throughput (BENCHMARKS.md).")
    ingress_in_flight: int = Field(2, ge=1, le=64, description="Merged calls each ingress replica keeps open to "
                                   "one embedder: each call costs the embedder's one event loop the same Serve "
                                   "overhead whatever its size, so fewer, larger calls serve more (BENCHMARKS.md, "
                                   "bench/gpu_http.py); two keep the next call queued while one runs.")
    embed_in_ingress: bool | None = Field(None, description="Each ingress replica loads the embedding models "
                                          "itself (with their serving.num_gpus / num_cpus added to its own): no "
                                          "embedder deployment, one hop fewer per request. Generation stays a "
                                          "deployment. None: `serve run serve_app:graph` decides (yes on a small "
                                          "CPU host: serve_app.app.SMALL_HOST_CPUS); build() takes None as no.")


    def accepted_keys(self) -> tuple[str, ...]:
        """Every accepted bearer token: ``api_keys`` plus the env var's and the file's, read now, in the process
        that checks them (the ingress replica, where the secret is mounted). A source that is named but missing
        or empty raises: serving with no auth because a secret was not mounted must not pass silently."""
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += _env_keys(self.api_keys_env)
        if self.api_keys_file:
            keys += _file_keys(self.api_keys_file)
        return tuple(dict.fromkeys(keys))


class ApiKeysUnavailable(RuntimeError):
    """server.api_keys_env or server.api_keys_file names a source that gives no keys."""


def _env_keys(name: str) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        raise ApiKeysUnavailable(f"server.api_keys_env: environment variable {name} is not set")
    keys = [k.strip() for k in value.replace("\n", ",").split(",") if k.strip()]
    if not keys:
        raise ApiKeysUnavailable(f"server.api_keys_env: environment variable {name} holds no keys")
    return keys


def _file_keys(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeysUnavailable(f"server.api_keys_file: cannot read {path}: {exc}") from exc
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ApiKeysUnavailable(f"server.api_keys_file: {path} holds no keys")
    return keys


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    project: ProjectConfig
    server: ServerSettings = ServerSettings()


def load_app_config(path: str | Path | None, artifacts: str | None = None) -> AppConfig:
    """A models YAML may hold ``artifacts``, ``models`` and ``server``; no file: the default models."""
    if path:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        server = raw.pop("server", {})
        project = ProjectConfig.model_validate(raw)
    else:
        server, project = {}, default_config()
    if artifacts:
        project = project.model_copy(update={"artifacts": artifacts})
    return AppConfig(project=project, server=ServerSettings.model_validate(server))
