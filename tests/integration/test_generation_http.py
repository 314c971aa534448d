"""Completions over HTTP on a tiny real decoder: greedy text equals transformers', streaming equals
non-streaming, chat through the model's template, disconnects and continuous batching. Each bad input's 4xx is
tests/unit/test_routes.py."""
from __future__ import annotations

import json

import httpx
import pytest

from contract import manifest
from contract.config import ModelConfig, ProjectConfig
from contract.settings import AppConfig, ServerSettings
from serve_app.app import build
from tests.tiny import make_tiny_gpt2, metric_sum, scrape_until, settled_value

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL = "tiny-gpt2"
LONG = "tiny-gpt2-long"  # 4096 positions: long enough to disconnect mid-stream
BATCHED = "tiny-gpt2-batched"  # the same weights as MODEL, served with continuous batching
LONG_BATCHED = "tiny-gpt2-long-batched"  # LONG's weights, static graph, continuous batching (1024-token rows)
CHUNKED = "tiny-gpt2-chunked"  # MODEL's weights, continuous batching, a 1 s stream interval: 2 chunks for 20 tokens
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), 128)


@pytest.fixture(scope="module")
def server(serve_url, tiny_lm, tmp_path_factory):
    from ray import serve

    from export_jobs.job import export_one

    root = tmp_path_factory.mktemp("art-gen")
    # the `fused` speed option: served through the static-cache GQA graph (the long model: the dynamic one)
    cfg = ModelConfig(id=MODEL, source=str(tiny_lm[0]), task="generation", optimize="fused",
                      serving={"stream_interval_s": 0})  # a chunk per decode step
    long_dir = make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-long"), 4096)[0]
    long_cfg = ModelConfig(id=LONG, source=str(long_dir), task="generation")
    batched_cfg = ModelConfig(id=BATCHED, source=str(tiny_lm[0]), task="generation", optimize="fused",
                              serving={"continuous_batching": True})
    long_batched_cfg = ModelConfig(id=LONG_BATCHED, source=str(long_dir), task="generation", optimize="fused",
                                   serving={"continuous_batching": True})
    chunked_cfg = ModelConfig(id=CHUNKED, source=str(tiny_lm[0]), task="generation", optimize="fused",
                              serving={"continuous_batching": True, "stream_interval_s": 1})
    models = (cfg, long_cfg, batched_cfg, long_batched_cfg, chunked_cfg)
    for c in models:
        manifest.commit(root, export_one(c, root))
    entry = manifest.load(root)[MODEL]
    static = entry.metadata.static_decoder
    assert static["parity"]["greedy_match_tokens"] > 0 and entry.model_path(root).exists()
    # fused exports only the static-cache graph, which the manifest names and the gate's figures describe
    assert entry.model_file == static["model_file"] == "static/model.onnx"
    assert not (entry.dir_path(root) / "model.onnx").exists() and entry.metadata.kind == "static_decoder"
    assert entry.parity.max_abs_diff == static["parity"]["logits_max_abs_diff"]
    assert manifest.load(root)[LONG].metadata.kind == "decoder"
    app = build(AppConfig(project=ProjectConfig(artifacts=str(root),
                                                models=models),
                          server=ServerSettings(max_tokens_limit=4000)), manifest.load(root))
    serve.run(app, name="gen", route_prefix="/")
    yield serve_url
    serve.delete("gen")


def _transformers_greedy(tiny_lm, prompt: str, n: int) -> str:
    import torch

    _, model, tokenizer = tiny_lm
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_completion_equals_transformers(server, tiny_lm):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    prompt = "The capital of France is"
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert result.choices[0].text == _transformers_greedy(tiny_lm, prompt, 24)
    assert result.usage.completion_tokens == 24 and result.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=7)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


