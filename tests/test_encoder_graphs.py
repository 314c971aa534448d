"""serve_app.encoder_graphs: padded (rows, width) buckets give the same vectors as exact-shape runs."""
import numpy as np
import onnxruntime as ort
import pytest

from export_jobs.config import ModelConfig, SpeedOption
from export_jobs.job import export_one
from serve_app.encoder_graphs import BucketedEncoder, bucket_shape
from serve_app.runtime import EncoderSession

TEXTS = ["a b c d e f", "a", "a b c", "a b c d e f g h i j", "a b"]


@pytest.fixture(scope="module", params=["sentence", "plain"])
def tiny(request, tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"graphs-{request.param}")
    return export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir), mode=request.param), root), root


def test_bucket_shapes():
    assert bucket_shape(1, 6) == (1, 16)
    assert bucket_shape(3, 17) == (4, 32)
    assert bucket_shape(64, 512) == (64, 512)
    assert bucket_shape(65, 8) is None and bucket_shape(1, 513) is None


def test_buckets_match_exact_shapes_and_over_limit_batches_run_plain(tiny):
    entry, root = tiny
    plain = EncoderSession(entry, root, threads=1)
    bucketed = EncoderSession(entry, root, threads=1)
    bucketed.graphs = BucketedEncoder(bucketed.session, bucketed.dim, cuda_graph=False, max_graphs=2)
    items = plain.prepare(TEXTS)
    for batch in (items, items[:1], items[1:4]):
        np.testing.assert_allclose(bucketed.run(batch), plain.run(batch), atol=1e-5)
    assert set(bucketed.graphs.buckets) == {(8, 16), (1, 16)}  # 5 rows -> 8; (3 rows -> 4) over the limit of 2
    many = plain.prepare([f"sentence {i}" for i in range(70)])  # 70 rows: beyond the largest bucket
    np.testing.assert_allclose(bucketed.run(many), plain.run(many), atol=1e-5)
    assert not bucketed.quick(items[:1]) and not plain.quick(items[:1])  # no CUDA graphs: always a worker thread


@pytest.mark.gpu
def test_cuda_graph_buckets_on_a_fused_fp16_export(tiny_bert_dir, tmp_path):
    """On the CUDA EP a fused fp16 artifact is served from captured graphs, with the fp16 gate's parity."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    entry = export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir), optimize=SpeedOption.fp16), tmp_path)
    gpu = EncoderSession(entry, tmp_path, use_gpu=True)
    assert gpu.graphs is not None and gpu.graphs.cuda_graph
    assert gpu.session.get_session_options().get_session_config_entry("ep.cuda.enable_gemm_auto_tune") == "1"
    cpu = EncoderSession(entry, tmp_path)
    items = cpu.prepare(TEXTS)
    assert not gpu.quick(items[:1])  # not captured yet: the capture runs off the event loop
    for _ in range(2):  # the first call captures, the second replays
        for batch in (items, items[:1]):
            np.testing.assert_allclose(gpu.run(batch), cpu.run(batch), atol=5e-3)
    long = cpu.prepare([" ".join(["word"] * 40)] * 16)  # bucket 16 x 64 = 1024 padded tokens: over QUICK_TOKENS
    gpu.run(long)
    assert gpu.quick(items[:1]) and gpu.quick(items) and not gpu.quick(long)
