"""Causal LM -> a decoder graph built for ONNX Runtime's fast path (the `fused` speed option).

Every attention is one `com.microsoft.GroupQueryAttention` node over a static KV cache: past and
present are the same preallocated buffer [batch, kv_heads, max_length, head_dim], which GQA
writes in place (no concatenation, no reallocation per step). Nothing in the graph reads a
shape, so every node stays on the CUDA EP and a decode step (fixed shapes) can be captured as
one CUDA graph. The graph also picks each row's last real position and returns its logits and
greedy token, so a decode step moves a few bytes to the host instead of the whole logits.

Inputs:  input_ids [b, s] int64, position_ids [b, s] int64 (absent for RoPE models: GQA rotates),
         seqlens_k [b] int32 (tokens in the cache after this call, minus 1, per row),
         total_sequence_length [] int32 (the longest of those + 1; read on the host),
         last_index [b, 1] int64 (position in this call whose logits come out: len-1 at prefill, 0 after),
         past.{i}.key / .value [b, kv_heads, max_length, head_dim]
Outputs: logits [b, vocab] float32, next_token [b] int64,
         next_input_ids [b, 1], next_position_ids [b, 1] (absent for RoPE models), next_seqlens_k [b]:
         the next decode step's inputs, computed on the device (greedy token, position and length + 1),
         present.{i}.key / .value (same buffers as past)

Prompts are right-padded (GQA reads each row's length from seqlens_k; the cache slots after a
short row's end are overwritten by its own next tokens before anything reads them).
Supported: GPT-Neo (local layers: local_window_size = window_size, scale 1), GPT-2, LLaMA-style
(RoPE inside GQA from cos/sin tables, grouped KV heads).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch

from .decoder_export import JsonInfo, check_io, eos_ids, needs_external_data, save_graph

INFO_FILE = "static_decoder.json"
SUPPORTED = ("gpt_neo", "gpt2", "llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class StaticDecoderInfo(JsonInfo):
    info_file: ClassVar[str] = INFO_FILE
    tuple_fields: ClassVar[tuple[str, ...]] = ("eos_token_ids",)

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_length: int  # cache slots; also the longest prompt + generation the graph serves
    eos_token_ids: tuple[int, ...]
    dtype: str  # KV cache dtype (numpy name)
    opset: int
    external_data: bool
    fused_operators: dict[str, int] = dataclasses.field(default_factory=dict)


def io_names(num_layers: int, positions: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """positions: False for RoPE models, whose GQA node derives positions from seqlens_k itself."""
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    first = ("input_ids", "position_ids") if positions else ("input_ids",)
    step = ("next_input_ids", "next_position_ids") if positions else ("next_input_ids",)
    return ((*first, "seqlens_k", "total_sequence_length", "last_index", *past),
            ("logits", "next_token", *step, "next_seqlens_k", *present))


# --- ONNX Runtime contrib ops, traced through autograd Functions -------------------------


class _GroupQueryAttention(torch.autograd.Function):
    """Traced as one GQA node; the torch forward only has to give the right shapes."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, attrs):  # noqa: ARG004
        return q.clone(), past_k.clone(), past_v.clone()

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, attrs):
        num_heads, kv_heads, scale, window, rotary = attrs
        extra = (cos, sin) if rotary else ()
        out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, *extra,
                           num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
                           local_window_size_i=window, do_rotary_i=int(rotary), rotary_interleaved_i=0, outputs=3)
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


class _GatherLast(torch.autograd.Function):
    """hidden [b, s, h], index [b, 1] -> hidden[row, index[row]]: GatherND(batch_dims=1), no shape ops."""

    @staticmethod
    def forward(ctx, hidden, index):  # noqa: ARG004
        return hidden[torch.arange(hidden.shape[0]), index[:, 0]]

    @staticmethod
    def symbolic(g, hidden, index):
        return g.op("GatherND", hidden, index, batch_dims_i=1)


# --- per-architecture blocks -------------------------------------------------------------


def _conv1d(layer):
    """transformers' GPT-2 Conv1D as a plain 3-D matmul: its own forward flattens through view(-1, ...),
    which exports as Shape/Reshape nodes that the CUDA EP leaves on the CPU (no CUDA graph then)."""
    return lambda x: torch.matmul(x, layer.weight) + layer.bias


