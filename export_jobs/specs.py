"""One small declarative class per architecture: what goes in, what comes out, how close it must be.

Adding a model family is adding a class here and registering it, not an ``if model_type`` branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from contract.config import Task

BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ExportSpec:
    family: ClassVar[str]
    task: ClassVar[Task]
    model_types: ClassVar[tuple[str, ...]]
    tolerance: float = 1e-4


@dataclass(frozen=True)
class EncoderSpec(ExportSpec):
    """Token ids in; hidden states (plain) or one pooled vector (sentence) out."""

    task: ClassVar[Task] = Task.embedding
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        return {name: {0: BATCH, 1: SEQUENCE} for name in self.inputs}


@dataclass(frozen=True)
class BertSpec(EncoderSpec):
    family: ClassVar[str] = "bert"
    model_types: ClassVar[tuple[str, ...]] = ("bert", "electra")


@dataclass(frozen=True)
class RobertaSpec(EncoderSpec):
    """Encoders whose tokenizer gives no token_type_ids."""

    family: ClassVar[str] = "roberta"
    model_types: ClassVar[tuple[str, ...]] = ("roberta", "xlm-roberta", "camembert", "mpnet", "distilbert")
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class DecoderSpec(ExportSpec):
    """Causal LM with KV cache: one graph for prefill (empty past) and decode steps."""

    task: ClassVar[Task] = Task.generation
    tolerance: float = 1e-3
    greedy_tokens: int = 16
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
    cache_inputs: str = "past_key_values.{i}.{kind}"
    cache_outputs: str = "present.{i}.{kind}"


    # KV cache geometry, read from the model config (LLaMA-style attribute names by default)
    def num_layers(self, config) -> int:
        return config.num_hidden_layers

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class GPTNeoSpec(DecoderSpec):
    """Local (windowed) and global attention layers; the gate's prompts outrun the window."""

    family: ClassVar[str] = "gpt-neo"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neo",)

    def num_layers(self, config) -> int:
        return config.num_layers

    def num_kv_heads(self, config) -> int:
        return config.num_heads

    def head_dim(self, config) -> int:
        return config.hidden_size // config.num_heads


@dataclass(frozen=True)
class GPT2Spec(DecoderSpec):
    family: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)

    def num_layers(self, config) -> int:
        return config.n_layer

    def num_kv_heads(self, config) -> int:
        return config.n_head

    def head_dim(self, config) -> int:
        return config.n_embd // config.n_head


@dataclass(frozen=True)
class LlamaSpec(DecoderSpec):
    """LLaMA-style: RoPE, grouped-query attention (fewer KV heads than query heads)."""

    family: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


@dataclass(frozen=True)
class TfStringSpec(ExportSpec):
    """TensorFlow SavedModel taking raw strings (tokenizer inside the graph)."""

    family: ClassVar[str] = "tf-string-encoder"
    task: ClassVar[Task] = Task.embedding
    model_types: ClassVar[tuple[str, ...]] = ("tf-savedmodel",)
    tolerance: float = 1e-5
    opset: int = 17


_REGISTRY: dict[tuple[Task, str], ExportSpec] = {}


def register(spec: ExportSpec) -> ExportSpec:
    for model_type in spec.model_types:
        _REGISTRY[(spec.task, model_type)] = spec
    return spec


for _spec in (BertSpec(), RobertaSpec(), GPTNeoSpec(), GPT2Spec(), LlamaSpec(), TfStringSpec()):
    register(_spec)


def spec_for(task: Task, model_type: str) -> ExportSpec:
    try:
        return _REGISTRY[(task, model_type)]
    except KeyError:
        known = sorted(t for k, t in _REGISTRY if k == task)
        raise UnsupportedModelError(
            f"no {task.value} export spec for model type {model_type!r}; known: {known}"
        ) from None


def known_model_types() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task, model_type in _REGISTRY:
        out.setdefault(task.value, []).append(model_type)
    return out
