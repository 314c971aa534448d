"""Post-export speed options for an encoder: turn a gated fp32 ONNX file into a faster NEW file.

    fused  ORT transformer optimizer (Attention, SkipLayerNormalization, BiasGelu...); a missing
           expected fusion is a FusionError, not a silently slower artifact
    fp16   fused, then float16 inside (float32 inputs/outputs kept): GPU serving
    int8   fused, then dynamic int8 (weights per channel) for CPU serving; encoders are also held to
           their fp32 source's retrieval ranking (export_jobs.ranking)

Each output must pass its own gate against the torch source (`check_speed_option`) before it may be
recorded or served; the gates are looser than the fp32 one, in cosine terms (see GATES).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from contract.config import SpeedOption

from . import validate

TWO_GB = 2**31
# Fed by these, a MatMul's activations carry outliers that per-tensor uint8 dynamic quantization
# flattens: for all-MiniLM-L6-v2, quantizing the FFN down-projections alone drops cosine to 0.986.
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu", "QuickGelu")
# Encoders quantize every MatMul and the fused Attention's QKV projection (QAttention): all-MiniLM-L6-v2
# runs batch 32 in about 0.4x the fp32 time and keeps its retrieval ranking (export_jobs.ranking: nDCG@10
# 0.9975). Classifiers keep the FFN down-projections and QKV in fp32 (their gate is an absolute score
# difference; min cosine, MatMul only, 0.9922).
INT8_OP_TYPES = ("MatMul", "Attention")
INT8_CLASSIFIER_OP_TYPES = ("MatMul",)


class FusionError(validate.ExportError):
    """The optimizer did not fuse what this architecture must fuse: the graph would run slow paths."""

    def __init__(self, missing: dict[str, tuple[int, int]], counts: dict[str, int]):
        text = ", ".join(f"{op} {got} of {want}" for op, (got, want) in missing.items())
        super().__init__(f"transformer optimizer fused too little: {text}; all fusions: {counts}")
        self.missing, self.counts = missing, counts


CosineError = validate.CosineError


@dataclasses.dataclass(frozen=True)
class Gate:
    """What a speed option must meet against the torch fp32 source, on the fp32 gate's inputs."""

    min_cosine: float
    max_abs_diff: float | None  # None: the architecture's fp32 tolerance


GATES = {
    SpeedOption.fused: Gate(min_cosine=0.9999, max_abs_diff=None),
    SpeedOption.fp16: Gate(min_cosine=0.999, max_abs_diff=1e-2),
    # + export_jobs.ranking's retrieval check for encoders; MiniLM measured min cosine 0.985, max diff 0.032
    SpeedOption.int8: Gate(min_cosine=0.97, max_abs_diff=0.1),
}


def expected_fusions(hf_config) -> dict[str, int]:
    """At least one Attention (or MultiHeadAttention) per layer and two SkipLayerNorms per layer."""
    layers = int(hf_config.num_hidden_layers)
    return {"Attention": layers, "SkipLayerNormalization": 2 * layers}


def fusion_counts(stats: dict[str, int]) -> dict[str, int]:
    """Non-zero fused operator counts, with the attention and skip-norm variants folded together."""
    counts = {op: int(n) for op, n in stats.items() if n}
    counts["Attention"] = int(stats.get("Attention", 0)) + int(stats.get("MultiHeadAttention", 0))
    counts["SkipLayerNormalization"] = (int(stats.get("SkipLayerNormalization", 0))
                                        + int(stats.get("SkipSimplifiedLayerNormalization", 0)))
    return counts


def _split_unsqueeze(model: onnx.ModelProto) -> int:
    """One Unsqueeze per axis. torch's ONNX optimizer merges `x.unsqueeze(1).unsqueeze(2)` into one
    node; ORT's attention-mask patterns expect two. Same result, node for node."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes, split = [], 0
    for node in model.graph.node:
        axes = numpy_helper.to_array(inits[node.input[1]]) if (
            node.op_type == "Unsqueeze" and len(node.input) > 1 and node.input[1] in inits) else None
        if axes is None or axes.size < 2 or (axes < 0).any():
            nodes.append(node)
            continue
        previous, base = node.input[0], node.name or node.output[0]
        for k, axis in enumerate(sorted(int(a) for a in axes.ravel())):  # ascending: later axes count the new ones
            axis_name = f"{base}_axis{k}"
            model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axis_name))
            out = node.output[0] if k == axes.size - 1 else f"{node.output[0]}_unsqueeze{k}"
            nodes.append(helper.make_node("Unsqueeze", [previous, axis_name], [out], name=f"{base}_{k}"))
            previous = out
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def fuse(fp32_path: str | Path, out_path: str | Path, hf_config, *, fp16: bool = False,
         use_gpu: bool = False, expected: dict[str, int] | None = None,
         multi_head: bool = False) -> dict[str, Any]:
    """Run the ORT transformer optimizer (model_type "bert"); raise FusionError when an expected fusion
    is missing. Returns the fused operator counts.

    ``multi_head``: MultiHeadAttention (separate Q, K, V projections) instead of Attention (one packed QKV
    projection); in packing mode it becomes PackedMultiHeadAttention, which has ORT's flash-attention kernel."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(fp32_path))
    split = _split_unsqueeze(model)
    options = FusionOptions("bert")
    options.use_multi_head_attention = multi_head
    optimized = optimize_model(model, model_type="bert", num_heads=int(hf_config.num_attention_heads),
                               hidden_size=int(hf_config.hidden_size), opt_level=0, use_gpu=use_gpu,
                               optimization_options=options)
    counts = fusion_counts(optimized.get_fused_operator_statistics())
    want = expected_fusions(hf_config) if expected is None else expected
    missing = {op: (counts.get(op, 0), n) for op, n in want.items() if counts.get(op, 0) < n}
    if missing:
        raise FusionError(missing, counts)
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # save_model_to_file also adds the com.microsoft opset import that the fused ops need
    optimized.save_model_to_file(str(out_path), use_external_data_format=optimized.model.ByteSize() > TWO_GB // 2,
                                 all_tensors_to_one_file=True)
    return {"fusions": counts, "expected_fusions": want, "unsqueeze_split": split}


