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
Each family's spec (export_jobs.specs) says whether it has this graph and how it maps onto it: its blocks,
attention scale, local windows, RoPE (applied inside GQA from cos/sin tables) or learned positions, and the
fusions ORT's optimizer must find. Nothing here depends on the model type.
"""
from __future__ import annotations

import collections
import dataclasses
import tempfile
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import onnx
import torch

from contract.config import SpeedOption

from .decoder_export import JsonInfo, check_io, eos_ids, needs_external_data, save_graph
from .specs import UnsupportedModelError, decoder_spec

INFO_FILE = "static_decoder.json"


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


class _StaticDecoder(torch.nn.Module):
    """The model rebuilt from its family's StaticBlocks (export_jobs.specs) around GQA nodes over a static cache."""

    def __init__(self, model, max_length: int):
        super().__init__()
        config = model.config
        spec = decoder_spec(config.model_type)
        refusal = spec.refusal(SpeedOption.fused, config)
        if refusal:
            raise UnsupportedModelError(refusal)
        self.model, self.spec, self.max_length = model, spec, max_length
        self.rotary = spec.rotary
        self.heads, self.kv_heads = spec.num_heads(config), spec.num_kv_heads(config)
        self.head_dim, self.scale = spec.head_dim(config), spec.attention_scale(config)
        self.blocks = spec.static_blocks(model)
        self.layers = self.blocks.layers
        if self.rotary:
            self._rope_tables(self.blocks.rotary_emb, max_length)

    def _rope_tables(self, rotary_emb, max_length):
        """cos/sin [max_length, rotary_dim / 2] from the model's own rotary embedding (its scaling included)."""
        positions = torch.arange(max_length, device=self.model.device)[None]
        probe = torch.zeros(1, dtype=self.model.dtype, device=self.model.device)
        cos, sin = rotary_emb(probe, positions)
        half = cos.shape[-1] // 2
        if not torch.equal(cos[..., :half], cos[..., half:]):
            raise ValueError("this model's rotary embedding is not the rotate-half layout GQA implements")
        self.register_buffer("cos", cos[0, :, :half].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, :half].contiguous(), persistent=False)

    def forward(self, input_ids, *rest):
        """(input_ids, [position_ids,] seqlens_k, total_sequence_length, last_index, *past): see io_names."""
        position_ids, rest = (None, rest) if self.rotary else (rest[0], rest[1:])
        seqlens_k, total_sequence_length, last_index, *past = rest
        hidden = self.blocks.embed(input_ids, position_ids)
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
        last = _GatherLast.apply(self.blocks.final_norm(hidden), last_index)
        logits = self.blocks.lm_head(last).float()
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


def _fuse(raw: Path, wrapper: _StaticDecoder) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer optimizer over the exported graph (norms with their residual adds and biases, the
    tanh GELU): fewer, larger kernels per layer. Attention is already one GQA node. Raises FusionError
    when a fusion that this architecture must get is missing."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from .optimize import FusionError

    options = FusionOptions(wrapper.spec.ort_model_type)
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    model = optimizer.optimize_model(str(raw), model_type=wrapper.spec.ort_model_type, num_heads=wrapper.heads,
                                     hidden_size=wrapper.heads * wrapper.head_dim, opt_level=0,
                                     optimization_options=options)
    packed = _pack_qkv(model.model)
    model.topological_sort()
    counts = dict(collections.Counter(n.op_type for n in model.model.graph.node))
    if packed != len(wrapper.layers):
        raise FusionError({"packed QKV": (packed, len(wrapper.layers))}, counts)
    expected = wrapper.spec.expected_fusions(len(wrapper.layers))
    missing = {op: (counts.get(op, 0), want) for op, want in expected.items() if counts.get(op, 0) != want}
    if missing:
        raise FusionError(missing, counts)
    return model.model, {op: counts[op] for op in (*expected, "GroupQueryAttention")}


class _Projection(NamedTuple):
    """input @ weight (+ bias), weight and bias initializers, computed by `nodes` for one consumer only."""

    input: str
    weight: str
    bias: str | None
    nodes: list


def _projection(node, producer, consumers, weights) -> _Projection | None:
    bias, nodes = None, [node]
    if node.op_type == "Add":
        product, bias = (node.input[1], node.input[0]) if node.input[0] in weights else tuple(node.input)
        node = producer.get(product)
        if bias not in weights or node is None or consumers[product] != 1:
            return None
        nodes.append(node)
    if node.op_type != "MatMul" or node.input[1] not in weights or consumers[nodes[0].output[0]] != 1:
        return None
    return _Projection(node.input[0], node.input[1], bias, nodes)


def _pack_qkv(model: onnx.ModelProto) -> int:
    """Feed every GQA one packed [b, s, (heads + 2 kv_heads) * head_dim] query: one GEMM instead of three.

    q/k/v from three projections of one input (x @ W, or x @ W + b where the layer has biases): their
    weights are concatenated into one MatMul, their biases into one Add. q/k/v from a Split of one
    projection: the Split goes. Returns the GQA nodes packed.
    """
    from onnx import numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.Counter(i for n in graph.node for i in n.input)
    weights = {t.name: t for t in graph.initializer}

    def concat(names, name):
        arrays = [numpy_helper.to_array(weights[n]) for n in names]
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=-1), name))
        return name

    def node(op, inputs, output):
        graph.node.append(onnx.helper.make_node(op, inputs, [output], name=f"{output}_{op.lower()}"))

    drop, packed = [], 0
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        sources = [producer.get(name) for name in gqa.input[:3]]
        if any(src is None for src in sources):
            continue
        parts = [_projection(src, producer, consumers, weights) for src in sources]
        prefix = gqa.name or gqa.output[0]
        if sources[0].op_type == "Split" and all(src is sources[0] for src in sources) \
                and list(sources[0].output) == list(gqa.input[:3]) and consumers[sources[0].output[0]] == 1:
            fused_input = sources[0].input[0]
            drop.append(sources[0])
        elif all(parts) and len({p.input for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1:
            fused_input = f"{prefix}.qkv"
            biased = parts[0].bias is not None
            product = f"{prefix}.qkv_product" if biased else fused_input
            node("MatMul", [parts[0].input, concat([p.weight for p in parts], f"{prefix}.qkv_weight")], product)
            if biased:
                node("Add", [product, concat([p.bias for p in parts], f"{prefix}.qkv_bias")], fused_input)
            drop.extend(n for p in parts for n in p.nodes)
        else:
            continue
        gqa.input[0], gqa.input[1], gqa.input[2] = fused_input, "", ""
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
