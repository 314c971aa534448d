"""The static-cache GQA decoder (the GPU fast path) on CPU: tiny random GPT-Neo / GPT-2 / LLaMA / Qwen2 models."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from export_jobs.decoder_validate import default_prompts, transformers_greedy
from export_jobs.static_decoder import StaticDecoderInfo, export_static_decoder
from inference.decode_dynamic import DecoderSession, generate_all
from inference.decode_static import (
    StaticDecoderSession,
    generate_all_static,
    generate_static,
)
from inference.sampling import SamplingParams
from tests.tiny import WINDOW, one_thread, tiny_causal_lms, tiny_qwen2

MAX_LENGTH = 96
MIN_SLOTS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """model type -> (model, static graph path); exported once for the module."""
    out = {}
    for kind, model in {**tiny_causal_lms(), "qwen2": tiny_qwen2()}.items():
        model.generation_config.eos_token_id = None  # compare full-length greedy runs
        path = tmp_path_factory.mktemp(f"static-{kind}") / "model.onnx"
        export_static_decoder(model, path, max_length=MAX_LENGTH)
        out[kind] = (model, path)
    return out


def _session(path, **kwargs) -> StaticDecoderSession:
    return StaticDecoderSession(path, session_options=one_thread(), max_batch=4, min_slots=MIN_SLOTS, **kwargs)


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama", "qwen2"])
def test_greedy_tokens_equal_transformers_alone_and_on_a_right_padded_batch(exported, kind):
    model, path = exported[kind]
    long, short = default_prompts(model)
    assert len(long) > WINDOW  # GPT-Neo's local layers must drop keys: the window semantics are checked
    prompts = [long, short, [7]]  # three rows: bucket 4, one padding row
    expected = [transformers_greedy(model, [p], 24, 0)[0] for p in prompts]
    session = _session(path)
    params = SamplingParams(max_tokens=24, temperature=0)
    assert generate_all_static(session, prompts, params) == expected
    assert generate_all_static(session, [short], params) == expected[1:2]
    assert sorted(session._idle) == [(1, 64), (4, 64)]  # the longest prompt + 24 tokens fits 64 slots


@pytest.mark.parametrize("kind", ["gpt_neo", "llama"])
def test_prefills_padded_to_shape_buckets_give_the_same_tokens(exported, kind):
    """As on the CUDA EP: prompt widths are padded to a power of two (here 24 -> 32, and 14 + 1 -> 16)."""
    from inference.decode_static import bucket_width

    model, path = exported[kind]
    long, short = default_prompts(model)
    assert [bucket_width(n, 64) for n in (1, 16, 17, 24, 40)] == [16, 16, 32, 32, 63]
    session = _session(path, shape_buckets=True)
    params = SamplingParams(max_tokens=24, temperature=0)
    for prompts in ([long, short], [short + [5]]):
        expected = [transformers_greedy(model, [p], 24, 0)[0] for p in prompts]
        assert generate_all_static(session, prompts, params) == expected


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2", "llama", "qwen2"])
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
    per_layer = 5 if kind in ("llama", "qwen2") else 4  # packed qkv, out, MLP (fc + proj; gate + up + down)
    assert ops["MatMul"] == per_layer * info.num_layers + 1  # + lm_head
    assert {op: ops[op] for op in info.fused_operators} == info.fused_operators
    assert (info.max_length, info.model_type) == (MAX_LENGTH, kind)


def test_qwen2_packed_qkv_adds_the_three_biases(exported):
    """Qwen2's q/k/v projections have biases: the packed projection adds their concatenation, in q, k, v order."""
    from onnx import numpy_helper

    model, path = exported["qwen2"]
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    for node, layer in zip(gqa, model.model.layers, strict=True):
        add = producer[node.input[0]]
        assert add.op_type == "Add" and producer[add.input[0]].op_type == "MatMul"
        attn = layer.self_attn
        biases = [p.bias.detach().numpy() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        np.testing.assert_array_equal(weights[add.input[1]], np.concatenate(biases))


def test_gpt_neo_local_layers_carry_the_window(exported):
    model, path = exported["gpt_neo"]
    windows = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"]
    assert windows == [-1 if t == "global" else WINDOW for t in model.config.attention_layers]


def test_sampling_matches_the_dynamic_cache_loop(exported, tmp_path):
    """Same seed, same logits (to float rounding): the same sampled tokens as inference.decode_dynamic."""
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
                              SamplingParams(max_tokens=12, temperature=0), stop_ids=(stop,))
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


