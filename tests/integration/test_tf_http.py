"""USE multilingual (TF string ops -> ONNX + onnxruntime-extensions) over /v1/embeddings, raw text in."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from contract import manifest
from contract.config import ModelConfig, ProjectConfig
from contract.settings import AppConfig
from export_jobs.job import export_one
from serve_app.app import build

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def use_server(serve_url, use_multilingual, tmp_path_factory):  # noqa: F811
    from ray import serve

    root = tmp_path_factory.mktemp("art-use")
    cfg = ModelConfig(id="use-multilingual", source=str(use_multilingual.saved_model_dir))
    entry = export_one(cfg, root)  # the same gate as `serve run`: TF vs ORT in separate processes
    assert entry.input_kind == "text" and entry.dim == 512
    manifest.commit(root, entry)
    serve.run(build(AppConfig(project=ProjectConfig(artifacts=str(root), models=(cfg,))), manifest.load(root)),
              name="use", route_prefix="/")
    yield serve_url, entry, root
    serve.delete("use")


def test_use_embeddings_over_http_in_several_languages(use_server):
    from openai import OpenAI

    from inference.string_encoder import StringEncoderSession

    url, entry, root = use_server
    texts = ["The weather is lovely today.", "Das Wetter ist heute schön.", "今天天气很好。", "Погода хорошая."]
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    got = np.array([d.embedding for d in client.embeddings.create(model="use-multilingual", input=texts).data])
    assert got.shape == (4, 512)
    direct = StringEncoderSession(entry.model_path(root)).embed(texts)
    np.testing.assert_allclose(got, direct, atol=1e-6)
    sims = got @ got.T / np.outer(np.linalg.norm(got, axis=1), np.linalg.norm(got, axis=1))
    assert sims[0, 1:].min() > 0.5  # the same sentence in four languages lands close together


def test_use_rejects_empty_input(use_server):
    url, _, _ = use_server
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "use-multilingual", "input": ["ok", ""]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"


def test_use_refuses_token_ids_and_tokenize_saying_why(use_server):
    """The graph tokenizes: ids, truncation and /tokenize get a 400 from the ingress's prepare step (TextOnly)."""
    url, _, _ = use_server
    for path, body in [("/v1/embeddings", {"input": [[101, 102]]}),
                       ("/v1/embeddings", {"input": "ok", "truncate_prompt_tokens": 4}),
                       ("/tokenize", {"prompt": "ok"})]:
        r = httpx.post(f"{url}{path}", json={"model": "use-multilingual", **body})
        assert r.status_code == 400 and "its graph tokenizes the text itself" in r.json()["error"]["message"], r.text