def _stream_events(server, body) -> list[dict]:
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("model", [MODEL, CHUNKED])
def test_stream_interval_groups_tokens_and_usage_counts_them(server, model):
    """With a stream interval the first token goes alone and the rest of the interval's tokens share a chunk (1 s
    here: the rest of the stream); without one, a chunk per token. The text is the non-streamed text either way,
    and stream_options.include_usage adds OpenAI's last chunk with the usage."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    whole = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    events = _stream_events(server, {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == whole["usage"] and last["usage"]["completion_tokens"] == 20
    if model == CHUNKED:
        assert len(chunks) == 2 and chunks[0]["choices"][0]["text"]  # the first token, then the other 19
    else:
        assert len(chunks) > 10  # one per token (a token that ends inside a UTF-8 character waits for the next)
    assert "usage" not in _stream_events(server, body)[-1]  # no usage chunk unless asked for


def test_sse_wire_format_ends_with_done(server):
    events = _stream_events(server, {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert events[0]["object"] == "text_completion"  # and the stream ended in data: [DONE] (checked there)


def test_chat_completion_uses_template_and_streams(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == whole.choices[0].message.content


def test_seeded_sampling_is_reproducible(server):
    body = {"model": MODEL, "prompt": "Numbers:", "max_tokens": 12, "temperature": 1.0, "seed": 3}
    a = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    b = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize("model, counter", [(LONG, "decode_steps"), (LONG_BATCHED, "batched_steps")])
def test_client_disconnect_stops_generation(server, model, counter):
    """A client that goes away mid-stream stops its decoding: its own bucket, or its continuously batched row."""
    import time

    from ray import serve

    handle = serve.get_deployment_handle(f"generate-{model}", app_name="gen")
    before = handle.info.remote().result()[counter]
    body = {"model": model, "prompt": "Tell me everything", "max_tokens": 1000, "temperature": 0.7, "seed": 1,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # the client goes away after a few events
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = handle.info.remote().result()
        if info["active_streams"] == 0 and not info.get("batched_rows"):
            break
        time.sleep(0.2)
    assert info["active_streams"] == 0 and not info.get("batched_rows"), info
    time.sleep(0.2)  # the item in flight when the stream stopped finishes its interval (20 ms), then its steps close
    steps = handle.info.remote().result()[counter] - before
    time.sleep(1.0)
    assert handle.info.remote().result()[counter] - before == steps  # nothing runs on
    assert steps < 900, steps  # stopped well before max_tokens


def test_continuous_batching_serves_concurrent_requests_in_shared_steps(server, tiny_lm):
    """16 concurrent completions on the continuously batched model: each writes transformers' greedy text, and
    the replica ran far fewer decode steps than the requests' prompts + tokens one request at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    handle = serve.get_deployment_handle(f"generate-{BATCHED}", app_name="gen")
    before = handle.info.remote().result()["batched_steps"]
    prompts = [f"Story {i}: once upon a time" for i in range(16)]

    def complete(prompt):
        body = {"model": BATCHED, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(complete, prompts))
    for prompt, result in zip(prompts, results):
        assert result["choices"][0]["text"] == _transformers_greedy(tiny_lm, prompt, 16)
    tokenizer = tiny_lm[2]
    one_at_a_time = sum(len(tokenizer(p).input_ids) + 16 for p in prompts)
    info = handle.info.remote().result()
    assert info["batched_steps"] - before < one_at_a_time / 2, info
    assert info["batched_rows"] == 0 and info["context"] == 128
    assert info["batched_prefills"] >= 1  # at least the first arrival, alone, was prefilled in one call
    assert info["batched_rows_decoded"] >= info["batched_steps"]
    # over the batcher's context: a 400 naming the prompt, before any decoding
    r = httpx.post(f"{server}/v1/completions", json={"model": BATCHED, "prompt": "x", "max_tokens": 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_the_ingress_tokenizes_for_a_generator_and_ids_complete_as_text(server):
    """/tokenize for a Generator deployment runs on the artifact's tokenizer the ingress loaded; its ids, sent as
    the prompt, complete as the text does."""
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0}
    tok = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Once upon a time"}).json()
    text = httpx.post(f"{server}/v1/completions", json={**body, "prompt": "Once upon a time"}, timeout=60).json()
    ids = httpx.post(f"{server}/v1/completions", json={**body, "prompt": tok["tokens"]}, timeout=60).json()
    assert ids["choices"][0]["text"] == text["choices"][0]["text"]
    assert ids["usage"]["prompt_tokens"] == tok["count"] and tok["max_model_len"] == 128
    back = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}
    chat = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["count"] > 1


def test_metrics_time_first_and_output_tokens(server):
    """A streamed completion moves the request counter, and its time to first token and per output token land in
    the generator replica's series, exported through the same node's agent."""
    def counted(text, name="ray_onnx_serve_time_to_first_token_seconds_count"):
        return metric_sum(text, name, model=MODEL)

    def completions(text):
        return metric_sum(text, "ray_onnx_serve_requests_total", model=MODEL, route="/v1/completions", status="200")

    before, timed = settled_value(server, completions), settled_value(server, counted)
    _stream_events(server, {"model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0})
    text = scrape_until(server, lambda text: counted(text) > timed and completions(text) > before)
    assert completions(text) == before + 1 and counted(text) == timed + 1 and "ray_serve_" in text
    assert counted(text, "ray_onnx_serve_time_per_output_token_seconds_count") > 0
    assert metric_sum(text, "ray_onnx_serve_tokens_total", model=MODEL, kind="completion") >= 5
