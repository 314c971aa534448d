"""export_jobs.attention_bias: the Q/K/V bias moved out of MultiHeadAttention gives the same embeddings.

ORT's CPU EP runs MultiHeadAttention, so the equivalence is checked here on a tiny BERT whose biases are all
non-zero; the packed graph (PackedMultiHeadAttention has CUDA kernels only) is checked for its wiring, and the
GPU suite times and checks it against torch (bench/gpu_suite.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@pytest.fixture(scope="module")
def mha_graph(tmp_path_factory):
    from export_jobs.optimize import fuse
    from tests.conftest import export_eager_bert

    out = tmp_path_factory.mktemp("attention-bias")
    fp32, config = export_eager_bert(out, vocab=300, hidden=32, heads=4, intermediate=37, random_biases=True)
    fuse(fp32, out / "mha.onnx", config, multi_head=True, expected={"MultiHeadAttention": 2})
    return out / "mha.onnx"


def feeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:], mask[2, 2:] = 0, 0  # right padding, as a tokenizer pads
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_moved_bias_gives_the_same_embeddings(mha_graph, tmp_path):
    from export_jobs.attention_bias import move_attention_bias

    model = onnx.load(str(mha_graph))
    assert move_attention_bias(model) == 2
    for node in (n for n in model.graph.node if n.op_type == "MultiHeadAttention"):
        assert node.input[3] == ""  # no bias: ORT's kernels read Q, K, V in place
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "moved.onnx"))
    before = ort.InferenceSession(str(mha_graph)).run(None, feeds())[0]
    after = ort.InferenceSession(str(tmp_path / "moved.onnx")).run(None, feeds())[0]
    assert np.abs(before).max() > 0.1
    np.testing.assert_allclose(after, before, atol=1e-5)
    dropped_only = onnx.load(str(mha_graph))  # dropping the bias instead of moving it is caught
    for node in (n for n in dropped_only.graph.node if n.op_type == "MultiHeadAttention"):
        node.input[3] = ""
    onnx.save(dropped_only, str(tmp_path / "dropped.onnx"))
    assert np.abs(ort.InferenceSession(str(tmp_path / "dropped.onnx")).run(None, feeds())[0] - before).max() > 1e-2


def test_packed_graph_gets_the_same_rewrite(mha_graph, tmp_path):
    from export_jobs.attention_bias import move_attention_bias
    from export_jobs.packing import to_packing_mode, to_static_packing

    to_packing_mode(mha_graph, tmp_path / "packed.onnx")
    to_static_packing(tmp_path / "packed.onnx", tmp_path / "static.onnx")
    model = onnx.load(str(tmp_path / "static.onnx"))
    assert move_attention_bias(model) == 2
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in (n for n in model.graph.node if n.op_type == "PackedMultiHeadAttention"):
        assert node.input[3] == "" and producers[node.input[0]].op_type == "Add"
    names = {t.name for t in model.graph.initializer}
    assert not any(name.endswith("qkv_bias") for name in names)  # the moved biases are gone, not left unused
    onnx.checker.check_model(model)


def test_a_graph_it_does_not_understand_is_left_alone(mha_graph):
    from export_jobs.attention_bias import move_attention_bias

    model = onnx.load(str(mha_graph))
    for node in model.graph.node:
        if node.op_type == "SkipLayerNormalization":
            del node.input[4:]  # no bias after the output projection: nowhere to put V's
    text = model.SerializeToString()
    assert move_attention_bias(model) == 0 and model.SerializeToString() == text
