"""The real default generator, SmolLM2-135M-Instruct (LLaMA architecture, GQA, RoPE): both exported graphs against transformers."""
from __future__ import annotations

import pytest
import torch

from export_jobs.decoder_export import export_decoder
from export_jobs.decoder_sources import save_tokenizer
from export_jobs.decoder_validate import (
    compare_greedy,
    transformers_greedy,
)
from export_jobs.static_decoder import export_static_decoder
from inference.decode_dynamic import DecoderSession, generate_all
from inference.decode_static import StaticDecoderSession, generate_all_static
from inference.sampling import SamplingParams
from tests.tiny import one_thread

MAX_LENGTH = 96
MIN_SLOTS = 16


@pytest.mark.slow
def test_smollm2_greedy_completion(tmp_path):
    from export_jobs.decoder_sources import load_smollm2

    model, tok = load_smollm2()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = export_decoder(model, tmp_path / "model.onnx")
        save_tokenizer(tok, tmp_path)
        session = DecoderSession(tmp_path / "model.onnx", session_options=one_thread())
        prompt = tok("The capital of France is")["input_ids"]
        ours = generate_all(session, [prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
        theirs = transformers_greedy(model, [prompt], 16, pad_token_id=info.eos_token_ids[0])[0]
        assert compare_greedy("smollm2", [theirs], [ours], set(info.eos_token_ids)) == 16, tok.decode(ours)
        assert "Paris" in tok.decode(ours)
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert chat.rstrip().endswith("<|im_start|>assistant")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_static_graph_passes_the_gate(tmp_path):
    """The real default generator (LLaMA architecture, GQA 9:3 heads, RoPE) through the static graph's gate."""
    from export_jobs.decoder_sources import load_smollm2
    from export_jobs.decoder_validate import validate_static_decoder

    model, tok = load_smollm2()
    info = export_static_decoder(model, tmp_path / "model.onnx", max_length=512)
    assert info.num_kv_heads < info.num_heads and info.fused_operators["GroupQueryAttention"] == info.num_layers
    prompt = tok("The capital of France is")["input_ids"]
    figures = validate_static_decoder(model, tmp_path / "model.onnx", prompts=[prompt, prompt[:3]], new_tokens=12,
                                      tolerance=1e-3, pad_token_id=tok.pad_token_id or 0)
    assert figures["logits_max_abs_diff"] <= 1e-3 and figures["greedy_match_tokens"] >= 12
    session = StaticDecoderSession(tmp_path / "model.onnx", session_options=one_thread())
    tokens = generate_all_static(session, [prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    assert tok.decode(tokens).strip().startswith("Paris")
    # the default `optimize: int8`: its weights quantized pass their own gate and still say Paris;
    # int4 changes too many tokens of a 135M model and is refused
    from export_jobs.decoder_validate import AgreementError
    from export_jobs.weight_only import check_weight_only, quantize_weight_only

    for bits in (8, 4):
        quantize_weight_only(tmp_path / "model.onnx", tmp_path / f"model.int{bits}.onnx", bits)
    gate = check_weight_only(model, tmp_path / "model.int8.onnx", [prompt], 8, new_tokens=16)
    assert gate["top1_agree"] >= 0.9 * gate["top1_steps"] and gate["greedy_same_prefix_tokens"] >= 12
    session = StaticDecoderSession(tmp_path / "model.int8.onnx", session_options=one_thread())
    tokens = generate_all_static(session, [prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    assert tok.decode(tokens).strip().startswith("Paris")
    with pytest.raises(AgreementError):
        check_weight_only(model, tmp_path / "model.int4.onnx", [prompt, tok("def fibonacci(n):")["input_ids"]], 4,
                          new_tokens=16)
    # optimize: fp16 (the GPU option): the same graph in float16 agrees on every step and still says Paris
    from export_jobs.decoder_validate import agreement_gate
    from export_jobs.static_decoder import save_float16

    half = tmp_path / "fp16" / "model.onnx"
    save_float16(tmp_path / "model.onnx", half)
    gate = agreement_gate(model, half, [prompt], "fp16", new_tokens=16)
    assert gate["top1_agree"] == gate["top1_steps"] and gate["logits_max_abs_diff"] < 0.5
    session = StaticDecoderSession(half, session_options=one_thread())
    tokens = generate_all_static(session, [prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    assert tok.decode(tokens).strip().startswith("Paris")
