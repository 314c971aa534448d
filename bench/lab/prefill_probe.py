"""What a prefill costs the first time a shape is seen, by session setting (GPU host).

On an H200 the first prefill_rows call at a new (rows, width) took 74-91 ms and the next ones 4.4-22 ms, so a
continuous batcher that prefills arrivals of varying shapes pays the first-call cost again and again. This
probe times three calls per shape under each setting and, with ORT profiling, names the nodes the first call
spends its time in. `python3 bench/lab/prefill_probe.py [--layers 24]`; JSON to $OUT/prefill_probe.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402  (before onnxruntime: it puts the CUDA libraries where ORT finds them)
import onnxruntime as ort  # noqa: E402

SHAPES = [(1, 8), (8, 8), (31, 8), (1, 128), (31, 128), (16, 40)]


def build(layers: int, tmp: Path) -> Path:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from export_jobs.static_decoder import export_static_decoder

    config = GPTNeoConfig(vocab_size=50257, hidden_size=2048, num_layers=layers, num_heads=16, window_size=256,
                          attention_types=[[["global", "local"], layers // 2]], max_position_embeddings=2048)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).eval()
    model = model.half().cuda() if torch.cuda.is_available() else model  # CPU: only to check this script
    path = tmp / "model.onnx"
    export_static_decoder(model, path, max_length=1024)
    del model
    torch.cuda.empty_cache()
    return path


def probe(path: Path, name: str, options: ort.SessionOptions, cuda_options: dict, warm: tuple | None = None) -> dict:
    from inference.decode_static import StaticDecoderSession

    providers = [("CUDAExecutionProvider", cuda_options)] if torch.cuda.is_available() else []
    session = StaticDecoderSession(path, providers=providers + ["CPUExecutionProvider"],
                                   session_options=options, max_batch=32)
    bucket = session.acquire(32, 256)
    rng = np.random.default_rng(0)
    out = {}
    if warm:  # one prefill of a larger shape first
        start = time.perf_counter()
        session.prefill_rows(bucket, 0, rng.integers(10, 50000, warm).tolist(), 0)
        out[f"warm-up {warm[0]}x{warm[1]}"] = [round((time.perf_counter() - start) * 1000, 2)]
    for rows, width in SHAPES:
        prompts = rng.integers(10, 50000, (rows, width)).tolist()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            session.prefill_rows(bucket, 0, prompts, 0)
            times.append(round((time.perf_counter() - start) * 1000, 2))
        out[f"{rows}x{width}"] = times
    print(f"{name:28s} " + "  ".join(f"{k}: {v}" for k, v in out.items()), flush=True)
    if options.enable_profiling:
        out["profile_top"] = top_nodes(session.session.end_profiling())
    return out


def top_nodes(profile_file: str) -> list:
    """The slowest node executions in the profile (the first call at each shape stands out)."""
    events = json.loads(Path(profile_file).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op = collections.Counter()
    for e in nodes:
        by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    slowest = sorted(nodes, key=lambda e: -e["dur"])[:12]
    runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    print("   model_run us:", runs[:12])
    print("   slowest nodes:", [(e["name"][:60], e["dur"]) for e in slowest])
    print("   us by op:", by_op.most_common(8), flush=True)
    return [{"name": e["name"], "us": e["dur"]} for e in slowest]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--only-default", action="store_true", help="one variant (e.g. under CUDA_LAUNCH_BLOCKING=1)")
    ap.add_argument("--json", default="prefill_probe.json")
    ap.add_argument("--workdir", type=Path, default=None, help="reuses the model exported there by an earlier run")
    args = ap.parse_args()
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="prefill-probe-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "model.onnx" if (tmp / "model.onnx").exists() else build(args.layers, tmp)
    results = {}

    def options(**kw) -> ort.SessionOptions:
        so = ort.SessionOptions()
        for k, v in kw.items():
            setattr(so, k, v)
        return so

    variants = {
        "default": (options(), {}),
        "default, after one 32x256": (options(), {}, (32, 256)),
        "enable_mem_pattern=False": (options(enable_mem_pattern=False), {}),
        "arena kSameAsRequested": (options(), {"arena_extend_strategy": "kSameAsRequested"}),
        "default, profiled": (options(enable_profiling=True, profile_file_prefix=str(tmp / "prof")), {}),
    }
    if args.only_default:
        variants = {"default": variants["default"]}
    for name, (so, cuda_options, *warm) in variants.items():
        try:
            results[name] = probe(path, name, so, cuda_options, *warm)
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, "error", exc, flush=True)
    out = Path(os.environ.get("OUT", ".")) / args.json
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
