"""HTTP request/response models, OpenAI-shaped (embeddings, models, completions); rerank in Cohere's and Jina's
shape, classify in vLLM's."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from contract.manifest import ManifestEntry


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=128)
    input: StrictStr | list[StrictStr] = Field(description="One text or a list of texts.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension if given.")
    user: StrictStr | None = Field(None, max_length=256)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=128)
    query: StrictStr
    documents: list[StrictStr]
    top_n: int | None = Field(None, ge=1, description="Return the top_n best documents; all if not given.")
    return_documents: bool = False


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=128)
    input: StrictStr | list[StrictStr] = Field(description="One text or a list of texts.")
    user: StrictStr | None = Field(None, max_length=256)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onnx-serve"
    task: str
    dim: int | None = None
    max_length: int | None = None
    family: str
    parity_max_abs_diff: float
    labels: list[str] | None = None  # rerank and classify models: their labels (rerank: ["score"])
    parity_score_max_abs_diff: float | None = None  # rerank and classify: on sigmoid / softmax


def model_card(entry: ManifestEntry) -> ModelCard:
    """A served model as /v1/models lists it, from its manifest entry."""
    labels = list(entry.metadata.labels) if entry.metadata.kind == "classifier" else None
    score_diff = entry.parity.details.get("score_max_abs_diff")
    return ModelCard(id=entry.id, created=int(entry.created_at), task=entry.task, dim=entry.dim,
                     max_length=entry.max_length, family=entry.family, labels=labels,
                     parity_max_abs_diff=entry.parity.max_abs_diff,
                     parity_score_max_abs_diff=None if score_diff is None else float(score_diff))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "not ready"]
    models: dict[str, bool] = Field(default_factory=dict)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="A last chunk before [DONE] with no choices and the usage.")


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1, max_length=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: StrictStr | None = Field(None, max_length=256)

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_GenerationRequest):
    prompt: StrictStr | list[StrictStr]
    max_tokens: int = Field(16, ge=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr = Field(max_length=1_000_000)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256
