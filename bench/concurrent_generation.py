"""Concurrent greedy requests on one static-cache graph: each in its own bucket vs continuous batching, with
prompts fed one token per step or prefilled."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from common import table


def concurrent_generation(path: Path, providers: list, vocab: int, users: int, prompt_len: int, new: int,
                          slots: int = 256) -> dict:
    """`users` greedy requests at once on one static graph: each in its own bucket (concurrent generations take
    turns per step) vs continuous batching (inference.continuous: one bucket, one step for all), whose prompts go
    in one token per step (prefill=False) or by prefill; tokens/s over all users and each request's latency, then
    one request alone on each path."""
    from concurrent.futures import ThreadPoolExecutor

    from inference.continuous import ContinuousBatcher
    from inference.sampling import SamplingParams, collect
    from inference.decode_static import StaticDecoderSession, generate_all_static

    params = SamplingParams(max_tokens=new, temperature=0)
    prompts = np.random.default_rng(1).integers(10, vocab, (users, prompt_len)).tolist()
    alone = StaticDecoderSession(path, providers=providers, max_batch=1)  # CUDA graphs where on the CUDA EP
    shared = StaticDecoderSession(path, providers=providers, max_batch=users)
    batchers = {"continuous batching, prompts token by token": ContinuousBatcher(shared, slots=slots, prefill=False),
                "continuous batching + prefill": ContinuousBatcher(shared, slots=slots)}
    runners = {"own bucket per request": lambda p: generate_all_static(alone, [p], params, stop_ids=())[0],
               **{name: (lambda p, b=b: collect(b.generate([p], params, stop_ids=()), 1)[0])
                  for name, b in batchers.items()}}
    out, tokens = {}, {}
    for name, run in runners.items():
        def timed(p, run=run):
            t0 = time.perf_counter()
            result = run(p)
            return time.perf_counter() - t0, result
        batcher = batchers.get(name)
        with ThreadPoolExecutor(users) as pool:
            list(pool.map(timed, prompts))  # warm-up: buckets and their CUDA graphs
            before = _counters(batcher)
            start = time.perf_counter()
            results = list(pool.map(timed, prompts))
            wall = time.perf_counter() - start
            counters = {k: v - before[k] for k, v in _counters(batcher).items()}
        latencies = sorted(r[0] for r in results)
        tokens[name] = [r[1] for r in results]
        one = statistics.median(timed(prompts[0])[0] for _ in range(3))
        out[name] = {"tokens_per_s": users * new / wall, "wall_s": wall, "p50_request_s": latencies[len(latencies) // 2],
                     "max_request_s": latencies[-1], "alone_request_s": one, **counters}
        if batcher is not None:
            out[name]["warmup_s"] = batcher.warmup_seconds
    for batcher in batchers.values():
        batcher.close()
    calls = prefill_call_ms(shared, vocab, prompt_len, slots)
    first = tokens["own bucket per request"]
    same = {name: sum(a == b for a, b in zip(first, got)) for name, got in tokens.items()}
    rows = [(name, f"{v['tokens_per_s']:.0f}", f"{v['p50_request_s'] * 1000:.0f}", f"{v['max_request_s'] * 1000:.0f}",
             f"{v['alone_request_s'] * 1000:.0f}", f"{same[name]}/{users}") for name, v in out.items()]
    print(f"\n  {users} concurrent greedy requests ({prompt_len}-token prompts, {new} new tokens each)")
    print(table(rows, ("path", "tokens/s (all users)", "p50 request ms", "slowest request ms",
                       "one request alone ms", "same tokens as own bucket")), flush=True)
    print("  one prefill_rows call, ms (4 calls each, first to last): " + "; ".join(
        f"{rows} rows {', '.join(f'{t:.1f}' for t in times)}" for rows, times in calls.items()))
    for name, v in out.items():
        if "steps" in v:
            print(f"  {name}: {v['steps']} steps, {v['rows_decoded'] / max(v['steps'], 1):.1f} rows a step, "
                  f"{v['prefills']} prefills taking {v['prefill_s'] * 1000:.1f} ms (the timed round); "
                  f"prefill shapes warmed at start in {v['warmup_s']:.1f} s")
    return {**out, "same_tokens": same, "users": users, "prompt_tokens": prompt_len, "prefill_call_ms": calls}


def _counters(batcher) -> dict:
    """A batcher's running totals (steps, rows decoded, prefills and their time); none for other paths."""
    if batcher is None:
        return {}
    return {"steps": batcher.steps_run, "rows_decoded": batcher.rows_decoded, "prefills": batcher.prefills_run,
            "prefill_s": batcher.prefill_seconds}


def prefill_call_ms(session, vocab: int, prompt_len: int, slots: int) -> dict:
    """Wall ms of prefill_rows over the first `rows` rows of a fresh bucket, 4 calls per row count."""
    bucket = session.acquire(session.max_batch, slots)
    rng = np.random.default_rng(2)
    out = {}
    for rows in sorted({1, min(8, session.max_batch), max(session.max_batch - 1, 1), session.max_batch}):
        prompts = rng.integers(10, vocab, (rows, prompt_len)).tolist()
        times = []
        for _ in range(4):
            start = time.perf_counter()
            session.prefill_rows(bucket, 0, prompts, 0)
            times.append((time.perf_counter() - start) * 1000)
        out[rows] = times
    session.release(bucket)
    return out
