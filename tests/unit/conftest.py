"""Fixtures of the in-process HTTP tests (test_routes*.py): the tiny models behind the real routes, loaded once."""
from __future__ import annotations

import pytest

from contract import manifest
from contract.config import ModelConfig
from serve_app.backends import Backends
from serve_app.backends.embedding import EmbeddingModel
from serve_app.backends.generation import GenerationModel
from serve_app.http.schemas import model_card

EMBED, GEN = "tiny", "tiny-gpt2"  # 32-d vectors, 64 tokens; a 128-token context


@pytest.fixture(scope="session")
def tiny_gpt2_root(tmp_path_factory):
    from export_jobs.job import export_one
    from tests.tiny import make_tiny_gpt2

    source = make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), 128)[0]
    root = tmp_path_factory.mktemp("artifacts-gpt2")
    manifest.commit(root, export_one(ModelConfig(id=GEN, source=str(source), task="generation"), root))
    return root


@pytest.fixture(scope="session")
def served(tiny_bert_root, tiny_gpt2_root):
    """The two models, loaded once; each test builds its app over them (settings differ)."""
    embed_entry, gen_entry = manifest.load(tiny_bert_root)[EMBED], manifest.load(tiny_gpt2_root)[GEN]
    embedder = EmbeddingModel(embed_entry, str(tiny_bert_root))
    embedder.configure({"max_batch_size": 16})
    generator = GenerationModel(gen_entry, str(tiny_gpt2_root), stream_interval_s=0)  # an item per token
    backends = Backends(embedders={EMBED: embedder}, generators={GEN: generator})
    return backends, [model_card(embed_entry), model_card(gen_entry)]
