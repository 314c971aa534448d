"""BERT "packing mode" for a fused encoder graph: RemovePadding before the first attention, PackedAttention
(or PackedMultiHeadAttention) in every layer, RestorePadding after the last (Skip)LayerNormalization, so every
GEMM between them runs on [token_count, hidden] instead of [batch, seq, hidden].

Thin wrapper over onnxruntime.transformers.convert_to_packing_mode.PackingMode, which returns silently when it
cannot convert and does not check the mask format. This module checks what the tool does not:

* the attention mask input must be ONE 1-D int32 [batch] tensor of token counts (AttentionMaskFormat.MaskIndexEnd,
  the optimizer's default for model_type "bert"). With use_raw_attention_mask (2-D mask) the ORT tool still
  "converts", wiring the 2-D mask into RemovePadding.sequence_token_count: a broken graph. Right padding assumed
  (RemovePadding's own contract; the unpacked MaskIndexEnd Attention assumes it too).
* every node between RemovePadding and RestorePadding must be token-wise (MatMul, SkipLayerNorm, BiasGelu, ...);
  a Reshape/Transpose/etc. there would see [token_count, hidden] where it expects [batch, seq, hidden].
* no graph output may be a packed tensor; the consumers after RestorePadding (pooling) see [batch, seq, hidden]
  with zeros at padded positions.

The packed ops (RemovePadding, RestorePadding, PackedAttention, PackedMultiHeadAttention) have CUDA kernels only.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

TWO_GB = 2**31
INTEREST = ("Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention", "RemovePadding",
            "RestorePadding", "EmbedLayerNormalization", "LayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "MatMul", "BiasGelu", "Gelu", "FastGelu")
# ops that act on each token independently, so [token_count, hidden] is as good as [batch, seq, hidden]
TOKENWISE = {"MatMul", "Add", "Mul", "Sub", "Div", "Cast", "Identity", "Relu", "Gelu", "BiasGelu", "FastGelu",
             "QuickGelu", "Erf", "Tanh", "Sigmoid", "LayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
PACKED_ATTENTION = {"PackedAttention", "PackedMultiHeadAttention"}


class PackingError(ValueError):
    """The graph cannot be (or was not) converted to packing mode."""


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def _interest(counts: dict[str, int]) -> dict[str, int]:
    return {op: counts[op] for op in INTEREST if counts.get(op)}


def _attention_nodes(model: onnx.ModelProto) -> tuple[str, list[onnx.NodeProto]]:
    att = [n for n in model.graph.node if n.op_type == "Attention"]
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    if att and mha:
        raise PackingError("graph has both Attention and MultiHeadAttention; packing mode supports one kind")
    if not att and not mha:
        raise PackingError("no fused Attention/MultiHeadAttention node: run the ORT transformer optimizer "
                           "(model_type='bert') first; packing mode replaces fused attention only")
    return ("Attention", att) if att else ("MultiHeadAttention", mha)


def _check_mask(model: onnx.ModelProto, op: str, nodes: list[onnx.NodeProto]) -> str:
    index = 3 if op == "Attention" else 4  # mask_index / key_padding_mask
    masks = {n.input[index] if len(n.input) > index else "" for n in nodes}
    if masks == {""}:
        raise PackingError(f"{op} nodes have no mask input (AttentionMaskFormat.NoMask?): RemovePadding needs "
                           "per-sequence token counts; fuse with the default MaskIndexEnd mask format")
    if len(masks) != 1:
        raise PackingError(f"{op} nodes do not share one mask input: {sorted(masks)}")
    mask = masks.pop()
    # shape inference on the mask path (standard ops only; unknown contrib ops are skipped)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    infos = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input)}
    info = infos.get(mask)
    if info is None or not info.type.tensor_type.HasField("shape"):
        raise PackingError(f"cannot infer the shape of mask input {mask!r}")
    rank = len(info.type.tensor_type.shape.dim)
    elem = info.type.tensor_type.elem_type
    if rank != 1 or elem != TensorProto.INT32:
        raise PackingError(
            f"{op} mask input {mask!r} is rank {rank}, {TensorProto.DataType.Name(elem)}; packing mode needs the "
            "1-D int32 [batch] token counts of AttentionMaskFormat.MaskIndexEnd (the default for model_type "
            "'bert'; do not call FusionOptions.use_raw_attention_mask())")
    return mask


def _check_packed_region(model: onnx.ModelProto) -> int:
    """Walk forward from RemovePadding's output to RestorePadding; every node on the way must be token-wise."""
    nodes = list(model.graph.node)
    remove = [n for n in nodes if n.op_type == "RemovePadding"]
    restore = [n for n in nodes if n.op_type == "RestorePadding"]
    if len(remove) != 1 or len(restore) != 1:
        raise PackingError(f"expected one RemovePadding and one RestorePadding, got {len(remove)} and {len(restore)}")
    remove, restore = remove[0], restore[0]
    side = set(remove.output[1:]) | {""}
    constant = {i.name for i in model.graph.initializer} | {
        o for n in nodes if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n)
    packed, frontier, visited, region = {remove.output[0]}, [remove.output[0]], set(), []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            key = id(node)
            if key in visited:
                continue
            visited.add(key)
            if node is restore:
                continue
            if node.op_type not in TOKENWISE | PACKED_ATTENTION:
                raise PackingError(f"{node.op_type} node {node.name!r} consumes packed tensor {tensor!r}: "
                                   "not token-wise, so [token_count, hidden] would break it")
            region.append(node)
            for o in node.output:
                if o and o not in packed:
                    packed.add(o)
                    frontier.append(o)
    for node in region:  # once the packed set is complete: no padded activation may flow in
        for i in node.input:
            if i not in packed and i not in side and i not in constant:
                raise PackingError(f"{node.op_type} node {node.name!r} mixes packed tensors with "
                                   f"non-packed activation {i!r}")
    if restore.input[0] not in packed:
        raise PackingError("RestorePadding's input is not reached from RemovePadding")
    for node in nodes:
        if node.op_type in PACKED_ATTENTION and node.input[0] not in packed:
            raise PackingError(f"{node.op_type} {node.name!r} input {node.input[0]!r} is not packed")
    leaked = packed & {o.name for o in model.graph.output}
    if leaked:
        raise PackingError(f"graph outputs would be packed [token_count, ...] tensors: {sorted(leaked)}")
    return len(visited)


