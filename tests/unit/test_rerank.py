"""Rerank and classify over HTTP, in-process: tiny random BertForSequenceClassification models (MiniLM's
tokenizer) exported and gated, served by the real routes; every score checked against transformers itself."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch

from contract import manifest
from contract.config import ModelConfig, Task
from contract.settings import ServerSettings
from serve_app.backends import Backends
from serve_app.backends.classifier import ClassifierModel
from serve_app.backends.embedding import EmbeddingModel
from serve_app.http.routes import create_app
from serve_app.http.schemas import model_card

RERANK, CLASSIFY, EMBED = "tiny-rerank", "tiny-classify", "tiny"
SETTINGS = ServerSettings(max_inputs_per_request=32, max_input_chars=20_000)
QUERY = "what is the capital of france?"
DOCS = ["Paris is the capital and most populous city of France.", "Berlin is the capital of Germany.", "ok",
        "Bananas are yellow. " * 5, "the capital of france, paris, lies on the seine",
        " ".join(["A very long document that runs past the model's token limit."] * 30)]


def send(app, method: str, url: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            return await client.request(method, url, **kwargs)
    return asyncio.run(go())


def hf(root, model_id):
    """transformers' own model and tokenizer, from the source the artifact was exported from."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    entry = manifest.load(root)[model_id]
    model = AutoModelForSequenceClassification.from_pretrained(entry.source).eval()
    return model, AutoTokenizer.from_pretrained(entry.source), entry.max_length


def hf_logits(root, model_id, texts, pairs=None) -> np.ndarray:
    model, tokenizer, limit = hf(root, model_id)
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits.float().numpy()


@pytest.fixture(scope="module")
def served(tiny_scorers_root, tiny_bert_root):
    entries = manifest.load(tiny_scorers_root)
    classifiers = {m: ClassifierModel(entries[m], str(tiny_scorers_root)) for m in (RERANK, CLASSIFY)}
    embed = manifest.load(tiny_bert_root)[EMBED]
    backends = Backends(embedders={EMBED: EmbeddingModel(embed, str(tiny_bert_root))}, classifiers=classifiers)
    cards = [model_card(entries[RERANK]), model_card(entries[CLASSIFY]), model_card(embed)]
    return create_app(backends, cards, SETTINGS), classifiers


def test_rerank_scores_are_transformers_sigmoid_sorted_and_cut_at_top_n(served, tiny_scorers_root):
    app, _ = served
    expected = 1 / (1 + np.exp(-hf_logits(tiny_scorers_root, RERANK, [QUERY] * len(DOCS), DOCS)[:, 0]))
    r = send(app, "POST", "/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results] == list(np.argsort(-expected, kind="stable"))
    for x in results:
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-4 and "document" not in x
    # the long document was truncated longest_first at the 128-token limit; usage counts the tokens that ran
    _, tokenizer, limit = hf(tiny_scorers_root, RERANK)
    ran = tokenizer([QUERY] * len(DOCS), DOCS, truncation=True, max_length=limit)["input_ids"]
    assert max(map(len, ran)) == limit and body["usage"]["total_tokens"] == sum(map(len, ran))
    top = send(app, "POST", "/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCS, "top_n": 2,
                                                "return_documents": True}).json()["results"]
    assert [(x["index"], x["document"]["text"]) for x in top] == [(x["index"], DOCS[x["index"]]) for x in results[:2]]


