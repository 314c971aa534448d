"""/v1/embeddings over HTTP on one GPU, end to end (issue 6's served-path target).

For each Serve mode (default; throughput = RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1,
one child process each because the flags are read when Ray starts) and each max_batch_size, it loads the
endpoint at each concurrency with one text per request. The path cost at concurrency 1 is the HTTP p50
minus the p50 of `EncoderSession.run(prepare([text]))` timed in this process on the same device. A '-floor'
mode serves, on the same route, a FastAPI ingress that hands the body to a second deployment that returns its
length: Serve's own cost for a composed route, with no model and none of this project's code.

    python bench/gpu_http.py                       # GPU host: num_gpus 0.5, CUDA EP
    python bench/gpu_http.py --num-gpus 0 --load 1:10 8:40 --batches 1 32   # logic check on CPU
    python bench/gpu_http.py --modes throughput-floor throughput throughput-in-ingress --batches 64 --load 1:1500

Each replica reserves one CPU (REPLICA_CPUS): --embedder-replicas 2 needs 3 CPUs free for Ray, besides HAProxy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_embeddings import MODEL, SENTENCES, SOURCE, THROUGHPUT_ENV, load, load_raw  # noqa: E402
from common import percentile, table, time_ms  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/gpu_http_out"))


REPLICA_CPUS = 1  # serving.num_cpus: the replica's session runs this many threads


def model_config(num_gpus: float, max_batch_size: int = 32, wait_s: float = 0.0, optimize: str = "none",
                 replicas: int = 1):
    from contract.config import ModelConfig

    return ModelConfig(id=MODEL, source=SOURCE, optimize=optimize, serving={
        "num_replicas": replicas, "num_gpus": num_gpus, "num_cpus": REPLICA_CPUS, "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": wait_s,
        "max_ongoing_requests": 512, "max_queued_requests": 4096})


def ensure_artifact(root: str, cfg):
    from contract import manifest
    from export_jobs.job import export_one, is_current

    if not is_current(cfg, root):
        start = time.perf_counter()
        manifest.commit(root, export_one(cfg, root))
        print(f"export: {time.perf_counter() - start:.1f} s", flush=True)
    return manifest.load(root)[MODEL]


def cuda_ep_without_preload(root: str, entry) -> str:
    """Does a bare process (no torch, no preload_dlls) get the CUDA EP? Tells whether runtime.py needs the call."""
    code = ("import onnxruntime as o, sys; s = o.InferenceSession(sys.argv[1], "
            "providers=['CUDAExecutionProvider', 'CPUExecutionProvider']); print(s.get_providers()[0])")
    proc = subprocess.run([sys.executable, "-c", code, str(entry.model_path(root))], capture_output=True, text=True)
    return (proc.stdout.strip().splitlines() or ["?"])[-1] if proc.returncode == 0 else f"error rc={proc.returncode}"


def kernel(root: str, entry, use_gpu: bool) -> dict:
    from inference.encoder import EncoderSession

    session = EncoderSession(entry, root, use_gpu=use_gpu, threads=REPLICA_CPUS)  # as in the replica
    text = SENTENCES[0]
    one = time_ms(lambda: session.run(session.prepare([text])), warmup=30, repeats=300)
    items = session.prepare(SENTENCES[:32])
    b32 = time_ms(lambda: session.run_sorted(items, 64), warmup=10, repeats=100)
    out = {"providers": session.session.get_providers(), "cuda_graphs": session.graphs is not None,
           "one_text_p50_ms": one["p50"], "one_text_min_ms": one["min"],
           "batch32_p50_ms": b32["p50"], **request_path_parts(session, text)}
    del session
    return out


def request_path_parts(session, text: str) -> dict:
    """Two per-request costs of the served path, on this host's CPU: a session run handed to a worker thread
    (as a replica does for a long run) against one run on the event loop (serve_app's quick runs), and one
    384-d response written by json.dumps(tolist()) against orjson (the ingress's VectorsResponse)."""
    import numpy as np
    import orjson

    try:
        import uvloop  # what Ray's replicas run on, when installed

        run = uvloop.run
    except ImportError:
        run = asyncio.run

    items = session.prepare([text])

    async def hop(inline: bool) -> list[float]:
        times = []
        for i in range(330):
            start = time.perf_counter()
            if inline:
                session.run(items)
            else:
                await asyncio.to_thread(session.run, items)
            if i >= 30:
                times.append((time.perf_counter() - start) * 1000)
        return times

    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}]}
    slow = time_ms(lambda: json.dumps({**body, "data": [{**body["data"][0], "embedding": vector.tolist()}]}), warmup=50, repeats=1000)
    fast = time_ms(lambda: orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), warmup=50, repeats=1000)
    return {"run_in_thread_p50_ms": percentile(run(hop(False)), 0.5),
            "run_on_loop_p50_ms": percentile(run(hop(True)), 0.5),
            "json_dumps_us": slow["p50"] * 1000, "orjson_us": fast["p50"] * 1000}


