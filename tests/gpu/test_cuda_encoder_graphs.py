"""inference.cuda_buckets: padded (rows, width) buckets give the same vectors as exact-shape runs."""
import numpy as np

from contract.config import ModelConfig, SpeedOption
from export_jobs.job import export_one
from inference.encoder import EncoderSession

TEXTS = ["a b c d e f", "a", "a b c", "a b c d e f g h i j", "a b"]


def test_cuda_graph_buckets_on_a_fused_fp16_export(tiny_bert_dir, tmp_path):
    """On the CUDA EP a fused fp16 artifact is served from captured graphs, with the fp16 gate's parity."""
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
