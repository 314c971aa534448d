"""Embeddings on a small CPU host, one run: our served app against Infinity on the same machine, one after the
other, with the same load generator, then the kernel table.

- HTTP: one short text per request at each concurrency (default 1 16 32 64 128); req/s, p50, p99, non-200s, and
  the CPU milliseconds per request that each process group spent (load generator, Serve's proxy or HAProxy, the
  ingress, the embedder, Ray's own processes; Infinity's one process). Ours is started as a user would:
  ``serve run serve_app:graph config=deploy/minilm.yaml`` with the environment ``make serve`` gives it, in Ray
  Serve's throughput mode (what ``make serve`` picks on a host of at most 4 CPUs) and with Serve's own proxy
  (``make serve THROUGHPUT=0``), with what the app builder picks for the host.
- Kernel: all-MiniLM-L6-v2 end to end (tokenize, forward, pool) at batch 1 and 32: sentence-transformers
  (torch), and the ONNX artifact as fp32, fused and int8, 2 threads each, with each variant's gate figures
  (int8's retrieval ranking: export_jobs.ranking).

    python bench/bench_small_host.py --infinity ~/infinity/bin/infinity_emb   # ours (both modes), Infinity, kernels
    python bench/bench_small_host.py --skip-infinity --skip-kernels --modes throughput --concurrency 32 64

Infinity runs from its own virtual environment (it pins numpy < 2 and sentence-transformers < 4):
``python3 -m venv ~/infinity && ~/infinity/bin/pip install "infinity-emb[server,torch]==0.0.78" torch==2.13.0``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_embeddings import MODEL, SENTENCES, SOURCE  # noqa: E402
from common import load_raw, percentile, table, time_ms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUR_PORT, INFINITY_PORT = 8000, 7997


async def load(url: str, model: str, concurrency: int, requests: int) -> tuple[float, list[float], int]:
    bodies = [json.dumps({"model": model, "input": [text]}).encode() for text in SENTENCES]
    return await load_raw(url, bodies, concurrency, requests)


def group_of(proc: psutil.Process) -> str:
    """Which part of the serving path a process is, by its command line (Ray names its workers)."""
    try:
        cmd = " ".join(proc.cmdline())
        title = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for key, group in (("haproxy", "haproxy"), ("ProxyActor", "serve proxy"), ("Ingress", "ingress"),
                       ("embed-", "embedder"), ("ServeController", "ray (controller)"), ("infinity", "infinity"),
                       ("raylet", "ray (raylet, gcs, agents)"), ("gcs_server", "ray (raylet, gcs, agents)"),
                       ("dashboard", "ray (raylet, gcs, agents)"), ("runtime_env", "ray (raylet, gcs, agents)"),
                       ("serve run", "serve run (driver)")):
        if key in cmd or key in title:
            return group
    return "other"


def cpu_by_group() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process on the host, summed per group."""
    totals: dict[str, float] = {}
    for proc in psutil.process_iter():
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        group = "load generator" if proc.pid == os.getpid() else group_of(proc)
        totals[group] = totals.get(group, 0.0) + times.user + times.system
    return totals


