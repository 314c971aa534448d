"""Speed options on the real packaged MiniLM: each new file passes its own gate against torch."""
from __future__ import annotations

import pytest

from tests.tiny import MINILM, speed_gate

pytestmark = pytest.mark.slow


def test_fused_minilm_fuses_attention_and_passes_its_gate(minilm_speed, tmp_path):
    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    fp32, *_, config = minilm_speed
    figures = apply_speed_option(fp32, tmp_path / "model.fused.onnx", SpeedOption.fused, config)
    assert figures["fusions"]["Attention"] == config.num_hidden_layers
    assert figures["fusions"]["SkipLayerNormalization"] == 2 * config.num_hidden_layers
    gate = speed_gate(minilm_speed, tmp_path / "model.fused.onnx", SpeedOption.fused)
    assert gate["max_abs_diff"] <= 1e-4 and gate["min_cosine"] >= 0.9999 and gate["cases"] == 7


def test_int8_minilm_is_smaller_and_close(minilm_speed, tmp_path):
    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    fp32, *_, config = minilm_speed
    figures = apply_speed_option(fp32, tmp_path / "model.int8.onnx", SpeedOption.int8, config)
    assert figures["bytes"] < 0.7 * figures["source_bytes"]  # the embedding table stays fp32
    assert figures["int8"]["kept_fp32"] == 0 and "Attention" in figures["int8"]["op_types"]
    gate = speed_gate(minilm_speed, tmp_path / "model.int8.onnx", SpeedOption.int8)
    assert gate["min_cosine"] >= 0.97
    ranked = gate["ranking"]  # the retrieval check: 100 queries over 1,000 sentences against torch fp32
    assert (ranked["queries"], ranked["corpus"]) == (100, 1000)
    assert ranked["overlap"] >= 0.85 and ranked["top1"] >= 0.8 and ranked["ndcg"] >= 0.99


def test_fp16_minilm_passes_its_gate_on_cpu(minilm_speed, tmp_path):
    """ORT's CPU EP runs the fp16 graph (keep_io_types), so the relaxed gate is checked here too."""
    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    fp32, *_, config = minilm_speed
    apply_speed_option(fp32, tmp_path / "model.fp16.onnx", SpeedOption.fp16, config)
    gate = speed_gate(minilm_speed, tmp_path / "model.fp16.onnx", SpeedOption.fp16)
    assert gate["min_cosine"] >= 0.999 and gate["max_abs_diff"] <= 1e-2


def test_missing_fusion_is_a_typed_error(tiny_bert_dir, tmp_path, monkeypatch):
    """An export that feeds transformers 5's own mask (what we exported before) fuses no Attention."""
    from contract.config import SpeedOption, Task
    from export_jobs import torch_export
    from export_jobs.encoder_sources import load_encoder
    from export_jobs.optimize import FusionError, apply_speed_option
    from export_jobs.sources import resolve
    from export_jobs.specs import spec_for
    from export_jobs.validate import ExportError

    model, _, _, _ = load_encoder(resolve(str(tiny_bert_dir)))
    spec = spec_for(Task.embedding, model.config.model_type)
    monkeypatch.setattr(torch_export, "additive_mask", lambda mask, dtype: mask)
    module = torch_export.SentenceEncoder(model, spec.inputs, "mean", False)
    fp32 = tmp_path / "old.onnx"
    torch_export.export_module(module, spec, torch_export.example_inputs(spec.inputs, model.config.vocab_size),
                               module.output_names, fp32, 18)
    with pytest.raises(FusionError) as info:
        apply_speed_option(fp32, tmp_path / "fused.onnx", SpeedOption.fused, model.config)
    assert isinstance(info.value, ExportError)
    assert "Attention" in info.value.missing and info.value.missing["Attention"][0] == 0
    assert not (tmp_path / "fused.onnx").exists()


def test_none_is_not_a_speed_option(tmp_path):
    from contract.config import SpeedOption
    from export_jobs.optimize import apply_speed_option

    with pytest.raises(ValueError):
        apply_speed_option(tmp_path / "a.onnx", tmp_path / "b.onnx", SpeedOption.none, None)


def test_speed_option_in_the_pipeline_serves_only_a_gated_variant(tmp_path, monkeypatch):
    """optimize: int8 in a model's config -> the manifest points at the int8 file, gated on its own;
    a variant that fails its gate never reaches the manifest."""
    import numpy as np

    from contract import manifest
    from contract.config import ModelConfig, SpeedOption
    from export_jobs import optimize
    from export_jobs.job import export_one
    from export_jobs.validate import CosineError
    from inference.encoder import EncoderSession

    cfg = ModelConfig(id="m", source=MINILM, optimize="int8")
    entry = export_one(cfg, tmp_path)
    assert entry.model_file == "model.int8.onnx" and entry.precision == "int8"
    assert entry.parity.details["min_cosine"] >= 0.97 and entry.metadata.speed["fusions"]["Attention"] == 6
    assert entry.metadata.speed["gate"]["ranking"]["ndcg"] >= 0.99
    session = EncoderSession(entry, tmp_path)
    vec = session.run(session.prepare(["quantized but close"]))
    assert vec.shape == (1, 384) and abs(np.linalg.norm(vec) - 1) < 1e-3

    manifest.commit(tmp_path, entry)
    strict = dict(optimize.GATES, **{SpeedOption.int8: optimize.Gate(min_cosine=0.99999, max_abs_diff=0.1)})
    monkeypatch.setattr(optimize, "GATES", strict)
    with pytest.raises(CosineError):
        export_one(cfg.model_copy(update={"opset": 17}), tmp_path)
    assert manifest.load(tmp_path)["m"] == entry


def test_auto_serves_int8_on_cpus_and_fp32_on_gpus(minilm_root, tmp_path, monkeypatch):
    """optimize: auto -> the entry's graph stays fp32 (GPU replicas), the int8 file beside it is what a CPU
    replica loads; where int8 fails its gate the export still succeeds and CPUs serve fp32."""
    import numpy as np

    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs import ranking
    from export_jobs.job import export_one
    from inference.encoder import EncoderSession

    cfg = ModelConfig(id="m", source=MINILM, optimize="auto")
    entry = export_one(cfg, tmp_path)
    assert entry.model_file == "model.onnx" and entry.metadata.cpu_file == "model.int8.onnx"
    assert {f.name for f in entry.files} >= {"model.onnx", "model.int8.onnx"}
    assert entry.parity.max_abs_diff <= 1e-4  # the fp32 graph's own gate
    assert entry.metadata.speed["gate"]["ranking"]["overlap"] >= 0.85
    session = EncoderSession(entry, tmp_path)
    assert session.model_file == "model.int8.onnx"
    fp32 = EncoderSession(manifest.load(minilm_root)["all-MiniLM-L6-v2"], minilm_root)
    texts = ["a quantized graph on a CPU", "the same sentence embedded twice"]
    cosine = np.sum(session.run(session.prepare(texts)) * fp32.run(fp32.prepare(texts)), axis=1)
    assert cosine.min() > 0.97

    monkeypatch.setattr(ranking, "GATE", ranking.RankingGate(min_overlap=1.01))
    refused = export_one(cfg.model_copy(update={"opset": 17}), tmp_path)
    assert refused.metadata.cpu_file is None and "overlap@10" in refused.metadata.speed["refused"]
    assert "model.int8.onnx" not in {f.name for f in refused.files}
    assert EncoderSession(refused, tmp_path).model_file == "model.onnx"
