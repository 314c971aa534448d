"""One small declarative class per architecture: what goes in, what comes out, how close it must be; for a
decoder also the `optimize` options it takes and how the static-cache graph is built from it.

Adding a model family is adding a class here and registering it, not an ``if model_type`` branch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from contract.config import SpeedOption, Task

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
class BertClassifierSpec(BertSpec):
    """*ForSequenceClassification on a BERT-family encoder: token ids of a text or a pair in, logits out.
    Registered for rerank (one logit) and classify (id2label)."""

    task: ClassVar[Task] = Task.classify


@dataclass(frozen=True)
class RobertaClassifierSpec(RobertaSpec):
    task: ClassVar[Task] = Task.classify


STATIC_OPTIONS = (SpeedOption.none, SpeedOption.fused, SpeedOption.fp16, SpeedOption.int8, SpeedOption.int4)


@dataclass
class StaticLayer:
    """One decoder block as the static graph runs it: x + out(GQA(qkv(norm1(x)))), then + mlp(norm2(x))."""

    norm1: Callable
    qkv: Callable  # x -> (q, k, v), each [b, s, heads * head_dim]
    out: Callable
    norm2: Callable
    mlp: Callable
    # GQA local_window_size, -1: global. ONNX Runtime lets a query see local_window_size keys ending at its own:
    # GPT-Neo's window_size exactly (its gate checks it on prompts longer than the window).
    window: int = -1


@dataclass
class StaticBlocks:
    """A loaded model seen as the static graph's parts (export_jobs.static_decoder builds the graph from them)."""

    embed: Callable  # (input_ids, position_ids) -> hidden; position_ids is None for a rotary family
    layers: list[StaticLayer]
    final_norm: Callable
    lm_head: Callable
    rotary_emb: Callable | None = None  # rotary families: the model's own, read once for the cos/sin tables


@dataclass(frozen=True)
class DecoderSpec(ExportSpec):
    """Causal LM with KV cache: one graph for prefill (empty past) and decode steps (export_jobs.decoder_export).

    Every `optimize` option past none builds the static-cache GroupQueryAttention graph instead
    (export_jobs.static_decoder); a family that lists them in `options` says how through `static_blocks`,
    `attention_scale`, `rotary` and `expected_fusions`, and names what its graph cannot do in `static_limit`.
    """

    task: ClassVar[Task] = Task.generation
    options: ClassVar[tuple[SpeedOption, ...]] = (SpeedOption.none,)  # the dynamic-cache graph only
    # True: RoPE, which GQA applies from cos/sin tables (no position_ids input); False: learned absolute positions
    rotary: ClassVar[bool] = True
    # the ORT transformer optimizer's pass set run over the static graph (norms, biases, GELU; not attention)
    ort_model_type: ClassVar[str] = "gpt2"
    tolerance: float = 1e-3
    greedy_tokens: int = 16
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")

    # geometry, read from the model config (LLaMA-style attribute names by default)
    def num_layers(self, config) -> int:
        return config.num_hidden_layers

    def num_heads(self, config) -> int:
        return config.num_attention_heads

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or self.num_heads(config)

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // self.num_heads(config)

    def attention_scale(self, config) -> float:
        return 1 / math.sqrt(self.head_dim(config))

    def static_limit(self, config) -> str | None:
        """What this model has that the family's static graph does not implement; None: nothing."""
        return None

    def refusal(self, option: SpeedOption, config) -> str | None:
        """Why `option` cannot export this model (None: it can), in words for the models file's author."""
        if option not in self.options:
            offered = ", ".join(o.value for o in self.options)
            return f"the {self.family} decoder family supports optimize: {offered}; not {option.value}"
        limit = self.static_limit(config) if option is not SpeedOption.none else None
        if limit:
            return (f"optimize: {option.value} builds the static-cache graph, which does not implement {limit}; "
                    "optimize: none exports the dynamic-cache graph, which does")
        return None

    def static_blocks(self, model) -> StaticBlocks:
        raise UnsupportedModelError(f"the {self.family} decoder family has no static-cache graph")

    def expected_fusions(self, num_layers: int) -> dict[str, int]:
        """Operator -> count that the ORT optimizer must produce over the static graph of `num_layers` layers."""
        return {}


def _separate_qkv(attn):
    """q/k/v from three nn.Linear (their biases, if any, come along)."""
    return lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))


def _conv1d(layer):
    """transformers' GPT-2 Conv1D as a plain 3-D matmul: its own forward flattens through view(-1, ...),
    which exports as Shape/Reshape nodes that the CUDA EP leaves on the CPU (no CUDA graph then)."""
    return lambda x: x @ layer.weight + layer.bias


@dataclass(frozen=True)
class _LearnedPositionsSpec(DecoderSpec):
    """GPT-2's layout (model.transformer: wte + wpe, blocks h, ln_f): learned absolute positions added to the
    token embedding, LayerNorm, tanh GELU."""

    options: ClassVar[tuple[SpeedOption, ...]] = STATIC_OPTIONS
    rotary: ClassVar[bool] = False

    def static_layers(self, model) -> list[StaticLayer]:
        raise NotImplementedError

    def static_blocks(self, model) -> StaticBlocks:
        base = model.transformer
        return StaticBlocks(embed=lambda ids, positions: base.wte(ids) + base.wpe(positions),
                            layers=self.static_layers(model), final_norm=base.ln_f, lm_head=model.lm_head)

    def expected_fusions(self, num_layers: int) -> dict[str, int]:
        # the embedding sum (wte + wpe) folds into the first LayerNorm as its skip input
        return {"SkipLayerNormalization": 2 * num_layers + 1, "FastGelu": num_layers}


