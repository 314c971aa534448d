"""optimize: fp16 for decoders: the gated fp32 static-cache GQA graph converted to float16 (weights, compute and
KV cache; logits stay float32), gated on top-1 agreement with transformers fp32, served from the manifest."""
from __future__ import annotations

import onnx
import pytest

from export_jobs import manifest
from export_jobs.config import ModelConfig
from export_jobs.decoder_validate import AgreementError, agreement_gate, default_prompts, transformers_greedy
from serve_app.generation import SamplingParams, collect
from serve_app.static_generation import StaticDecoderSession, generate_all_static


def _export(tmp_path, context: int = 128):
    from export_jobs.job import export_one
    from tests.test_generation_http import _make_tiny_gpt2

    directory, model, tokenizer = _make_tiny_gpt2(tmp_path / "src", context)
    cfg = ModelConfig(id="tiny-fp16", source=str(directory), task="generation", optimize="fp16")
    root = tmp_path / "art"
    manifest.commit(root, export_one(cfg, root))
    return manifest.load(root)["tiny-fp16"], root, model, tokenizer


def test_an_fp16_export_is_gated_and_is_what_the_manifest_serves(tmp_path):
    from serve_app.textgen import TextGenerator

    entry, root, model, tokenizer = _export(tmp_path)
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
    assert entry.metadata["static_decoder"]["parity"]["logits_max_abs_diff"] <= entry.parity.tolerance  # fp32 gate
    half = entry.metadata["fp16"]
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
    from tests.test_decoder import _tiny_models

    model = _tiny_models()["gpt_neo"]
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


@pytest.mark.gpu
def test_fp16_export_served_on_cuda_graphs_writes_the_cpu_tokens(tmp_path):
    """The same fp16 artifact served on the CUDA EP (TextGenerator, decode steps replayed from CUDA graphs):
    the tokens of the CPU run."""
    import onnxruntime as ort

    from serve_app.textgen import TextGenerator

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    entry, root, model, tokenizer = _export(tmp_path)
    prompts = [tokenizer(t)["input_ids"] for t in ("The capital of France is", "Once upon a time, in a land far")]
    params = SamplingParams(max_tokens=24, temperature=0)
    cpu = StaticDecoderSession(entry.model_path(root), max_batch=2)
    gpu = TextGenerator(entry, root, use_gpu=True).session
    assert gpu.cuda_graph and gpu.on_cuda
    expected = generate_all_static(cpu, prompts, params)
    for _ in range(2):  # the second call replays the graphs the first captured
        got = generate_all_static(gpu, prompts, params)
        assert [g[:8] for g in got] == [e[:8] for e in expected]
    # as deploy/models.yaml serves a GPU decoder: continuous batching (prefill shapes warmed at start, captured
    # decode steps), with the GEMM kernels ORT's auto-tune picked for every shape
    served = TextGenerator(entry, root, use_gpu=True, continuous=True)
    try:
        options = served.session.session.get_session_options()
        assert options.get_session_config_entry("ep.cuda.enable_gemm_auto_tune") == "1"
        for _ in range(2):
            got = collect(served.batcher.generate(prompts, params), len(prompts))
            assert [g[:8] for g in got] == [e[:8] for e in expected]
    finally:
        served.batcher.close()