def _gelu_fed_matmuls(model: onnx.ModelProto) -> list[str]:
    producer = {out: node for node in model.graph.node for out in node.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and getattr(producer.get(n.input[0]), "op_type", None) in GELU_OPS]


def quantize_int8(fused_path: str | Path, out_path: str | Path, *, everything: bool = True) -> dict[str, Any]:
    """Dynamic int8 (QInt8 weights, per channel) of a fused graph: every MatMul and the fused Attention
    (``everything``, encoders), or the MatMuls but the FFN down-projections (classifiers)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = INT8_OP_TYPES if everything else INT8_CLASSIFIER_OP_TYPES
    exclude = [] if everything else _gelu_fed_matmuls(onnx.load(str(fused_path), load_external_data=False))
    quantize_dynamic(str(fused_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=list(op_types), nodes_to_exclude=exclude,
                     extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=Path(fused_path).stat().st_size > TWO_GB - 256 * 2**20)
    return {"weight_type": "QInt8", "per_channel": True, "op_types": list(op_types), "kept_fp32": len(exclude)}


def apply_speed_option(fp32_path: str | Path, out_path: str | Path, option: SpeedOption,
                       hf_config, *, int8_everything: bool = True) -> dict[str, Any]:
    """Write the ``option`` version of a gated fp32 encoder to ``out_path``; return its figures.
    ``int8_everything``: see quantize_int8 (False for classifiers).

    The result is NOT yet proven: run `check_speed_option` on it before recording it.
    """
    option = SpeedOption(option)
    if option is SpeedOption.none:
        raise ValueError("speed option 'none' produces no new file")
    start, out_path = time.perf_counter(), Path(out_path)
    if option is SpeedOption.int8:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            fused_path = Path(tmp) / "fused.onnx"
            figures = fuse(fp32_path, fused_path, hf_config)
            figures["int8"] = quantize_int8(fused_path, out_path, everything=int8_everything)
    else:
        figures = fuse(fp32_path, out_path, hf_config, fp16=option is SpeedOption.fp16,
                       use_gpu=option is SpeedOption.fp16)
    return {"option": option.value, **figures, "bytes": file_bytes(out_path),
            "source_bytes": file_bytes(Path(fp32_path)),
            "seconds": round(time.perf_counter() - start, 2)}


def file_bytes(path: Path) -> int:
    """An ONNX file's size with its external data file (`<name>.data`), if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_speed_option(module, onnx_path: str | Path, tokenizer, spec, max_length: int, vocab: int,
                       option: SpeedOption, tolerance: float,
                       providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """The speed option's gate: torch fp32 (``module``) vs ``onnx_path`` on the fp32 gate's inputs, and
    for int8 the retrieval ranking of export_jobs.ranking as well.

    Raises CosineError below the option's min cosine, ParityError past its max abs difference,
    RankingError where int8 reorders the retrieval set's neighbours past its gate.
    """
    from .encoder_job import check_encoder, check_ranking

    option = SpeedOption(option)
    gate = GATES[option]
    limit = tolerance if gate.max_abs_diff is None else gate.max_abs_diff
    figures = check_encoder(module, Path(onnx_path), tokenizer, spec, max_length, vocab, limit, seed=4321,
                            min_cosine=gate.min_cosine, providers=tuple(providers), label=f"{option.value}: ")
    if option is SpeedOption.int8:
        figures["ranking"] = check_ranking(module, Path(onnx_path), tokenizer, spec, max_length, tuple(providers))
    return {**figures, "min_cosine_gate": gate.min_cosine, "tolerance": limit}
