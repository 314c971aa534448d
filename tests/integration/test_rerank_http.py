"""Rerank and classify through Ray Serve: a models file served with serve_app:graph (the artifacts already
exported, so nothing is exported again), each model in its own Classifier deployment, concurrent requests."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import yaml

from contract import manifest
from inference.classifier import ClassifierSession, sigmoid

pytestmark = [pytest.mark.slow, pytest.mark.ray]
RERANK, CLASSIFY = "tiny-rerank", "tiny-classify"


@pytest.fixture(scope="module")
def server(serve_url, tiny_scorers_root, tmp_path_factory):
    from ray import serve

    from serve_app.app import graph

    entries = manifest.load(tiny_scorers_root)
    models = [{"id": m, "source": entries[m].source, "task": entries[m].task,
               "serving": {"num_cpus": 0.5, "max_batch_size": 8}} for m in (RERANK, CLASSIFY)]
    config = tmp_path_factory.mktemp("models") / "models.yaml"
    config.write_text(yaml.safe_dump({"artifacts": str(tiny_scorers_root), "models": models}))
    serve.run(graph({"config": str(config), "export": False}), name="scorers", route_prefix="/")
    yield serve_url
    serve.delete("scorers")


def test_deployments_models_and_ready(server):
    from ray import serve

    assert set(serve.status().applications["scorers"].deployments) == {
        "Ingress", f"rerank-{RERANK}", f"classify-{CLASSIFY}"}
    cards = {c["id"]: c for c in httpx.get(f"{server}/v1/models").json()["data"]}
    assert cards[RERANK]["task"] == "rerank" and cards[CLASSIFY]["labels"] == ["negative", "neutral", "positive"]
    assert httpx.get(f"{server}/ready").json()["models"] == {RERANK: True, CLASSIFY: True}


def test_concurrent_reranks_equal_the_session(server, tiny_scorers_root):
    queries = [f"question {i} about rivers" for i in range(12)]
    docs = [f"passage {j}: the river runs {'far ' * j}to the sea" for j in range(20)]

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/rerank", json={
                "model": RERANK, "query": q, "documents": docs, "top_n": 5}) for q in queries))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(queries)
    session = ClassifierSession(manifest.load(tiny_scorers_root)[RERANK], tiny_scorers_root)
    for query, r in zip(queries, responses):
        scores = sigmoid(session.run(session.preparer.pairs(query, docs))[:, 0])
        results = r.json()["results"]
        assert [x["index"] for x in results] == list(np.argsort(-scores, kind="stable")[:5])
        np.testing.assert_allclose([x["relevance_score"] for x in results], np.sort(scores)[::-1][:5], atol=1e-5)
    bad = httpx.post(f"{server}/v1/classify", json={"model": RERANK, "input": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


@pytest.mark.parametrize("option", ["fused", "int8"])
def test_speed_options_are_gated_against_transformers(option, tmp_path):
    """fused holds the fp32 tolerance; int8 its own (0.1 on logits); both prove the truncated pairs too."""
    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from tests.tiny import make_tiny_classifier

    source = make_tiny_classifier(tmp_path / "src", 1)
    entry = export_one(ModelConfig(id="r", source=str(source), task="rerank", optimize=option), tmp_path / "art")
    assert entry.model_file == f"model.{option}.onnx" and entry.precision == ("int8" if option == "int8" else "fp32")
    assert entry.metadata.speed["fusions"]["Attention"] == 2 and entry.parity.details["truncated_rows"] > 0
    assert entry.parity.max_abs_diff <= (1e-4 if option == "fused" else 0.1) and entry.parity.cases == 16


@pytest.mark.parametrize("family", ["distilbert", "electra", "mpnet"])
def test_other_encoder_families_export_as_rerankers(family, tmp_path):
    """Tiny random DistilBERT (no token_type_ids), ELECTRA and MPNet cross-encoders with MiniLM's WordPiece
    tokenizer: exported, gated on pairs (alone, padded, truncated) and served scores equal transformers'."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DistilBertConfig,
        ElectraConfig,
        MPNetConfig,
    )

    from contract.config import ModelConfig
    from export_jobs.job import export_one
    from export_jobs.sources import resolve
    from tests.tiny import MINILM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM).location, model_max_length=128)
    common = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 130, "num_labels": 1}
    config = {"distilbert": DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **common),
              "electra": ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=37, **common),
              "mpnet": MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                   **common)}[family]
    AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    root = tmp_path / "art"
    entry = export_one(ModelConfig(id="r", source=str(tmp_path / "src"), task="rerank"), root)
    manifest.commit(root, entry)
    assert entry.parity.max_abs_diff < 1e-4 and entry.parity.details["truncated_rows"] > 0
    session = ClassifierSession(manifest.load(root)["r"], root)
    docs = ["a short one", "Paris is the capital of France. " * 40]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "src").eval()
    enc = tokenizer(["capital?"] * 2, docs, padding=True, truncation=True, max_length=entry.max_length,
                    return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in entry.metadata.inputs}
    with torch.inference_mode():
        expected = torch.sigmoid(model(**enc).logits[:, 0]).numpy()
    got = sigmoid(session.run(session.preparer.pairs("capital?", docs))[:, 0])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_roberta_cross_encoder_exports_and_serves(tmp_path):
    """RoBERTa's pair template (<s> A </s></s> B </s>), no token_type_ids, and position ids counted from the
    padding id: a tiny byte-level BPE trained here (no hub) under a random RobertaForSequenceClassification."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        RobertaConfig,
        RobertaForSequenceClassification,
        RobertaTokenizerFast,
    )

    from contract.config import ModelConfig
    from export_jobs.classifier_job import DOCUMENTS, QUERIES
    from export_jobs.job import export_one

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(list(QUERIES + DOCUMENTS) * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                     model_max_length=128)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=130, num_labels=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1)).eval()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    root = tmp_path / "art"
    entry = export_one(ModelConfig(id="r", source=str(tmp_path / "src"), task="rerank"), root)
    manifest.commit(root, entry)
    assert entry.family == "roberta" and entry.metadata.inputs == ("input_ids", "attention_mask")
    assert entry.parity.max_abs_diff < 1e-4 and entry.parity.details["truncated_rows"] > 0
    docs = ["ok", "Paris is the capital of France. " * 40, "ONNX Runtime"]
    session = ClassifierSession(manifest.load(root)["r"], root)
    enc = tokenizer(["capital?"] * 3, docs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.sigmoid(model(**enc).logits[:, 0]).numpy()
    np.testing.assert_allclose(sigmoid(session.run(session.preparer.pairs("capital?", docs))[:, 0]), expected,
                               atol=1e-4)