def _gpt2_mlp(mlp):
    return lambda x: _conv1d(mlp.c_proj)(mlp.act(_conv1d(mlp.c_fc)(x)))


@dataclasses.dataclass
class _Layer:
    norm1: torch.nn.Module
    qkv: object  # x -> (q, k, v), each [b, s, heads * head_dim]
    out: object  # x -> x
    norm2: torch.nn.Module
    mlp: object  # x -> x
    # GQA local_window_size: -1 global. ONNX Runtime's kernels (CPU 1.32, CUDA 1.31) let a query see
    # local_window_size keys ending at its own: GPT-Neo's window_size exactly (the gate proves it).
    window: int


class _StaticDecoder(torch.nn.Module):
    def __init__(self, model, max_length: int):
        super().__init__()
        self.model = model
        config = model.config
        kind = config.model_type
        if kind not in SUPPORTED:
            raise ValueError(f"the static-cache decoder supports {', '.join(SUPPORTED)}, not {kind!r}")
        self.kind = kind
        self.rotary = kind not in ("gpt_neo", "gpt2")
        if kind == "gpt_neo":
            base = model.transformer
            self.heads = self.kv_heads = config.num_heads
            self.head_dim = config.hidden_size // config.num_heads
            self.scale = 1.0  # GPT-Neo does not scale its attention scores
            self.layers = [_Layer(b.ln_1, self._separate(b.attn.attention), b.attn.attention.out_proj, b.ln_2, b.mlp,
                                  config.window_size if kind_ == "local" else -1)
                           for b, kind_ in zip(base.h, config.attention_layers)]
            self.final_norm = base.ln_f
        elif kind == "gpt2":
            base = model.transformer
            if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
                raise ValueError("gpt2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn is not supported")
            self.heads = self.kv_heads = config.n_head
            self.head_dim = config.n_embd // config.n_head
            self.scale = 1 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
            self.layers = [_Layer(b.ln_1, self._fused_qkv(b.attn.c_attn, config.n_embd), _conv1d(b.attn.c_proj), b.ln_2,
                                  _gpt2_mlp(b.mlp), -1) for b in base.h]
            self.final_norm = base.ln_f
        else:
            base = model.model
            self.heads = config.num_attention_heads
            self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
            self.scale = 1 / math.sqrt(self.head_dim)
            window = getattr(config, "sliding_window", None)
            if window and getattr(config, "use_sliding_window", kind == "mistral"):
                raise ValueError("sliding-window LLaMA-style models are not supported by the static-cache decoder yet")
            self.layers = [_Layer(b.input_layernorm, self._separate(b.self_attn), b.self_attn.o_proj,
                                  b.post_attention_layernorm, b.mlp, -1) for b in base.layers]
            for b in base.layers:
                if getattr(b.self_attn, "q_norm", None) is not None:
                    raise ValueError("attention with q/k norms (Qwen3) is not supported by the static-cache decoder")
            self.final_norm = base.norm
            self._rope_tables(base, max_length)
        self.base = base
        self.lm_head = model.lm_head
        self.max_length = max_length

    @staticmethod
    def _separate(attn):
        return lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    @staticmethod
    def _fused_qkv(c_attn, width):
        return lambda x: _conv1d(c_attn)(x).split(width, dim=2)

    def _rope_tables(self, base, max_length):
        """cos/sin [max_length, rotary_dim / 2] from the model's own rotary embedding (its scaling included)."""
        positions = torch.arange(max_length, device=self.model.device)[None]
        probe = torch.zeros(1, dtype=self.model.dtype, device=self.model.device)
        cos, sin = base.rotary_emb(probe, positions)
        half = cos.shape[-1] // 2
        if not torch.equal(cos[..., :half], cos[..., half:]):
            raise ValueError("this model's rotary embedding is not the rotate-half layout GQA implements")
        self.register_buffer("cos", cos[0, :, :half].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, :half].contiguous(), persistent=False)

    def embed(self, input_ids, position_ids):
        if not self.rotary:  # GPT-Neo, GPT-2: learned absolute positions
            return self.base.wte(input_ids) + self.base.wpe(position_ids)
        return self.base.embed_tokens(input_ids)

    def forward(self, input_ids, *rest):
        """(input_ids, [position_ids,] seqlens_k, total_sequence_length, last_index, *past): see io_names."""
        position_ids, rest = (None, rest) if self.rotary else (rest[0], rest[1:])
        seqlens_k, total_sequence_length, last_index, *past = rest
        hidden = self.embed(input_ids, position_ids)
        cos, sin = (self.cos, self.sin) if self.rotary else (seqlens_k, seqlens_k)  # unused without rotary
        present = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.norm1(hidden))
            attrs = (self.heads, self.kv_heads, self.scale, layer.window, self.rotary)
            attn, pk, pv = _GroupQueryAttention.apply(q, k, v, past[2 * i], past[2 * i + 1], seqlens_k,
                                                      total_sequence_length, cos, sin, attrs)
            hidden = hidden + layer.out(attn)
            hidden = hidden + layer.mlp(layer.norm2(hidden))
            present += [pk, pv]
        last = _GatherLast.apply(self.final_norm(hidden), last_index)
        logits = self.lm_head(last).float()
        token = logits.argmax(-1)
        seqlens = seqlens_k + 1  # after a prefill: each row's length; after a decode step: one more
        step = (token[:, None],) if self.rotary else (token[:, None], seqlens[:, None].to(torch.int64))
        return (logits, token, *step, seqlens, *present)