def gpu_apps() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


LOADERS = {"raw": load_raw, "httpx": load}
# process groups by replica name (Front, Echo: the floor app's)
GROUPS = {"ingress": (":Ingress", ":Front"), "embedder": (":embed-", ":Echo"), "haproxy": ("haproxy",)}


def serve_processes(app: str) -> dict[str, list[int]]:
    """PIDs of this app's Ingress and embedder replicas and of HAProxy, from /proc (Linux)."""
    out: dict[str, list[int]] = {name: [] for name in GROUPS}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name, keys in GROUPS.items():
            if any(key in cmd for key in keys) and (name == "haproxy" or f"ServeReplica:{app}:" in cmd):
                out[name].append(int(entry.name))
    return out


def cpu_ticks(pids: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    """User + system CPU ticks of each process so far (/proc/PID/stat fields 14-15), and of the whole host."""
    out: dict[str, dict[int, int]] = {}
    for name, group in pids.items():
        out[name] = {}
        for pid in group:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name][pid] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass  # gone already
    host = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    out["host"] = {0: int(host[0]) + int(host[1]) + int(host[2])}  # user, nice, system
    return out


def cpu_spent(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]) -> dict[str, float]:
    """CPU seconds of each group between two readings. A process that started in between (HAProxy reloads into a
    new one) counts from its start; one that exited in between drops out, never as a negative figure."""
    tick = os.sysconf("SC_CLK_TCK")
    return {name: sum(ticks - before.get(name, {}).get(pid, 0) for pid, ticks in group.items()) / tick
            for name, group in after.items()}


IN_INGRESS = "-in-ingress"
FLOOR = "-floor"


