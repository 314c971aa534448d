"""Weight-only quantization of a decoder graph (the `int8` / `int4` speed options for causal LMs).

Every MatMul over a constant weight (the packed QKV, output, MLP and LM-head projections) becomes one
`com.microsoft.MatMulNBits` node: the weight stored as `bits`-bit codes with one scale per block of
`block_size` input rows, dequantized inside the kernel; activations, norms, attention and the KV cache
keep the graph's float type. Decoding one token reads every weight once, so fewer weight bytes are
fewer bytes per token: on the 2-core CPU, SmolLM2-135M ran 27.6 ms/token fp32, 15.5 int8, 8.6 int4.

Rounding every weight moves the logits far more than fp32 noise (SmolLM2 int8: up to 2.6 off), so a
quantized decoder is gated on what a reader sees instead: top-1 agreement with transformers fp32 along
transformers' own greedy continuation (`check_weight_only`). The gate's refusal is the expected outcome
for small models at 4 bits (SmolLM2 int4 agrees on 62 of 94 tokens and writes different text).
"""
from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .validate import ExportError

BLOCK_SIZE = 32  # measured on SmolLM2 int4: block 32 agrees on 62/94 tokens, block 128 on 57/94
MIN_TOP1 = 0.9  # the share of teacher-forced steps whose top-1 token must equal fp32's (int8 and int4)


class AgreementError(ExportError):
    def __init__(self, what: str, agree: int, steps: int, minimum: float):
        super().__init__(f"{what}: top-1 token equals transformers fp32 on {agree} of {steps} steps "
                         f"({agree / steps:.1%}); the gate wants {minimum:.0%}")
        self.agree, self.steps, self.minimum = agree, steps, minimum


def quantize_weight_only(src: str | Path, dst: str | Path, bits: int, block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """Write `src` with its constant-weight MatMuls as MatMulNBits (symmetric, `bits` bits) to `dst`.

    Raises ExportError when nothing was quantized (a graph whose projections are not MatMuls over
    initializers, such as the [out, in] FusedMatMul layout)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

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
    """The gate of a weight-only decoder: teacher-forced along transformers' greedy continuation of each
    prompt, the quantized graph's top-1 token must equal fp32's on at least `min_top1` of the steps.
    Records the logits' max abs difference and how many greedy tokens it writes before it diverges."""
    from serve_app.generation import SamplingParams
    from serve_app.static_generation import StaticDecoderSession, generate_all_static

    from .decoder_validate import common_prefix, greedy_reference, static_logits_along

    minimum = MIN_TOP1 if min_top1 is None else min_top1
    session = StaticDecoderSession(onnx_path, providers=providers, max_batch=1, min_slots=16)
    agree = steps = same_prefix = 0
    worst = 0.0
    for prompt in prompts:
        tokens, reference = greedy_reference(model, prompt, new_tokens, pad_token_id)
        got = static_logits_along(session, prompt, tokens, pad_token_id)
        worst = max(worst, float(np.max(np.abs(got - reference))))
        agree += int(np.sum(got.argmax(-1) == reference.argmax(-1)))
        steps += len(tokens)
        ours = generate_all_static(session, [list(prompt)], SamplingParams(max_tokens=len(tokens), temperature=0.0),
                                   pad_token_id)[0]
        same_prefix += common_prefix(tokens, ours)
    figures = {"bits": bits, "top1_agree": agree, "top1_steps": steps, "min_top1": minimum,
               "logits_max_abs_diff": worst, "greedy_same_prefix_tokens": same_prefix}
    if agree < minimum * steps:
        raise AgreementError(f"int{bits} weight-only decoder", agree, steps, minimum)
    return figures