def to_packing_mode(src_path: str | Path, dst_path: str | Path) -> dict[str, Any]:
    """Convert a fused (fp32 or fp16) BERT-like graph to ORT packing mode and save it to ``dst_path``.

    Returns {"attention_op", "mask_index", "before", "after", "packed_region_nodes", "all_after"}.
    Raises PackingError when the graph cannot be converted. The result runs on CUDA EP only.
    """
    import onnxruntime.transformers  # noqa: F401  (puts the tool's folder on sys.path for its flat imports)
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    src_path, dst_path = Path(src_path), Path(dst_path)
    light = onnx.load(str(src_path), load_external_data=False)
    op, nodes = _attention_nodes(light)
    mask = _check_mask(light, op, nodes)
    before = op_counts(light)
    del light

    model = OnnxModel(onnx.load(str(src_path)))
    tool_log = logging.getLogger("onnxruntime.transformers.convert_to_packing_mode")
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = _Keep(level=logging.WARNING)
    tool_log.addHandler(handler)
    try:
        PackingMode(model).convert()
    finally:
        tool_log.removeHandler(handler)
    after = op_counts(model.model)
    packed_op = "Packed" + op
    if after.get(packed_op, 0) != before.get(op, 0) or after.get(op, 0) or after.get("RemovePadding") != 1:
        raise PackingError(f"PackingMode did not convert the graph (tool messages: {records or 'none'}); "
                           f"before {_interest(before)}, after {_interest(after)}")
    region = _check_packed_region(model.model)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    # save_model_to_file sorts the nodes topologically (the in-memory graph is not yet sorted)
    model.save_model_to_file(str(dst_path), use_external_data_format=model.model.ByteSize() > TWO_GB // 2,
                             all_tensors_to_one_file=True)
    onnx.checker.check_model(str(dst_path))
    return {"attention_op": packed_op, "mask_index": mask, "before": _interest(before), "after": _interest(after),
            "packed_region_nodes": region, "all_after": after}


# --- static packing: the caller removes the padding, so the graph has no data-dependent shape --------------------

STATIC_INPUTS = ("packing_token_index", "packing_token_offset", "packing_cu_seqlens")


