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


def test_encoder_replicas_take_the_small_hosts_cores_without_spinning(tiny, monkeypatch):
    """An encoder replica on a CPU takes its host's cores (up to 4) unless configured, and its idle intra-op
    threads sleep: the HTTP path shares those cores (BENCHMARKS.md, "Small CPU hosts")."""
    import os

    from inference.ort import AUTO_CPU_THREADS, encoder_threads

    assert encoder_threads(3, use_gpu=False) == 3 and encoder_threads(None, use_gpu=True) == 1
    assert encoder_threads(None, use_gpu=False) == min(os.cpu_count(), AUTO_CPU_THREADS)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert encoder_threads(None, use_gpu=False) == AUTO_CPU_THREADS
    session = EncoderSession(*tiny, threads=2).session
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_session_options().intra_op_num_threads == 2


def test_serve_run_embeds_in_the_ingress_on_a_small_cpu_host(monkeypatch):
    """`serve run serve_app:graph` decides what the models file leaves open for the host it runs on."""
    import os

    from contract.config import ModelConfig, ProjectConfig, ServingOptions
    from contract.settings import AppConfig, ServerSettings
    from serve_app.app import SMALL_HOST_CPUS, for_this_host

    def decided(cpus: int, num_gpus: float = 0.0, **server) -> bool:
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        model = ModelConfig(id="m", source="x/y", serving=ServingOptions(num_gpus=num_gpus))
        config = AppConfig(project=ProjectConfig(artifacts="a", models=(model,)), server=ServerSettings(**server))
        return for_this_host(config).server.embed_in_ingress

    assert decided(2) is True and decided(SMALL_HOST_CPUS) is True
    assert decided(SMALL_HOST_CPUS + 1) is False and decided(2, num_gpus=0.5) is False
    assert decided(2, embed_in_ingress=False) is False and decided(64, embed_in_ingress=True) is True