def _example_inputs(wrapper: _StaticDecoder, batch: int = 2, seq: int = 3):
    device, dtype = wrapper.model.device, wrapper.model.dtype
    ids = torch.randint(0, wrapper.model.config.vocab_size, (batch, seq), device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq).contiguous()
    seqlens = torch.full((batch,), seq - 1, dtype=torch.int32, device=device)
    total = torch.tensor(seq, dtype=torch.int32)
    last = torch.full((batch, 1), seq - 1, dtype=torch.int64, device=device)
    shape = (batch, wrapper.kv_heads, wrapper.max_length, wrapper.head_dim)
    past = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * len(wrapper.layers))]
    return (ids, *(() if wrapper.rotary else (pos,)), seqlens, total, last, *past)


def _dynamic_axes(input_names, output_names):
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "seqlens_k": {0: "batch"}, "last_index": {0: "batch"}, "logits": {0: "batch"},
            "next_token": {0: "batch"}, "next_input_ids": {0: "batch"}, "next_position_ids": {0: "batch"},
            "next_seqlens_k": {0: "batch"}}
    for name in (*input_names, *output_names):
        if name.startswith(("past.", "present.")):
            axes[name] = {0: "batch", 2: "max_length"}
    return {name: axis for name, axis in axes.items() if name in input_names or name in output_names}


def expected_fusions(wrapper: _StaticDecoder) -> dict[str, int]:
    layers = len(wrapper.layers)
    if wrapper.rotary:  # RMSNorm: the first norm has no residual to fold in; every later one does
        return {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2 * layers}
    # LayerNorm: the embedding sum (wte + wpe) folds into the first one as its skip input
    return {"SkipLayerNormalization": 2 * layers + 1, "FastGelu": layers}


def _fuse(raw: Path, wrapper: _StaticDecoder) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer optimizer over the exported graph (norms with their residual adds and biases, the
    tanh GELU): fewer, larger kernels per layer. Attention is already one GQA node. Raises FusionError
    when a fusion that this architecture must get is missing."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from .optimize import FusionError

    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    model = optimizer.optimize_model(str(raw), model_type="gpt2", num_heads=wrapper.heads,
                                     hidden_size=wrapper.heads * wrapper.head_dim, opt_level=0,
                                     optimization_options=options)
    packed = _pack_qkv(model.model)
    model.topological_sort()
    counts = dict(collections.Counter(n.op_type for n in model.model.graph.node))
    if packed != len(wrapper.layers):
        raise FusionError({"packed QKV": (packed, len(wrapper.layers))}, counts)
    expected = expected_fusions(wrapper)
    missing = {op: (counts.get(op, 0), want) for op, want in expected.items() if counts.get(op, 0) != want}
    if missing:
        raise FusionError(missing, counts)
    return model.model, {op: counts[op] for op in (*expected, "GroupQueryAttention")}


