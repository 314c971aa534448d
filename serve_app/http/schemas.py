"""HTTP request/response models, OpenAI-shaped (embeddings, models, completions); rerank in Cohere's and Jina's
shape, classify in vLLM's."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from contract.manifest import ManifestEntry


class Lenient(BaseModel):
    """Unknown fields are refused; an explicit null means the field's default, as at OpenAI."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


Inputs = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
TRUNCATE = Field(None, description="Keep at most this many tokens of each input, special tokens kept "
                                   "(-1: the model's limit). Without it the model's configured rule stands.")


def listed(value: str | list) -> list:
    """One input as a list of inputs: a text, or one list of token ids."""
    return [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)


class EmbeddingRequest(Lenient):

    model: StrictStr = Field(min_length=1, max_length=128)
    input: Inputs = Field(description="A text, a list of texts, or the model's token ids (a list or lists).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension if given.")
    user: StrictStr | None = Field(None, max_length=256)
    truncate_prompt_tokens: int | None = TRUNCATE

    def inputs(self) -> list[str] | list[list[int]]:
        return listed(self.input)


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
    artifact: str  # the ONNX file served (model.onnx, model.int8.onnx...)
    version: str | None = None  # its version directory (UTC publish time): a re-export changes it
    parity_max_abs_diff: float
    labels: list[str] | None = None  # rerank and classify models: their labels (rerank: ["score"])
    parity_score_max_abs_diff: float | None = None  # rerank and classify: on sigmoid / softmax


def model_card(entry: ManifestEntry) -> ModelCard:
    """A served model as /v1/models lists it, from its manifest entry."""
    labels = list(entry.metadata.labels) if entry.metadata.kind == "classifier" else None
    score_diff = entry.parity.details.get("score_max_abs_diff")
    return ModelCard(id=entry.id, created=int(entry.created_at), task=entry.task, dim=entry.dim,
                     max_length=entry.max_length, family=entry.family, labels=labels, artifact=entry.model_file,
                     version=Path(entry.directory).name,
                     parity_max_abs_diff=entry.parity.max_abs_diff,
                     parity_score_max_abs_diff=None if score_diff is None else float(score_diff))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "not ready"]
    models: dict[str, bool] = Field(default_factory=dict)


class StreamOptions(Lenient):

    include_usage: bool = Field(False, description="A last chunk before [DONE] with no choices and the usage.")


class _GenerationRequest(Lenient):
    """Fields shared by completions and chat completions. The fields typed ``Any`` are accepted so that
    ``validate.unsupported`` can refuse them by name (those that would change the output) or ignore them."""

    model: StrictStr = Field(min_length=1, max_length=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Only n=1 is supported.")
    user: StrictStr | None = Field(None, max_length=256)
    # accepted, no effect here
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    # refused unless absent or a no-op value (validate.unsupported)
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_GenerationRequest):
    prompt: Inputs
    max_tokens: int = Field(16, ge=1)
    truncate_prompt_tokens: int | None = TRUNCATE
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    def prompts(self) -> list[str] | list[list[int]]:
        return listed(self.prompt)


class ContentPart(BaseModel):
    """One part of a message's content: text parts are joined, any other type is refused (validate.chat)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant"]  # developer: as system
    content: Annotated[StrictStr, Field(max_length=1_000_000)] | list[ContentPart]
    name: StrictStr | None = Field(None, max_length=256)  # accepted, not rendered


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: Any = None  # accepted, no effect here
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class TokenizeRequest(Lenient):
    """vLLM's /tokenize: a prompt, or (chat models) messages rendered by the chat template."""

    model: StrictStr = Field(min_length=1, max_length=128)
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeRequest(Lenient):
    model: StrictStr = Field(min_length=1, max_length=128)
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str
