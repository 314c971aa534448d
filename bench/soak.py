"""Soak against a running `make serve`: many embedding requests and streamed generations, some cut by the client
mid-stream; each replica's memory before and after, latency per block of requests, streams left open at the end.

    make serve                       # in another terminal (the default models)
    python bench/soak.py             # 100,000 embeddings and 2,000 streams, 10 % of them cut
    python bench/soak.py --embeddings 20000 --generations 400

Embeddings: one short text per request from `--concurrency` clients (bench/common.load_raw), in blocks of
`--block` requests: p50 / p99 per block (drift shows as a trend). Generations run beside them, from the first
block to the last (at least `--generations`): `--streams` concurrent streamed completions of `--max-tokens`
tokens; every tenth is closed by the client after its second chunk. RSS of every Serve replica process
(psutil, by Ray's process title and pid) after a warm-up at the soak's concurrency, after each block and at
the end. At the end, each generator's active streams (its `info()`, through Ray: `RAY_AUTH_MODE=token` when
the cluster uses token authentication).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embeddings import MODEL, SENTENCES  # noqa: E402
from common import load_raw, percentile, table  # noqa: E402

GENERATOR = "SmolLM2-135M-Instruct"


def replica_rss() -> dict[str, float]:
    """MiB of resident memory per Serve replica, by ``<app>:<deployment> pid N``. The process title is
    ray::ServeReplica:<app>:<deployment>, with ``.<method>`` appended while a call runs; the pid tells a
    replica that was replaced (no figure before) from one that grew."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or ())
        if title.startswith("ray::ServeReplica:") and proc.info["memory_info"] is not None:
            name = re.sub(r"\.[a-z_]+$", "", title.split()[0].removeprefix("ray::ServeReplica:"))
            out[f"{name} pid {proc.info['pid']}"] = proc.info["memory_info"].rss / 2**20
    return out


async def streams(url: str, total: int, concurrency: int, max_tokens: int,
                  until: asyncio.Event | None = None) -> dict[str, int]:
    """At least `total` streamed completions, `concurrency` at a time, and more until `until` is set (every block
    of embeddings then runs beside the same generation load); every tenth cut by the client after two chunks."""
    counts = {"completed": 0, "cut": 0, "failed": 0}
    sent = itertools.count()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": GENERATOR, "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
                "temperature": 0.8, "seed": i, "stream": True}
        cut = i % 10 == 9
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                counts["failed"] += 1
                return
            chunks, done = 0, False
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    done = line == "data: [DONE]"
                if cut and chunks >= 2:
                    counts["cut"] += 1
                    return  # leaving the block closes the connection mid-stream
            counts["completed" if done else "failed"] += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while (i := next(sent)) < total or (until is not None and not until.is_set()):
            try:
                await one(client, i)
            except httpx.HTTPError:
                counts["failed"] += 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return counts


BLOCK_COLUMNS = ("requests", "req/s", "p50 ms", "p99 ms", "non-200", "replicas' RSS MiB")


async def embeddings(url: str, total: int, block: int, concurrency: int) -> list[tuple]:
    """Blocks of `block` requests: rate, latency, failures, and each replica's RSS after the block."""
    bodies = [json.dumps({"model": MODEL, "input": text}).encode() for text in SENTENCES]
    rows = []
    for start in range(0, total, block):
        n = min(block, total - start)
        seconds, latencies, failures = await load_raw(f"{url}/v1/embeddings", bodies, concurrency, n)
        rss = " / ".join(f"{v:.0f}" for _, v in sorted(replica_rss().items()))
        rows.append((f"{start + n:,}", f"{n / seconds:.0f}", f"{percentile(latencies, 0.5):.1f}",
                     f"{percentile(latencies, 0.99):.1f}", failures, rss))
        print(table(rows[-1:], BLOCK_COLUMNS), flush=True)
    return rows


def active_streams() -> dict[str, object]:
    """Each generator deployment's ``info()``: active streams (and the continuous batcher's rows)."""
    try:
        import ray
        from ray import serve

        ray.init(address="auto", namespace="serve", log_to_driver=False, logging_level="ERROR")
        out = {}
        for app, status in serve.status().applications.items():
            for name in status.deployments:
                if name.startswith("generate-"):
                    info = serve.get_deployment_handle(name, app).info.remote().result()
                    out[name] = {k: info.get(k) for k in ("active_streams", "batched_rows")}
        return out
    except Exception as exc:  # noqa: BLE001 - reported, the soak's figures stand without it
        return {"error": f"{type(exc).__name__}: {exc}"}


async def main_async(args) -> None:
    url = args.url.rstrip("/")
    # Warm-up at the soak's own concurrency: batches (and ONNX Runtime's arenas) reach their working size here.
    warm = asyncio.create_task(streams(url, 40, args.streams, args.max_tokens))
    await load_raw(f"{url}/v1/embeddings", [json.dumps({"model": MODEL, "input": "warm"}).encode()],
                   args.concurrency, args.warmup)
    await warm
    before = replica_rss()
    print("replicas: " + ", ".join(sorted(before)), flush=True)
    start = time.perf_counter()
    done = asyncio.Event()
    generation = asyncio.create_task(streams(url, args.generations, args.streams, args.max_tokens, until=done))
    rows = await embeddings(url, args.embeddings, args.block, args.concurrency)
    done.set()
    counts = await generation
    elapsed = time.perf_counter() - start
    await asyncio.sleep(5)  # streams the client cut: their replica notices and frees them
    after = replica_rss()
    print(f"\n{args.embeddings:,} embeddings and {sum(counts.values()):,} streams in {elapsed:.0f} s")
    print(table(rows, BLOCK_COLUMNS))
    print(f"\nstreams: {counts}")
    print("\n" + table([(name, f"{before.get(name, 0):.0f}", f"{after[name]:.0f}",
                          f"{100 * (after[name] / before[name] - 1):+.1f} %" if before.get(name) else "-")
                         for name in sorted(after)], ("replica", "RSS MiB after warm-up", "RSS MiB at end", "growth")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--embeddings", type=int, default=100_000)
    parser.add_argument("--generations", type=int, default=2_000)
    parser.add_argument("--block", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1_000)
    asyncio.run(main_async(parser.parse_args()))
    print(f"\ngenerators at the end: {active_streams()}")  # a blocking Ray call: outside the event loop


if __name__ == "__main__":
    main()
