"""Packing mode (export_jobs.packing) on a tiny fused BERT: the rewrite and the checks that guard it.

The packed ops (RemovePadding, PackedAttention, RestorePadding) have CUDA kernels only; the GPU suite
runs them (bench/gpu_suite.py). Here: the graph the rewrite produces, and its refusals."""
from __future__ import annotations

import collections

import onnx
import pytest


@pytest.fixture(scope="module")
def fused_fp16(tmp_path_factory):
    from export_jobs.config import SpeedOption
    from export_jobs.optimize import apply_speed_option
    from tests.conftest import export_eager_bert

    out = tmp_path_factory.mktemp("packing")
    fp32, config = export_eager_bert(out, vocab=2000, hidden=64, heads=4, intermediate=128)
    apply_speed_option(fp32, out / "fp16.onnx", SpeedOption.fp16, config)
    return out / "fp16.onnx"


def test_every_layer_runs_on_real_tokens_only(fused_fp16, tmp_path):
    from export_jobs.packing import to_packing_mode

    figures = to_packing_mode(fused_fp16, tmp_path / "packed.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "packed.onnx")).graph.node)
    assert ops["PackedAttention"] == 2 and ops["Attention"] == 0
    assert ops["RemovePadding"] == ops["RestorePadding"] == 1
    assert figures["packed_region_nodes"] >= 2 * 7  # per layer: attention, 3 MatMuls, BiasGelu, 2 SkipLayerNorms
    graph = onnx.load(str(tmp_path / "packed.onnx")).graph
    restore = next(n for n in graph.node if n.op_type == "RestorePadding")
    consumers = [n.op_type for n in graph.node if restore.output[0] in n.input]
    assert consumers and "PackedAttention" not in consumers  # the pooling sees [batch, seq, hidden] again


def test_a_graph_without_fused_attention_is_refused(fused_fp16, tmp_path):
    from export_jobs.packing import PackingError, to_packing_mode

    unfused = fused_fp16.parent / "fp32.onnx"
    with pytest.raises(PackingError, match="no fused Attention"):
        to_packing_mode(unfused, tmp_path / "packed.onnx")
    assert not (tmp_path / "packed.onnx").exists()


def test_static_packing_takes_the_padding_removal_out_of_the_graph(fused_fp16, tmp_path):
    """RemovePadding (a data-dependent shape: no CUDA graph) becomes a Gather over the caller's indices."""
    from export_jobs.packing import STATIC_INPUTS, to_packing_mode, to_static_packing

    to_packing_mode(fused_fp16, tmp_path / "packed.onnx")
    to_static_packing(tmp_path / "packed.onnx", tmp_path / "static.onnx")
    graph = onnx.load(str(tmp_path / "static.onnx")).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["RemovePadding"] == 0 and ops["PackedAttention"] == 2 and ops["RestorePadding"] == 1
    assert [i.name for i in graph.input][-3:] == list(STATIC_INPUTS)
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == STATIC_INPUTS[0])
    for node in (n for n in graph.node if n.op_type == "PackedAttention"):
        assert node.input[3:5] == list(STATIC_INPUTS[1:])
    first = next(n for n in graph.node if n.op_type == "PackedAttention")
    assert first.input[0] == gather.output[0] and first.input[3:5] == list(STATIC_INPUTS[1:])
    restore = next(n for n in graph.node if n.op_type == "RestorePadding")
    assert restore.input[1] == STATIC_INPUTS[1]


def test_static_packing_feeds_pack_real_tokens_first_and_bucket_the_count():
    import numpy as np

    from export_jobs.packing import PackingError, STATIC_INPUTS, static_packing_feeds

    lengths = [3, 8, 1, 5]
    mask = (np.arange(8)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = (np.arange(1, 33).reshape(4, 8) * mask).astype(np.int64)
    feeds = static_packing_feeds({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    index, offset, cu = (feeds[name] for name in STATIC_INPUTS)
    assert feeds["input_ids"].shape == (5, 8) and index.shape == (24,)  # 17 real tokens -> 24, 7 in the spare row
    assert feeds["attention_mask"][4].tolist() == [1] * 7 + [0]
    real = np.concatenate([ids[r, :n] for r, n in enumerate(lengths)])
    assert feeds["input_ids"].ravel()[index][:17].tolist() == real.tolist()  # the packed ids, row by row
    assert cu.tolist() == [0, 3, 11, 12, 17, 24]
    assert sorted(offset.ravel().tolist()) == list(range(40)) and offset.ravel()[:24].tolist() == index.tolist()
    assert offset.dtype == cu.dtype == np.int32 and index.dtype == np.int64
    # a batch with other lengths but a token count in the same bucket has the same shapes: one captured graph
    five = np.repeat((np.arange(8)[None, :] < 5).astype(np.int64), 4, axis=0)  # 20 tokens: the same bucket
    other = static_packing_feeds({"input_ids": ids * five, "attention_mask": five, "token_type_ids": five * 0})
    assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in feeds.items()}
    with pytest.raises(PackingError, match="right padding"):
        static_packing_feeds({"input_ids": ids, "attention_mask": mask[:, ::-1].copy()})
    with pytest.raises(PackingError, match="granularity"):
        static_packing_feeds({"input_ids": ids, "attention_mask": mask}, granularity=9)
    with pytest.raises(PackingError, match="shape"):
        static_packing_feeds({"input_ids": ids[:3], "attention_mask": mask})


@pytest.mark.gpu
def test_static_packing_replays_a_cuda_graph_with_the_fp16_results(fused_fp16, tmp_path):
    """On the CUDA EP: the statically packed graph, captured once, gives what the padded fp16 graph gives,
    for two batches of the same bucket."""
    import numpy as np
    import onnxruntime as ort

    from export_jobs.packing import static_packing_feeds, to_packing_mode, to_static_packing

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    to_packing_mode(fused_fp16, tmp_path / "packed.onnx")
    to_static_packing(tmp_path / "packed.onnx", tmp_path / "static.onnx")
    padded = ort.InferenceSession(str(fused_fp16), providers=["CUDAExecutionProvider"])
    static = ort.InferenceSession(str(tmp_path / "static.onnx"),
                                  providers=[("CUDAExecutionProvider", {"enable_cuda_graph": True})])
    rng = np.random.default_rng(0)
    binding, buffers = static.io_binding(), {}
    out = None
    for lengths in ([16, 9, 4, 12], [10, 16, 7, 8]):  # 41 tokens each: both in the 48-token bucket
        mask = (np.arange(16)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        feeds = {"input_ids": rng.integers(5, 2000, (4, 16)) * mask, "attention_mask": mask,
                 "token_type_ids": np.zeros((4, 16), np.int64)}
        want = padded.run(None, feeds)[0]
        packed = static_packing_feeds(feeds)
        if not buffers:  # fixed device buffers: the captured graph reads and writes the same memory every time
            buffers = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in packed.items()}
            for k, v in buffers.items():
                binding.bind_ortvalue_input(k, v)
            out = ort.OrtValue.ortvalue_from_shape_and_type((5, want.shape[1]), np.float32, "cuda", 0)
            binding.bind_ortvalue_output(static.get_outputs()[0].name, out)
        else:
            for k, v in packed.items():
                buffers[k].update_inplace(v)
        static.run_with_iobinding(binding)
        np.testing.assert_allclose(out.numpy()[:4], want, atol=5e-3)
