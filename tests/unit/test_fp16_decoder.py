"""optimize: fp16 for decoders: the gated fp32 static-cache GQA graph converted to float16 (weights, compute and
KV cache; logits stay float32), gated on top-1 agreement with transformers fp32, served from the manifest."""
from __future__ import annotations

import onnx
import pytest

from export_jobs.decoder_validate import (
    AgreementError,
    agreement_gate,
    default_prompts,
    transformers_greedy,
)
from inference.decode_static import generate_all_static
from inference.sampling import SamplingParams
from tests.tiny import export_tiny_fp16_decoder


def test_an_fp16_export_is_gated_and_is_what_the_manifest_serves(tmp_path):
    from inference.textgen import TextGenerator

    entry, root, model, tokenizer = export_tiny_fp16_decoder(tmp_path)
    assert entry.model_file == "static/model.fp16.onnx" and entry.precision == "fp16"
    assert not (entry.dir_path(root) / "static" / "model.onnx").exists()  # the fp32 graph was gated, then dropped
    graph = onnx.load(str(entry.model_path(root)), load_external_data=False).graph
    floats = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for tensor in graph.initializer:
        if tensor.data_type in floats:
            floats[tensor.data_type] += 1
    assert floats[onnx.TensorProto.FLOAT16] > 0 and floats[onnx.TensorProto.FLOAT] <= 4  # weights in float16
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert types["past.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert entry.metadata.static_decoder["parity"]["logits_max_abs_diff"] <= entry.parity.tolerance  # fp32 gate
    half = entry.metadata.fp16
    assert half["gate"]["top1_agree"] >= 0.9 * half["gate"]["top1_steps"] > 0
    assert half["gate"]["logits_max_abs_diff"] > entry.parity.max_abs_diff  # float16 rounding, on top of fp32's
    assert half["bytes"] < 0.6 * half["source_bytes"]
    generator = TextGenerator(entry, root, threads=1)
    prompt = tokenizer("The capital of France is")["input_ids"]
    ours = generate_all_static(generator.session, [prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    expected = transformers_greedy(model, [prompt], 12, tokenizer.eos_token_id)[0]
    assert len(ours) == 12 and ours[:4] == expected[:4]  # fp16 may part from fp32 at a near tie, not at once


def test_the_agreement_gate_refuses_a_graph_of_another_model(tmp_path):
    """The gate compares against the model it is given: an fp16 graph of different weights is refused."""
    import copy

    import torch

    from export_jobs.static_decoder import export_static_decoder, save_float16
    from tests.tiny import tiny_causal_lms

    model = tiny_causal_lms()["gpt_neo"]
    model.generation_config.eos_token_id = None
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_(0, 0.2)
    export_static_decoder(other, tmp_path / "fp32" / "model.onnx", max_length=96)
    save_float16(tmp_path / "fp32" / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(AgreementError, match=r"fp16: top-1 token equals transformers fp32 on \d+ of 32 steps"):
        agreement_gate(model, tmp_path / "model.onnx", default_prompts(model), "fp16", new_tokens=16)
    figures = agreement_gate(other, tmp_path / "model.onnx", default_prompts(other), "fp16", new_tokens=16)
    assert figures["top1_agree"] >= 0.9 * figures["top1_steps"]


