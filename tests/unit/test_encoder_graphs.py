"""inference.cuda_buckets: padded (rows, width) buckets give the same vectors as exact-shape runs."""
import numpy as np
import pytest

from contract.config import ModelConfig
from export_jobs.job import export_one
from inference.cuda_buckets import BucketedEncoder, bucket_shape
from inference.encoder import EncoderSession

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


