"""Shared fixtures: tiny real models built here, the real packaged MiniLM exported once per session,
and a local Ray instance started (and stopped) by the tests themselves."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.tiny import MINILM, free_port, make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GPU_LANE = Path(__file__).parent / "gpu"


def _cuda() -> bool:
    """onnxruntime-gpu's CUDA execution provider and a CUDA driver on this host."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu is marked gpu; gpu tests skip, all here and once, where there is no CUDA."""
    for item in items:
        if GPU_LANE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda():
        skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_root(tiny_bert_dir, tmp_path_factory) -> Path:
    """tiny_bert_dir exported (sentence mode, 64 tokens) and committed as model "tiny", once per session."""
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one

    root = tmp_path_factory.mktemp("artifacts-tiny")
    manifest.commit(root, export_one(ModelConfig(id="tiny", source=str(tiny_bert_dir)), root))
    return root


@pytest.fixture(scope="session")
def tiny_scorers_root(tmp_path_factory) -> Path:
    """A tiny random cross-encoder (task rerank, "tiny-rerank") and a 3-label classifier ("tiny-classify"), with
    MiniLM's tokenizer and a 128-token limit, exported and committed once per session."""
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from tests.tiny import make_tiny_classifier

    src, root = tmp_path_factory.mktemp("tiny-scorers"), tmp_path_factory.mktemp("artifacts-scorers")
    for model_id, task, labels in (("tiny-rerank", "rerank", 1), ("tiny-classify", "classify", 3)):
        directory = make_tiny_classifier(src / model_id, labels, seed=labels)
        manifest.commit(root, export_one(ModelConfig(id=model_id, source=str(directory), task=task), root))
    return root


@pytest.fixture(scope="session")
def minilm_root(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2, exported (sentence mode) and committed once per session."""
    from contract import manifest
    from contract.config import ModelConfig
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


@pytest.fixture(scope="session")
def minilm_speed(minilm_root):
    """(fp32 path, torch sentence module, tokenizer, spec, max_length, hf config) for MiniLM."""
    from contract import manifest
    from contract.config import Task
    from export_jobs.encoder_sources import load_encoder
    from export_jobs.sources import resolve
    from export_jobs.specs import spec_for
    from export_jobs.torch_export import SentenceEncoder

    entry = manifest.load(minilm_root)["all-MiniLM-L6-v2"]
    model, tokenizer, settings, _ = load_encoder(resolve(MINILM))
    spec = spec_for(Task.embedding, model.config.model_type)
    module = SentenceEncoder(model, spec.inputs, settings.pooling, settings.normalize).eval()
    return entry.model_path(minilm_root), module, tokenizer, spec, entry.max_length, model.config
