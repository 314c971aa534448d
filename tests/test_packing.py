"""Packing mode (export_jobs.packing) on a tiny fused BERT: the rewrite and the checks that guard it.

The packed ops (RemovePadding, PackedAttention, RestorePadding) have CUDA kernels only; the GPU suite
runs them (bench/gpu_suite.py). Here: the graph the rewrite produces, and its refusals."""
from __future__ import annotations

import collections

import onnx
import pytest


@pytest.fixture(scope="module")
def fused_fp16(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    from export_jobs.config import SpeedOption
    from export_jobs.optimize import apply_speed_option
    from export_jobs.specs import BertSpec
    from export_jobs.torch_export import SentenceEncoder, example_inputs, export_module

    config = BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = SentenceEncoder(BertModel(config, add_pooling_layer=False).eval(), BertSpec.inputs, "mean", False).eval()
    out = tmp_path_factory.mktemp("packing")
    export_module(module, BertSpec(), example_inputs(BertSpec.inputs, config.vocab_size), module.output_names,
                  out / "fp32.onnx", 18)
    apply_speed_option(out / "fp32.onnx", out / "fp16.onnx", SpeedOption.fp16, config)
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
