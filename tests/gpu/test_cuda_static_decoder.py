"""The static-cache GQA decoder (the GPU fast path) on CPU: tiny random GPT-Neo / GPT-2 / LLaMA models."""
from __future__ import annotations

from export_jobs.decoder_validate import default_prompts, transformers_greedy
from export_jobs.static_decoder import export_static_decoder
from inference.decode_static import StaticDecoderSession, generate_all_static
from inference.sampling import SamplingParams
from tests.tiny import WINDOW

MAX_LENGTH = 96
MIN_SLOTS = 16


def test_cuda_graph_decode_equals_transformers_past_the_window(tmp_path):
    """On the CUDA EP (fp16 GQA, decode steps replayed from captured CUDA graphs): greedy tokens of a
    right-padded batch whose prompts outrun GPT-Neo's local window equal transformers fp32."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=1000, hidden_size=256, num_layers=4, num_heads=2, window_size=WINDOW, max_position_embeddings=512,
        attention_types=[[["global", "local"], 2]], eos_token_id=None, bos_token_id=None)).eval()
    model.generation_config.eos_token_id = None
    prompts = default_prompts(model)
    expected = [transformers_greedy(model, [p], 32, 0)[0] for p in prompts]
    export_static_decoder(model.to("cuda").half(), tmp_path / "model.onnx", max_length=128)
    session = StaticDecoderSession(tmp_path / "model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                   max_batch=2, min_slots=64)
    assert session.cuda_graph and session.on_cuda
    for _ in range(2):  # the second call replays the graphs captured by the first
        assert generate_all_static(session, prompts, SamplingParams(max_tokens=32, temperature=0)) == expected
