"""optimize: fp16 for decoders: the gated fp32 static-cache GQA graph converted to float16 (weights, compute and
KV cache; logits stay float32), gated on top-1 agreement with transformers fp32, served from the manifest."""
from __future__ import annotations

from inference.decode_static import StaticDecoderSession, generate_all_static
from inference.sampling import SamplingParams, collect
from tests.tiny import export_tiny_fp16_decoder


def test_fp16_export_served_on_cuda_graphs_writes_the_cpu_tokens(tmp_path):
    """The same fp16 artifact served on the CUDA EP (TextGenerator, decode steps replayed from CUDA graphs):
    the tokens of the CPU run."""

    from inference.textgen import TextGenerator

    entry, root, model, tokenizer = export_tiny_fp16_decoder(tmp_path)
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