def test_classify_labels_and_probabilities_are_transformers(served, tiny_scorers_root):
    app, _ = served
    texts = ["I loved it", "terrible, would not buy again", "ok", "word " * 300]
    probs = torch.softmax(torch.from_numpy(hf_logits(tiny_scorers_root, CLASSIFY, texts)), -1).numpy()
    r = send(app, "POST", "/v1/classify", json={"model": CLASSIFY, "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    labels = ["negative", "neutral", "positive"]
    assert [d["label"] for d in data] == [labels[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([d["probs"] for d in data], probs, atol=1e-4)
    one = send(app, "POST", "/v1/classify", json={"model": CLASSIFY, "input": "ok"}).json()
    assert one["data"][0]["probs"] == data[2]["probs"] and one["usage"]["total_tokens"] == 3


def test_models_list_rerank_and_classify_with_labels_and_parity(served):
    cards = {c["id"]: c for c in send(served[0], "GET", "/v1/models").json()["data"]}
    assert cards[RERANK]["task"] == "rerank" and cards[RERANK]["labels"] == ["score"]
    assert cards[CLASSIFY]["task"] == "classify" and cards[CLASSIFY]["labels"] == ["negative", "neutral", "positive"]
    assert cards[RERANK]["parity_max_abs_diff"] < 1e-4 and cards[CLASSIFY]["parity_score_max_abs_diff"] < 1e-4


BAD = [  # url, body, status, param
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": []}, 400, "documents"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": ["ok", ""]}, 400, "documents[1]"),
    ("/v1/rerank", {"model": RERANK, "query": "", "documents": ["ok"]}, 400, "query"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": ["d"] * 33}, 400, "documents"),
    ("/v1/rerank", {"model": RERANK, "query": QUERY, "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ("/v1/rerank", {"model": CLASSIFY, "query": QUERY, "documents": ["d"]}, 400, "model"),
    ("/v1/rerank", {"model": EMBED, "query": QUERY, "documents": ["d"]}, 400, "model"),
    ("/v1/rerank", {"model": "nope", "query": QUERY, "documents": ["d"]}, 404, "model"),
    ("/v1/classify", {"model": CLASSIFY, "input": []}, 400, "input"),
    ("/v1/classify", {"model": CLASSIFY, "input": ""}, 400, "input"),
    ("/v1/classify", {"model": RERANK, "input": "x"}, 400, "model"),
    ("/v1/classify", {"model": "nope", "input": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": RERANK, "input": "x"}, 400, "model"),
]


@pytest.mark.parametrize("url,body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_rerank_and_classify_requests(served, url, body, status, param):
    r = send(served[0], "POST", url, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_refusing_truncation_names_the_document(tiny_scorers_root):
    entry = manifest.load(tiny_scorers_root)[RERANK]
    model = ClassifierModel(entry, str(tiny_scorers_root), truncate=False)
    app = create_app(Backends(classifiers={RERANK: model}), [model_card(entry)], SETTINGS)
    r = send(app, "POST", "/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[5]", r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_scoring_tasks_truncate_unless_told_and_refuse_mismatched_models(tmp_path):
    from export_jobs.classifier_job import labels_for
    from export_jobs.specs import UnsupportedModelError

    assert ModelConfig(id="r", source="x", task="rerank").truncate
    assert not ModelConfig(id="r", source="x", task="rerank", truncate=False).truncate
    assert not ModelConfig(id="e", source="x").truncate  # embeddings: as before (refuse)

    class Config:
        num_labels, id2label = 3, {0: "a", 1: "b", 2: "c"}
    with pytest.raises(UnsupportedModelError, match="one-logit"):
        labels_for(Task.rerank, Config)
    assert labels_for(Task.classify, Config) == ("a", "b", "c")


def test_the_gate_refuses_an_artifact_of_other_weights(tiny_scorers_root, tmp_path):
    """The classify artifact checked against a classifier of the same shape but other weights: refused."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export_jobs.classifier_job import check_classifier
    from export_jobs.specs import spec_for
    from export_jobs.validate import ParityError
    from inference.classifier import PairPreparer
    from tests.tiny import make_tiny_classifier

    entry = manifest.load(tiny_scorers_root)[CLASSIFY]
    other = make_tiny_classifier(tmp_path / "other", 3, seed=7)
    model = AutoModelForSequenceClassification.from_pretrained(other, attn_implementation="eager").eval()
    preparer = PairPreparer(Tokenizer.from_file(str(entry.dir_path(tiny_scorers_root) / entry.metadata.tokenizer)),
                            CLASSIFY, entry.max_length, True)
    with pytest.raises(ParityError, match="logits"):
        check_classifier(model, entry.model_path(tiny_scorers_root), AutoTokenizer.from_pretrained(other), preparer,
                         spec_for(Task.classify, "bert"), Task.classify, 1e-4)