def _pack_qkv(model: onnx.ModelProto) -> int:
    """Feed every GQA one packed [b, s, (heads + 2 kv_heads) * head_dim] query: one GEMM instead of three.

    q/k/v from three MatMuls on one input (GPT-Neo, LLaMA): their weights are concatenated into one
    MatMul. q/k/v from a Split of one projection (GPT-2): the Split goes. Returns the GQA nodes packed.
    """
    from onnx import numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.Counter(i for n in graph.node for i in n.input)
    weights = {t.name: t for t in graph.initializer}
    drop, packed = [], 0
    for node in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        sources = [producer.get(name) for name in node.input[:3]]
        if any(src is None for src in sources):
            continue
        if sources[0].op_type == "Split" and all(src is sources[0] for src in sources) \
                and list(sources[0].output) == list(node.input[:3]) and consumers[sources[0].output[0]] == 1:
            fused_input = sources[0].input[0]
            drop.append(sources[0])
        elif all(src.op_type == "MatMul" and src.input[1] in weights and src.input[0] == sources[0].input[0]
                 and consumers[src.output[0]] == 1 for src in sources):
            arrays = [numpy_helper.to_array(weights[src.input[1]]) for src in sources]
            name = f"{node.name or node.output[0]}.qkv_weight"
            graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name))
            fused_input = f"{node.name or node.output[0]}.qkv"
            graph.node.append(onnx.helper.make_node("MatMul", [sources[0].input[0], name], [fused_input],
                                                    name=f"{node.name or node.output[0]}.qkv_matmul"))
            drop.extend(sources)
        else:
            continue
        node.input[0], node.input[1], node.input[2] = fused_input, "", ""
        packed += 1
    for src in drop:
        graph.node.remove(src)
    used = {i for n in graph.node for i in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    return packed


def save_float16(src: str | Path, dst: str | Path) -> None:
    """Write the static graph at `src` with float16 weights, compute, KV cache inputs and outputs to `dst` (ORT's
    float16 converter; only the logits stay float32), and its info file, dtype float16, beside `dst` (in the
    same folder as `src`, that file then describes `dst` only). Converting the fused fp32 graph keeps its
    fusions, which an export from a float16 model can lose (LLaMA's RMSNorm casts to float32 inside)."""
    import json

    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = Path(src), Path(dst)
    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=["logits"])
    info = json.loads((src.parent / INFO_FILE).read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model.model, dst, bool(info["external_data"]))
    (dst.parent / INFO_FILE).write_text(json.dumps({**info, "dtype": "float16"}, indent=2))


def export_static_decoder(model, out_path: str | Path, max_length: int, opset: int = 18,
                          external_data: bool | None = None) -> StaticDecoderInfo:
    """Export `model` (a transformers causal LM in eval mode, any dtype/device) to `out_path`.

    The cache length is not baked in (a dynamic axis), but RoPE tables are, so `max_length`
    bounds what the graph can serve. Writes static_decoder.json beside the graph.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _StaticDecoder(model, max_length).eval()
    input_names, output_names = io_names(len(wrapper.layers), positions=not wrapper.rotary)
    if external_data is None:
        external_data = needs_external_data(model)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(wrapper, _example_inputs(wrapper), str(raw), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=_dynamic_axes(input_names, output_names),
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
        proto, fused = _fuse(raw, wrapper)
        check_io(proto, input_names, output_names)
        save_graph(proto, out_path, bool(external_data))
    info = StaticDecoderInfo(
        model_type=model.config.model_type, num_layers=len(wrapper.layers), num_heads=wrapper.heads,
        num_kv_heads=wrapper.kv_heads, head_dim=wrapper.head_dim, vocab_size=model.config.vocab_size,
        max_length=int(max_length), eos_token_ids=eos_ids(model), dtype=str(model.dtype).removeprefix("torch."),
        opset=opset, external_data=bool(external_data), fused_operators=fused,
    )
    info.save(out_path.parent)
    return info