@dataclass(frozen=True)
class GPTNeoSpec(_LearnedPositionsSpec):
    """Local (windowed) and global attention layers; the gate's prompts outrun the window."""

    family: ClassVar[str] = "gpt-neo"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neo",)

    def num_layers(self, config) -> int:
        return config.num_layers

    def num_heads(self, config) -> int:
        return config.num_heads

    def attention_scale(self, config) -> float:
        return 1.0  # GPT-Neo does not scale its attention scores

    def static_layers(self, model) -> list[StaticLayer]:
        config = model.config
        return [StaticLayer(b.ln_1, _separate_qkv(b.attn.attention), b.attn.attention.out_proj, b.ln_2, b.mlp,
                            config.window_size if kind == "local" else -1)
                for b, kind in zip(model.transformer.h, config.attention_layers)]


@dataclass(frozen=True)
class GPT2Spec(_LearnedPositionsSpec):
    family: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)

    def num_layers(self, config) -> int:
        return config.n_layer

    def num_heads(self, config) -> int:
        return config.n_head

    def head_dim(self, config) -> int:
        return config.n_embd // config.n_head

    def attention_scale(self, config) -> float:
        return super().attention_scale(config) if config.scale_attn_weights else 1.0

    def static_limit(self, config) -> str | None:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, flag, False):
                return flag
        return None

    def static_layers(self, model) -> list[StaticLayer]:
        width = model.config.n_embd

        def mlp(block):
            return lambda x: _conv1d(block.c_proj)(block.act(_conv1d(block.c_fc)(x)))

        def qkv(c_attn):
            return lambda x: _conv1d(c_attn)(x).split(width, dim=2)

        return [StaticLayer(b.ln_1, qkv(b.attn.c_attn), _conv1d(b.attn.c_proj), b.ln_2, mlp(b.mlp))
                for b in model.transformer.h]


@dataclass(frozen=True)
class LlamaSpec(DecoderSpec):
    """LLaMA layout (model.model: embed_tokens, layers, norm, rotary_emb): RoPE, RMSNorm, grouped-query attention
    (fewer KV heads than query heads). Mistral is LLaMA with a sliding window, which the static graph refuses."""

    family: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral")
    options: ClassVar[tuple[SpeedOption, ...]] = STATIC_OPTIONS

    def static_limit(self, config) -> str | None:
        window = getattr(config, "sliding_window", None)  # None unless the model uses one
        return f"sliding-window attention (sliding_window={window})" if window else None

    def static_blocks(self, model) -> StaticBlocks:
        base = model.model
        layers = [StaticLayer(b.input_layernorm, _separate_qkv(b.self_attn), b.self_attn.o_proj,
                              b.post_attention_layernorm, b.mlp) for b in base.layers]
        return StaticBlocks(embed=lambda ids, positions: base.embed_tokens(ids), layers=layers,
                            final_norm=base.norm, lm_head=model.lm_head, rotary_emb=base.rotary_emb)

    def expected_fusions(self, num_layers: int) -> dict[str, int]:
        # RMSNorm: the first norm has no residual to fold in; every later one does
        return {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2 * num_layers}


@dataclass(frozen=True)
class Qwen2Spec(LlamaSpec):
    """LLaMA layout with biases on the Q/K/V projections (nn.Linear brings them into both graphs; the static
    graph's packed QKV projection adds them as one). Its optional sliding window (use_sliding_window) is
    refused by the static graph, as Mistral's is."""

    family: ClassVar[str] = "qwen2"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)


@dataclass(frozen=True)
class Qwen3Spec(DecoderSpec):
    """LLaMA layout with an RMSNorm on each head's queries and keys, which the static graph does not have."""

    family: ClassVar[str] = "qwen3"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3",)


@dataclass(frozen=True)
class SmolLM3Spec(DecoderSpec):
    """LLaMA layout in which some layers skip RoPE (no_rope_layers); the static graph rotates in every layer."""

    family: ClassVar[str] = "smollm3"
    model_types: ClassVar[tuple[str, ...]] = ("smollm3",)


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
    tasks = (Task.rerank, Task.classify) if spec.task is Task.classify else (spec.task,)
    for task in tasks:
        for model_type in spec.model_types:
            _REGISTRY[(task, model_type)] = spec
    return spec


for _spec in (BertSpec(), RobertaSpec(), BertClassifierSpec(), RobertaClassifierSpec(), GPTNeoSpec(), GPT2Spec(), LlamaSpec(), Qwen2Spec(), Qwen3Spec(),
              SmolLM3Spec(), TfStringSpec()):
    register(_spec)


def spec_for(task: Task, model_type: str) -> ExportSpec:
    try:
        return _REGISTRY[(task, model_type)]
    except KeyError:
        known = sorted(t for k, t in _REGISTRY if k == task)
        raise UnsupportedModelError(
            f"no {task.value} export spec for model type {model_type!r}; known: {known}"
        ) from None


def decoder_spec(model_type: str) -> DecoderSpec:
    """The generation spec registered for `model_type`; UnsupportedModelError (naming the known ones) if none."""
    spec = spec_for(Task.generation, model_type)
    assert isinstance(spec, DecoderSpec)
    return spec


def known_model_types() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task, model_type in _REGISTRY:
        out.setdefault(task.value, []).append(model_type)
    return out