def settle(timeout_s: float = 90.0) -> None:
    """Wait until the host is idle (the last server's processes gone), so each server starts on a quiet host."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and psutil.cpu_percent(interval=3) > 10:
        pass


def wait_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def measure(name: str, url: str, model: str, concurrencies: list[int], seconds: float) -> tuple[list, list]:
    asyncio.run(load(url, model, 8, 200))  # warm-up
    rows, cpu_rows = [], []
    for conc in concurrencies:
        rate = max(len(x) / s for s, x, _ in [asyncio.run(load(url, model, conc, 4 * conc))])
        before = cpu_by_group()
        elapsed, lat, failures = asyncio.run(load(url, model, conc, max(200, int(rate * seconds))))
        after = cpu_by_group()
        n = len(lat)
        rows.append((name, conc, f"{n / elapsed:.0f}", f"{percentile(lat, 0.5):.1f}", f"{percentile(lat, 0.99):.1f}",
                     failures, n))
        spent = {g: after[g] - before.get(g, 0.0) for g in after if after[g] - before.get(g, 0.0) > 0.005 * elapsed}
        cpu_rows += [(name, conc, group, f"{1000 * s / n:.2f}", f"{s / elapsed:.2f}")
                     for group, s in sorted(spent.items(), key=lambda kv: -kv[1])]
        print(table(rows[-1:], ("server", "concurrency", "req/s", "p50 ms", "p99 ms", "non-200", "requests")),
              flush=True)
    return rows, cpu_rows


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
LABELS = {"throughput": "onnx-serve, throughput mode", "proxy": "onnx-serve, Serve's proxy"}


def ours(args, mode: str) -> tuple[list, list]:
    """``serve run serve_app:graph config=deploy/minilm.yaml``, as ``make serve CONFIG=deploy/minilm.yaml`` runs
    it: ``mode`` throughput as ``THROUGHPUT=1`` (a small host's default), proxy as ``THROUGHPUT=0``."""
    serve, started = Path(sys.executable).with_name("serve"), time.time()
    cmd = [str(serve), "run", "serve_app:graph", f"config={args.config}"]
    env = dict(os.environ, **(THROUGHPUT_ENV if mode == "throughput" else {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(args.out / f"serve-{mode}.log", "w"))
    try:
        wait_ready(f"http://127.0.0.1:{OUR_PORT}/ready")
        return measure(LABELS[mode], f"http://127.0.0.1:{OUR_PORT}/v1/embeddings", MODEL,
                       args.concurrency, args.seconds)
    finally:
        stop(proc)
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
        for leftover in psutil.process_iter(["cmdline", "create_time"]):  # throughput mode's HAProxy outlives Ray
            cmd = " ".join(leftover.info["cmdline"] or ())
            if "haproxy-serve" in cmd and leftover.info["create_time"] >= started:
                leftover.kill()


def infinity(args) -> tuple[list, list]:
    from export_jobs.sources import resolve

    cmd = [args.infinity, "v2", "--model-id", resolve(SOURCE).location, "--served-model-name", MODEL,
           "--engine", "torch", "--device", "cpu", "--port", str(INFINITY_PORT)]
    env = dict(os.environ, INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(args.out / "infinity.log", "w"))
    try:
        wait_ready(f"http://127.0.0.1:{INFINITY_PORT}/health")
        return measure("infinity", f"http://127.0.0.1:{INFINITY_PORT}/embeddings", MODEL, args.concurrency,
                       args.seconds)
    finally:
        stop(proc)


def kernels(args) -> list[tuple]:
    """sentence-transformers (torch) and the ONNX artifact as fp32, fused and int8 (each exported and gated
    here), at batch 1 and 32, 2 threads each; the last column is what each variant's gate measured."""
    import torch
    from sentence_transformers import SentenceTransformer

    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one, is_current
    from export_jobs.sources import resolve
    from inference.encoder import EncoderSession

    torch.set_num_threads(2)
    st = SentenceTransformer(resolve(SOURCE).location, device="cpu")
    root = args.out / "kernel-artifacts"
    runs, gates = {"torch (sentence-transformers)": lambda texts: st.encode(texts, batch_size=len(texts))}, {}
    for option, name in (("none", "onnx fp32"), ("fused", "onnx fused"), ("int8", "onnx int8 (auto on CPUs)")):
        cfg = ModelConfig(id=f"minilm-{option}", source=SOURCE, optimize=option)
        if not is_current(cfg, root):
            manifest.commit(root, export_one(cfg, root))
        entry = manifest.load(root)[cfg.id]
        session = EncoderSession(entry, str(root), threads=2)
        runs[name] = lambda texts, s=session: s.run(s.prepare(texts))
        ranked = ((entry.metadata.speed or {}).get("gate") or {}).get("ranking")
        gates[name] = f"{entry.parity.max_abs_diff:.1e}" + (
            f"; top 10 overlap {ranked['overlap']:.3f}, top-1 {ranked['top1']:.2f}, nDCG@10 {ranked['ndcg']:.4f}"
            if ranked else "")
    rows = []
    for batch in (1, 32):
        texts, base = SENTENCES[:batch], None
        for name, run in runs.items():
            t = time_ms(lambda: run(texts), repeats=40 if batch == 1 else 12)
            base = base or t["p50"]
            rows.append((name, batch, f"{t['p50']:.2f}", f"{1000 * batch / t['p50']:.0f}",
                         f"{base / t['p50']:.2f}x", gates.get(name, "-")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--seconds", type=float, default=15.0, help="about how long each concurrency runs")
    parser.add_argument("--config", default="deploy/minilm.yaml")
    parser.add_argument("--infinity", default=shutil.which("infinity_emb") or "infinity_emb")
    parser.add_argument("--modes", nargs="+", default=["throughput", "proxy"], choices=list(LABELS))
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_small_host")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"host: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB", flush=True)
    rows, cpu = [], []
    runs = [lambda mode=mode: ours(args, mode) for mode in args.modes] if not args.skip_ours else []
    runs += [] if args.skip_infinity else [lambda: infinity(args)]
    for run in runs:
        settle()
        r, c = run()
        rows, cpu = rows + r, cpu + c
    if rows:
        print("\n" + table(rows, ("server", "concurrency", "req/s", "p50 ms", "p99 ms", "non-200", "requests")))
        print("\n" + table(cpu, ("server", "concurrency", "process group", "CPU ms / request", "cores busy")))
    if not args.skip_kernels:
        print("\n" + table(kernels(args), ("kernel", "batch", "p50 ms", "texts/s", "vs torch",
                                            "gate: max abs diff; retrieval ranking against torch fp32")))
    (args.out / "results.json").write_text(json.dumps({"http": rows, "cpu": cpu}, indent=1))


if __name__ == "__main__":
    main()
