"""Weight-only int8 / int4 decoders (MatMulNBits) on CPU: every projection quantized, gated on top-1
agreement with transformers fp32, served only past the gate."""
from __future__ import annotations

import pytest

from export_jobs.decoder_validate import default_prompts
from export_jobs.static_decoder import export_static_decoder
from export_jobs.weight_only import check_weight_only, quantize_weight_only
from inference.decode_static import StaticDecoderSession, generate_all_static
from inference.sampling import SamplingParams


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_quantized_decode_steps_replay_as_cuda_graphs(tmp_path, bits):
    """An fp16 static graph's int8 / int4 copy (what gpu_suite times) on the CUDA EP: decode steps replayed
    from captured CUDA graphs write the same tokens as the same file run step by step; int8 passes its gate."""
    import copy

    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

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