def to_static_packing(packed_path: str | Path, dst_path: str | Path) -> dict[str, Any]:
    """Rewrite a packing-mode graph (`to_packing_mode`) so that a CUDA graph can capture it.

    RemovePadding learns the token count on the device and sizes its output by it, so ONNX Runtime reads it back
    to the host in the middle of every call: no CUDA graph, and a launch gap. Here the caller packs instead
    (`static_packing_feeds`): RemovePadding becomes Flatten + Gather over ``packing_token_index`` (int64
    [tokens]), and its token offsets and cumulative lengths become the inputs ``packing_token_offset`` (int32
    [batch, sequence]) and ``packing_cu_seqlens`` (int32 [batch + 1]). Every shape then follows from the input
    shapes, and one captured graph serves each (batch, sequence, tokens) bucket.
    """
    src_path, dst_path = Path(packed_path), Path(dst_path)
    model = onnx.load(str(src_path))
    graph = model.graph
    remove = [n for n in graph.node if n.op_type == "RemovePadding"]
    if len(remove) != 1:
        raise PackingError(f"expected one RemovePadding (a graph from to_packing_mode), got {len(remove)}")
    remove = remove[0]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    if len(remove.output) > 3 and remove.output[3] in used:
        raise PackingError(f"RemovePadding's max_seq_len {remove.output[3]!r} is used; static packing does not "
                           "provide it")
    mask = next((i for i in graph.input if i.name == "attention_mask"), None)
    if mask is None:
        raise PackingError("no attention_mask input: the packing inputs take its [batch, sequence] shape")
    batch_dim, seq_dim = (d.dim_param or d.dim_value for d in mask.type.tensor_type.shape.dim)
    rename = {remove.output[1]: STATIC_INPUTS[1], remove.output[2]: STATIC_INPUTS[2]}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    flat = remove.input[0] + "_flat"
    index = list(graph.node).index(remove)
    graph.node.remove(remove)
    graph.node.insert(index, onnx.helper.make_node("Gather", [flat, STATIC_INPUTS[0]], [remove.output[0]], axis=0,
                                                   name="static_packing_gather"))
    graph.node.insert(index, onnx.helper.make_node("Flatten", [remove.input[0]], [flat], axis=2,
                                                   name="static_packing_flatten"))
    batch_plus_one = f"{batch_dim}_plus_1" if isinstance(batch_dim, str) else batch_dim + 1
    graph.input.extend([
        onnx.helper.make_tensor_value_info(STATIC_INPUTS[0], TensorProto.INT64, ["packed_tokens"]),
        onnx.helper.make_tensor_value_info(STATIC_INPUTS[1], TensorProto.INT32, [batch_dim, seq_dim]),
        onnx.helper.make_tensor_value_info(STATIC_INPUTS[2], TensorProto.INT32, [batch_plus_one]),
    ])
    region = _check_static_region(model, remove.output[0])
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > TWO_GB // 2
    onnx.save(model, str(dst_path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=dst_path.name + ".data" if large else None)
    onnx.checker.check_model(str(dst_path))
    return {"inputs": list(STATIC_INPUTS), "packed_region_nodes": region, "all_after": op_counts(model)}


def _check_static_region(model: onnx.ModelProto, packed: str) -> int:
    """The rewritten graph still has a token-wise region from the Gather to RestorePadding."""
    restore = [n for n in model.graph.node if n.op_type == "RestorePadding"]
    consumers = [n for n in model.graph.node if packed in n.input]
    if len(restore) != 1 or not consumers:
        raise PackingError("static packing lost the packed region (no RestorePadding or no consumer of the Gather)")
    return len(consumers)


def static_packing_feeds(feeds: dict[str, np.ndarray], granularity: int | None = None) -> dict[str, np.ndarray]:
    """The inputs of a `to_static_packing` graph for a right-padded batch: one more row, and the packing inputs.

    The real tokens are packed first, in row order, as RemovePadding packs them. The token count is rounded up to
    the next multiple of ``granularity`` (default: the padded width), with at least one token to spare; the spare
    tokens form an extra last row, so every packed token belongs to a sequence and is computed like any other
    (its output row is to be dropped). Same-shaped batches with a token count in the same bucket give the same
    shapes, so they replay one captured graph.
    """
    mask = np.asarray(feeds["attention_mask"])
    rows, width = mask.shape
    lengths = mask.sum(1).astype(np.int64)
    if not np.array_equal(mask, (np.arange(width)[None, :] < lengths[:, None]).astype(mask.dtype)):
        raise PackingError("static packing needs right padding: each attention_mask row as 1s then 0s")
    for name, value in feeds.items():
        if np.shape(value) != mask.shape:
            raise PackingError(f"input {name!r} has shape {np.shape(value)}, attention_mask {mask.shape}")
    granularity = width if granularity is None else int(granularity)
    if not 1 <= granularity <= width:
        raise PackingError(f"granularity {granularity} must be 1..{width} (the spare row holds at most {width})")
    real = int(lengths.sum())
    total = (real // granularity + 1) * granularity
    spare = total - real
    lengths = np.append(lengths, spare)
    out = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        extra = np.zeros((1, width), value.dtype)
        if name == "attention_mask":
            extra[0, :spare] = 1
        out[name] = np.concatenate([value, extra])
    positions = np.arange(rows + 1)[:, None] * width + np.arange(width)[None, :]
    real_mask = np.arange(width)[None, :] < lengths[:, None]
    token_offset = np.concatenate([positions[real_mask], positions[~real_mask]]).astype(np.int32)
    out[STATIC_INPUTS[0]] = token_offset[:total].astype(np.int64)
    out[STATIC_INPUTS[1]] = token_offset.reshape(rows + 1, width)
    out[STATIC_INPUTS[2]] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return out
