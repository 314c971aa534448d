"""Weight-only quantization of a decoder graph (the `int8` / `int4` speed options for causal LMs).

Every MatMul over a constant weight (the packed QKV, output, MLP and LM-head projections) becomes one
`com.microsoft.MatMulNBits` node: the weight stored as `bits`-bit codes with one scale per block of
`block_size` input rows, dequantized inside the kernel; activations, norms, attention and the KV cache
keep the graph's float type. Decoding one token reads every weight once, so fewer weight bytes are
fewer bytes per token (BENCHMARKS.md, "CPU generation").

Rounding every weight moves the logits far more than fp32 noise (SmolLM2 int8: up to 2.6 off), so a
quantized decoder is gated on what a reader sees instead: top-1 agreement with transformers fp32 along
transformers' own greedy continuation (`check_weight_only`). The gate's refusal is the expected outcome
for small models at 4 bits (SmolLM2 int4 agrees on 62 of 94 tokens and writes different text).
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .decoder_validate import agreement_gate
from .validate import ExportError

BLOCK_SIZE = 32  # measured on SmolLM2 int4: block 32 agrees on 62/94 tokens, block 128 on 57/94


def quantize_weight_only(src: str | Path, dst: str | Path, bits: int, block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """Write `src` with its constant-weight MatMuls as MatMulNBits (symmetric, `bits` bits) to `dst`.

    Raises ExportError when nothing was quantized (a graph whose projections are not MatMuls over
    initializers, such as the [out, in] FusedMatMul layout)."""
    root_level = logging.getLogger().level
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # its import runs logging.basicConfig(level=INFO), which would print a line per quantized weight
    logging.getLogger().setLevel(root_level)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)

    from .decoder_export import save_graph
    from .optimize import file_bytes

    start = time.perf_counter()
    model = onnx.load(str(src))
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                                accuracy_level=4)
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    proto = quantizer.model.model
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    if not ops["MatMulNBits"]:
        raise ExportError(f"int{bits}: no MatMul over a constant weight to quantize in {src}")
    dst = Path(dst)
    save_graph(proto, dst, external_data=proto.ByteSize() > 2**31 - 2**28)
    return {"bits": bits, "block_size": block_size, "symmetric": True, "MatMulNBits": ops["MatMulNBits"],
            "matmuls_left": ops["MatMul"], "matmuls_before": before, "bytes": file_bytes(dst),
            "source_bytes": file_bytes(Path(src)), "seconds": round(time.perf_counter() - start, 1)}


def check_weight_only(model, onnx_path: str | Path, prompts: Sequence[Sequence[int]], bits: int,
                      new_tokens: int = 16, pad_token_id: int = 0, min_top1: float | None = None,
                      providers: Sequence | None = None) -> dict[str, Any]:
    """The gate of a weight-only decoder (decoder_validate.agreement_gate): top-1 agreement with fp32 along
    transformers' greedy continuation of each prompt, on at least `min_top1` of the steps."""
    figures = agreement_gate(model, onnx_path, prompts, f"int{bits} weight-only decoder", new_tokens=new_tokens,
                             pad_token_id=pad_token_id, min_top1=min_top1, providers=providers)
    return {"bits": bits, **figures}