def floor_app(ingress_replicas: int = 1):
    """HTTP -> a FastAPI ingress -> a handle call to a second deployment -> back, doing nothing else."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=512)
    class Echo:
        async def size(self, body: bytes) -> int:
            return len(body)

    @serve.deployment(max_ongoing_requests=512)
    @serve.ingress(api)
    class Front:
        def __init__(self, echo):
            self.echo = echo

        async def embeddings(self, request):
            return {"bytes": await self.echo.size.remote(await request.body())}

        # real objects, not the strings `from __future__ import annotations` leaves, which FastAPI cannot resolve
        # once Ray has shipped this class to the replica
        embeddings.__annotations__ = {"request": Request, "return": dict}
        api.post("/v1/embeddings")(embeddings)

        @api.get("/health")
        async def health(self) -> dict:
            return {"status": "ok"}

    return Front.options(num_replicas=ingress_replicas).bind(Echo.bind())


def _client(url: str, concurrency: int, requests: int, client: str) -> tuple[float, list[float], int]:
    return asyncio.run(LOADERS[client](url, concurrency, requests))


def load_split(pool, url: str, concurrency: int, requests: int, clients: int, client: str) -> tuple[float, list[float], int]:
    """The load in `clients` processes at once, so one Python client does not cap the rate."""
    clients = max(1, min(clients, concurrency))
    start = time.perf_counter()
    futures = [pool.submit(_client, url, concurrency // clients + (i < concurrency % clients),
                           requests // clients + (i < requests % clients), client) for i in range(clients)]
    parts = [f.result() for f in futures]
    return time.perf_counter() - start, [x for p in parts for x in p[1]], sum(p[2] for p in parts)


async def measure(url: str, mode: str, app: str, batch: int, loads: list[tuple[int, int]], pool=None,
                  clients: int = 1, client: str = "raw", batch_stats: bool = True) -> list[dict]:
    """Inside one event loop: throughput mode's handles refuse to work outside a running loop. batch_stats=False
    where there is no one embedder replica to ask for its batch sizes (in the ingress, or several replicas)."""
    from ray import serve

    batch_stats = batch_stats and not mode.endswith(IN_INGRESS)
    handle = serve.get_deployment_handle(f"embed-{MODEL}", app_name=app) if batch_stats else None
    for _ in range(20):  # warm-up (CUDA kernels, connections), until the proxy routes to this app
        if (await load_raw(url, 8, 200))[2] == 0:
            break
        await asyncio.sleep(0.5)
    rows = []
    for conc, requests in loads:
        before = len(await handle.batch_stats.remote()) if handle else 0
        cpu_before, wall_before = cpu_ticks(serve_processes(app)), time.perf_counter()
        if pool is not None and conc > 1 and clients > 1:
            seconds, lat, failures = await asyncio.get_running_loop().run_in_executor(
                None, load_split, pool, url, conc, requests, clients, client)
        else:
            seconds, lat, failures = await LOADERS[client](url, conc, requests)
        pids = serve_processes(app)  # listed again: HAProxy may have reloaded into a new process meanwhile
        spent, wall = cpu_spent(cpu_before, cpu_ticks(pids)), time.perf_counter() - wall_before
        # where the CPU went: ms per request of each group, and how many cores each kept busy
        cpu = {f"cpu_ms_{name}": 1000 * seconds / requests for name, seconds in spent.items()}
        cpu.update({f"cores_{name}": seconds / wall for name, seconds in spent.items()})
        cpu.update({f"n_{name}": len(group) for name, group in pids.items()})
        batches = (await handle.batch_stats.remote())[before:] if handle else []
        health = None
        if conc == 1:  # the same path around an empty route: HAProxy, Serve's replica, FastAPI
            health = percentile((await load_raw(url.replace("/v1/embeddings", "/health"), 1, requests, get=True))[1], 0.5)
        rows.append({"mode": mode, "max_batch_size": batch, "concurrency": conc, "requests": requests,
                     "health_p50_ms": health,
                     "clients": clients if (pool is not None and conc > 1) else 1,
                     "req_s": len(lat) / seconds, "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
                     "max_ms": max(lat), "non_200": failures,
                     "mean_batch": sum(batches) / len(batches) if batches else float("nan"), **cpu})
    return rows


def http_child(args) -> None:
    """One Serve mode: every max_batch_size x concurrency; prints one `ROW {json}` line per measurement."""
    import ray
    from ray import serve

    from contract import manifest
    from contract.config import ProjectConfig
    from serve_app.app import build
    from contract.settings import AppConfig, ServerSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import free_port

    mode = "throughput" if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else "default"
    mode += IN_INGRESS if args.embed_in_ingress else FLOOR if args.floor else ""
    env_vars = {k: v for k, v in os.environ.items() if k == "PYTHONPATH" or k.startswith("ONNX_SERVE_")}
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="serve",
             runtime_env={"env_vars": env_vars} if env_vars else None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"[{mode}] ray+serve up in {time.perf_counter() - start:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    pool = None
    if args.clients > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(abs, range(args.clients)))  # start the client processes before timing
    loop = asyncio.new_event_loop()  # one loop for all: handles stay bound to the loop they first ran in
    for batch in [0] if args.floor else args.batches:  # the floor app has no batching: one pass, batch "0"
        # in the ingress: every ingress replica holds a session, and together they get the GPU share
        gpus = args.num_gpus / (args.ingress_replicas if args.embed_in_ingress else args.embedder_replicas)
        if args.floor:
            app = floor_app(args.ingress_replicas)
        else:
            model = model_config(gpus, batch, args.wait, args.optimize, args.embedder_replicas)
            app = build(AppConfig(project=ProjectConfig(artifacts=args.artifacts, models=(model,)),
                                  server=ServerSettings(ingress_replicas=args.ingress_replicas,
                                                        embed_in_ingress=args.embed_in_ingress)),
                        manifest.load(args.artifacts))
        start = time.perf_counter()
        serve.run(app, name=f"bench{batch}", route_prefix="/")
        print(f"[{mode}] max_batch_size {batch}: app up in {time.perf_counter() - start:.1f} s; "
              f"GPU apps: {gpu_apps()}", flush=True)
        for row in loop.run_until_complete(measure(url, mode, f"bench{batch}", batch, args.load, pool, args.clients,
                                                   args.client,
                                                   batch_stats=args.embedder_replicas == 1 and not args.floor)):
            print("ROW " + json.dumps(row), flush=True)
        serve.delete(f"bench{batch}")
    if pool is not None:
        pool.shutdown()
    serve.shutdown()
    ray.shutdown()


def run_child(args, mode: str) -> list[dict]:
    throughput = mode.startswith("throughput")
    env = dict(os.environ, **(THROUGHPUT_ENV if throughput else {}))
    for key in THROUGHPUT_ENV if not throughput else ():
        env.pop(key, None)
    cmd = [sys.executable, __file__, "--http-only", "--artifacts", args.artifacts, "--num-gpus", str(args.num_gpus),
           *(["--embed-in-ingress"] if mode.endswith(IN_INGRESS) else []),
           *(["--floor"] if mode.endswith(FLOOR) else []),
           "--batches", *map(str, args.batches), "--clients", str(args.clients),
           "--ingress-replicas", str(args.ingress_replicas), "--embedder-replicas", str(args.embedder_replicas),
           "--client", args.client, "--wait", str(args.wait),
           "--optimize", args.optimize,
           "--load", *(f"{c}:{n}" for c, n in args.load)]
    log = OUT / f"child_{mode}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            print(f"[{mode}] child over {args.child_timeout} s: stopping it", flush=True)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lines = log.read_text().splitlines()
    for line in lines:
        if not line.startswith("ROW ") and line.startswith("["):
            print(line, flush=True)
    if proc.returncode:
        print(f"[{mode}] child rc={proc.returncode}; last lines:\n" + "\n".join(lines[-25:]), flush=True)
    return [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]


def cpu_text(row: dict) -> str:
    """'ingress 1.20 (3.1), embedder 0.25 (0.9), haproxy 0.10 (0.4), host 3.0 (11.6)' for one row."""
    return ", ".join(f"{name} {row[f'cpu_ms_{name}']:.2f} ({row[f'cores_{name}']:.1f})"
                     for name in (*GROUPS, "host") if f"cpu_ms_{name}" in row and (name == "host" or row.get(f"n_{name}")))


def pair(text: str) -> tuple[int, int]:
    conc, requests = text.split(":")
    return int(conc), int(requests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts/gpu_http")
    parser.add_argument("--num-gpus", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--load", type=pair, nargs="+", default=[(1, 300), (256, 3000)],
                        help="concurrency:requests pairs")
    parser.add_argument("--modes", nargs="+", default=["default", "throughput"],
                        choices=[m + s for m in ("default", "throughput") for s in ("", IN_INGRESS, FLOOR)],
                        help=f"Serve mode; '{IN_INGRESS}': server.embed_in_ingress (the ingress replicas embed); "
                             f"'{FLOOR}': a composed route that does nothing (Serve's own cost)")
    parser.add_argument("--embed-in-ingress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ingress-replicas", type=int, default=1, help="server.ingress_replicas")
    parser.add_argument("--embedder-replicas", type=int, default=1,
                        help="embedder replicas, sharing --num-gpus between them (one GPU)")
    parser.add_argument("--clients", type=int, default=8,
                        help="client processes sharing the load above concurrency 1 (1: one asyncio client)")
    parser.add_argument("--client", choices=sorted(LOADERS), default="raw",
                        help="load generator: raw asyncio HTTP/1.1 (cheap per request) or httpx")
    parser.add_argument("--wait", type=float, default=0.0, help="serving.batch_wait_timeout_s")
    parser.add_argument("--optimize", default="none", choices=("none", "fp16"),
                        help="the model's speed option; fp16 is fused, so the GPU replica replays CUDA graphs")
    parser.add_argument("--child-timeout", type=int, default=230)
    parser.add_argument("--http-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.artifacts = str(Path(args.artifacts).resolve())
    if args.http_only:
        http_child(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import onnxruntime as ort
    import ray

    use_gpu = args.num_gpus > 0
    entry = ensure_artifact(args.artifacts, model_config(args.num_gpus, optimize=args.optimize))
    result = {"onnxruntime": ort.__version__, "ray": ray.__version__, "python": sys.version.split()[0],
              "gpu": subprocess.run("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i 0",
                                    shell=True, capture_output=True, text=True).stdout.strip() or "none",
              "cpus": os.cpu_count(), "parity_max_abs_diff": entry.parity.max_abs_diff,
              "ingress_replicas": args.ingress_replicas, "embedder_replicas": args.embedder_replicas}
    if use_gpu:
        result["bare_process_provider_without_preload"] = cuda_ep_without_preload(args.artifacts, entry)
    result["kernel"] = kernel(args.artifacts, entry, use_gpu)
    print(json.dumps(result), flush=True)
    rows = []
    for mode in args.modes:
        rows += run_child(args, mode)
        result["rows"] = rows
        (OUT / "gpu_http.json").write_text(json.dumps(result, indent=1))
    model_ms = result["kernel"]["one_text_p50_ms"]
    base = {(r["mode"], r["concurrency"]): r["req_s"] for r in rows if r["max_batch_size"] == 1}
    table_rows = []
    for r in rows:
        speedup = r["req_s"] / base[(r["mode"], r["concurrency"])] if (r["mode"], r["concurrency"]) in base else None
        floor = r["mode"].endswith(FLOOR)  # no model: the whole p50 is the path
        path = f"{r['p50_ms'] - (0 if floor else model_ms):.2f}" if r["concurrency"] == 1 else "-"
        health = f"{r['health_p50_ms']:.2f}" if r.get("health_p50_ms") else "-"
        table_rows.append((r["mode"], r["max_batch_size"], r["concurrency"], r.get("clients", 1), r["requests"], f"{r['req_s']:.0f}",
                           f"{speedup:.1f}x" if speedup else "-", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                           f"{r['max_ms']:.0f}", f"{r['mean_batch']:.1f}", r["non_200"], path, health, cpu_text(r)))
    result["wall_s"] = time.perf_counter() - t0
    (OUT / "gpu_http.json").write_text(json.dumps(result, indent=1))
    k = result["kernel"]
    print(f"\n{MODEL}, {result['gpu']}, onnxruntime {result['onnxruntime']}, ray {result['ray']}; "
          f"{args.ingress_replicas} ingress and {args.embedder_replicas} embedder replicas; "
          f"session providers {k['providers']}, CUDA graphs {k.get('cuda_graphs')}; model alone (prepare+run, 1 text) p50 {k['one_text_p50_ms']:.3f} ms, "
          f"min {k['one_text_min_ms']:.3f} ms; 32 texts {k['batch32_p50_ms']:.3f} ms; one text in a worker thread "
          f"{k['run_in_thread_p50_ms']:.3f} ms, on the loop {k['run_on_loop_p50_ms']:.3f} ms; one 384-d response: "
          f"json.dumps {k['json_dumps_us']:.0f} us, orjson {k['orjson_us']:.0f} us; "
          f"bare process without preload_dlls: {result.get('bare_process_provider_without_preload', '-')}; "
          f"wall {result['wall_s']:.0f} s")
    print(table(table_rows, ("serve mode", "max_batch_size", "conc", "clients", "requests", "req/s", "vs batch 1", "p50 ms",
                             "p99 ms", "max ms", "mean batch", "non-200", "path cost ms (p50 - model)",
                             "GET /health p50 ms", "CPU ms/request (cores busy)")))


if __name__ == "__main__":
    main()
