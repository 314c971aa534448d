"""Serving-side session wrapper: tokenization limits, pooling, batching order; no torch import."""
import subprocess
import sys

import numpy as np
import pytest

from contract import manifest
from contract.errors import InputTooLong
from inference.encoder import EncoderSession, l2_normalize, mean_pool


@pytest.fixture(scope="module")
def tiny(tiny_bert_root):
    return manifest.load(tiny_bert_root)["tiny"], tiny_bert_root


def test_mean_pool_ignores_padding():
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask), [[2.0, 3.0]])
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(np.array([[3.0, 4.0]])), axis=1), [1.0])


def test_refuses_over_long_input_naming_it(tiny):
    entry, root = tiny
    session = EncoderSession(entry, root)
    with pytest.raises(InputTooLong, match=r"input\[1\] has \d+ tokens; tiny accepts at most 64") as info:
        session.prepare(["ok", "word " * 100])
    assert info.value.param == "input[1]"


def test_truncates_when_configured(tiny):
    entry, root = tiny
    session = EncoderSession(entry, root, truncate=True)
    (item,) = session.prepare(["word " * 100])
    assert item.tokens == 64 and item.ids[-1] == session.prepare(["x"])[0].ids[-1]  # [SEP] kept


def test_sorted_chunked_run_keeps_order(tiny):
    entry, root = tiny
    session = EncoderSession(entry, root)
    texts = ["a b c d e f", "a", "a b c", "a b c d e f g h i j", "a b"]
    items = session.prepare(texts)
    one_by_one = np.concatenate([session.run([i]) for i in items])
    np.testing.assert_allclose(session.run_sorted(items, max_rows=2), one_by_one, atol=1e-6)


def test_serving_modules_do_not_import_torch_or_tensorflow():
    code = ("import sys, serve_app, inference.encoder, serve_app.deployments.embedder, "
            "serve_app.deployments.ingress; "
            "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gemm_auto_tune_is_asked_of_cuda_sessions_only():
    """ORT reads ep.cuda.enable_gemm_auto_tune when it builds the CUDA EP's GEMM kernels; a CPU session gets
    nothing it would not use, and serving.gemm_auto_tune: false keeps cuBLAS."""
    from inference.ort import session_options

    key = "ep.cuda.enable_gemm_auto_tune"
    CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_options(1, CUDA).get_session_config_entry(key) == "1"
    for options in (session_options(1, ["CPUExecutionProvider"]), session_options(1, CUDA, gemm_auto_tune=False)):
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry(key)
