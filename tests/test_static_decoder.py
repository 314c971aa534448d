"""The static-cache GQA decoder (the GPU fast path) on CPU: tiny random GPT-Neo / GPT-2 / LLaMA models."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from export_jobs.decoder_validate import default_prompts, static_logits_along, transformers_greedy
from export_jobs.static_decoder import StaticDecoderInfo, export_static_decoder
from serve_app.generation import DecoderSession, SamplingParams, generate_all
from serve_app.static_generation import StaticDecoderSession, generate_all_static, generate_static
from tests.test_decoder import WINDOW, _tiny_models, one_thread

MAX_LENGTH = 96
MIN_SLOTS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """model type -> (model, static graph path); exported once for the module."""
    out = {}
    for kind, model in _tiny_models().items():
        model.generation_config.eos_token_id = None  # compare full-length greedy runs
        path = tmp_path_factory.mktemp(f"static-{kind}") / "model.onnx"
        export_static_decoder(model, path, max_length=MAX_LENGTH)
        out[kind] = (model, path)
    return out


def _session(path, **kwargs) -> StaticDecoderSession:
    return StaticDecoderSession(path, session_options=one_thread(), max_batch=4, min_slots=MIN_SLOTS, **kwargs)


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama"])
def test_greedy_tokens_equal_transformers_on_a_right_padded_batch(exported, kind):
    model, path = exported[kind]
    long, short = default_prompts(model)
    assert len(long) > WINDOW  # GPT-Neo's local layers must drop keys: the window semantics are checked
    prompts = [long, short, [7]]  # three rows: bucket 4, one padding row
    expected = [transformers_greedy(model, [p], 24, 0)[0] for p in prompts]
    session = _session(path)
    assert generate_all_static(session, prompts, SamplingParams(max_tokens=24, temperature=0)) == expected
    assert sorted(session._idle) == [(4, 64)]  # 4 rows; the longest prompt + 24 tokens fits 64 slots


@pytest.mark.parametrize("kind", ["gpt_neo", "llama"])
def test_prefills_padded_to_shape_buckets_give_the_same_tokens(exported, kind):
    """As on the CUDA EP: prompt widths are padded to a power of two (here 24 -> 32, and 14 + 1 -> 16)."""
    from serve_app.static_generation import bucket_width

    model, path = exported[kind]
    long, short = default_prompts(model)
    assert [bucket_width(n, 64) for n in (1, 16, 17, 24, 40)] == [16, 16, 32, 32, 63]
    session = _session(path, shape_buckets=True)
    params = SamplingParams(max_tokens=24, temperature=0)
    for prompts in ([long, short], [short + [5]]):
        expected = [transformers_greedy(model, [p], 24, 0)[0] for p in prompts]
        assert generate_all_static(session, prompts, params) == expected


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama"])
def test_transposed_weights_give_the_same_tokens_and_logits(exported, kind, tmp_path):
    """transpose_weights: every projection is FusedMatMul over an [out, in] weight; same product."""
    model, path = exported[kind]
    info = export_static_decoder(model, tmp_path / "model.onnx", max_length=MAX_LENGTH, transpose_weights=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    per_layer = 5 if kind == "llama" else 4
    assert ops["FusedMatMul"] == info.fused_operators["FusedMatMul"] == per_layer * info.num_layers + 1
    assert ops["MatMul"] == 0
    long, short = default_prompts(model)
    tokens = generate_all_static(_session(path), [long, short], SamplingParams(max_tokens=16, temperature=0))
    plain = static_logits_along(_session(path), long, tokens[0])
    transposed = static_logits_along(_session(tmp_path / "model.onnx"), long, tokens[0])
    np.testing.assert_allclose(transposed, plain, atol=1e-4)
    assert generate_all_static(_session(tmp_path / "model.onnx"), [long, short],
                               SamplingParams(max_tokens=16, temperature=0)) == tokens


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama"])
def test_graph_is_fused_packed_and_free_of_shape_ops(exported, kind):
    """No Shape/Reshape: nothing falls back to the CPU on the CUDA EP, so CUDA graphs can capture a step.
    One packed-QKV GQA per layer, norms fused with their residual adds, as the manifest records."""
    model, path = exported[kind]
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    info = StaticDecoderInfo.load(path.parent)
    assert ops["GroupQueryAttention"] == info.num_layers == info.fused_operators["GroupQueryAttention"]
    assert not {"Shape", "Reshape", "Expand", "ConstantOfShape", "Concat", "Split"} & set(ops)
    assert all(list(n.input[1:3]) == ["", ""] for n in graph.node if n.op_type == "GroupQueryAttention")
    per_layer = 5 if kind == "llama" else 4  # packed qkv, out, MLP (fc + proj; LLaMA gate + up + down)
    assert ops["MatMul"] == per_layer * info.num_layers + 1  # + lm_head
    assert {op: ops[op] for op in info.fused_operators} == info.fused_operators
    assert (info.max_length, info.model_type) == (MAX_LENGTH, kind)


def test_gpt_neo_local_layers_carry_the_window(exported):
    model, path = exported["gpt_neo"]
    windows = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"]
    assert windows == [-1 if t == "global" else WINDOW for t in model.config.attention_layers]


def test_sampling_matches_the_dynamic_cache_loop(exported, tmp_path):
    """Same seed, same logits (to float rounding): the same sampled tokens as serve_app.generation."""
    from export_jobs.decoder_export import export_decoder

    model, path = exported["gpt2"]
    export_decoder(model, tmp_path / "model.onnx")
    dynamic = DecoderSession(tmp_path / "model.onnx", session_options=one_thread())
    prompt = default_prompts(model)[0]
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=3)
    assert generate_all_static(_session(path), [prompt], params) == generate_all(dynamic, [prompt], params)


def test_generation_stops_at_the_cache_end_and_refuses_prompts_that_fill_it(exported):
    model, path = exported["llama"]
    session = _session(path)
    prompt = list(np.arange(MAX_LENGTH - 5) % 900 + 3)
    steps = list(generate_static(session, [prompt], SamplingParams(max_tokens=50, temperature=0)))
    assert len(steps) == 5 and steps[-1].finish_reasons == ("length",)
    with pytest.raises(ValueError, match="no room"):
        list(generate_static(session, [list(range(MAX_LENGTH))], SamplingParams(max_tokens=2)))


def test_stop_tokens_end_rows_independently(exported):
    model, path = exported["gpt_neo"]
    long, short = default_prompts(model)
    free = generate_all_static(_session(path), [long, short], SamplingParams(max_tokens=12, temperature=0))
    stop = free[1][3]  # row 1's fourth token
    got = generate_all_static(_session(path), [long, short],
                              SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,)))
    assert got[1] == free[1][: free[1].index(stop) + 1]
    assert got[0] == free[0][: free[0].index(stop) + 1] if stop in free[0] else got[0] == free[0]


def test_buckets_follow_the_request_and_old_ones_go(exported):
    model, path = exported["gpt2"]
    session = _session(path, max_buckets=2)
    params = SamplingParams(max_tokens=4, temperature=0)
    for prompts in ([[5] * 10], [[5] * 10, [6] * 3], [[5] * 40]):
        generate_all_static(session, prompts, params)
    assert list(session._idle) == [(2, 16), (1, 64)]  # (1, 16) was the least recently used
    assert [b.cache[0].shape()[2] for idle in session._idle.values() for b in idle] == [16, 64]


def test_concurrent_generations_never_share_a_cache(exported):
    """Threads decoding at once (a replica serving several streams) each get their own KV buffers."""
    from concurrent.futures import ThreadPoolExecutor

    model, path = exported["gpt_neo"]
    session = _session(path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 1000, 20).tolist() for _ in range(4)]  # one bucket shape for all four
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = [generate_all_static(session, [p], params)[0] for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: generate_all_static(session, [p], params)[0], prompts))
    assert together == alone
    assert 1 <= len(session._idle[(1, 64)]) <= 4  # released again; the extra ones were made on demand


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


@pytest.mark.gpu
@pytest.mark.parametrize("transpose_weights", [False, True])
def test_cuda_graph_decode_equals_transformers_past_the_window(tmp_path, transpose_weights):
    """On the CUDA EP (fp16 GQA, decode steps replayed from captured CUDA graphs): greedy tokens of a
    right-padded batch whose prompts outrun GPT-Neo's local window equal transformers fp32."""
    import onnxruntime as ort
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=1000, hidden_size=256, num_layers=4, num_heads=2, window_size=WINDOW, max_position_embeddings=512,
        attention_types=[[["global", "local"], 2]], eos_token_id=None, bos_token_id=None)).eval()
    model.generation_config.eos_token_id = None
    prompts = default_prompts(model)
    expected = [transformers_greedy(model, [p], 32, 0)[0] for p in prompts]
    export_static_decoder(model.to("cuda").half(), tmp_path / "model.onnx", max_length=128,
                          transpose_weights=transpose_weights)
    session = StaticDecoderSession(tmp_path / "model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                   max_batch=2, min_slots=64)
    assert session.cuda_graph and session.on_cuda
    for _ in range(2):  # the second call replays the graphs captured by the first
        assert generate_all_static(session, prompts, SamplingParams(max_tokens=32, temperature=0)) == expected
