"""TensorFlow vs ONNX Runtime (+ onnxruntime-extensions) latency for the string-op models,
batch 1 and 64, one run. TF and ORT each time in their own child process (TF loaded
before the extensions library corrupts its string ops). Builds and exports the models
under --work unless they are already there.

    python bench/bench_tf.py [--work DIR] [--repeats 50]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import table, time_ms  # noqa: E402

MODELS = ("use-multilingual", "use-large-style")
BATCHES = (1, 64)


def texts(batch: int) -> list[str]:
    from export_jobs.tf_export import DEFAULT_TEXTS

    pool = [t for t in DEFAULT_TEXTS if t.strip()]
    return [pool[i % len(pool)] for i in range(batch)]


def worker(framework: str, path: str, repeats: int) -> dict:
    """Runs in a child process: median ms per batch size for one framework."""
    import numpy as np

    if framework == "tf":
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  registers the SentencePiece ops

        serve = tf.saved_model.load(path).signatures["serving_default"]
        make = lambda b: (lambda x=tf.constant(texts(b)): serve(inputs=x)["outputs"].numpy())  # noqa: E731
    else:
        from inference.string_encoder import StringEncoderSession

        session = StringEncoderSession(path)
        make = lambda b: (lambda x=texts(b): session.embed(x))  # noqa: E731
    out = {}
    for batch in BATCHES:
        fn = make(batch)
        np.asarray(fn())
        out[str(batch)] = time_ms(fn, warmup=5, repeats=repeats if batch == 1 else max(10, repeats // 3))
    return out


def ensure(work: Path, name: str) -> tuple[Path, Path]:
    from export_jobs.tf_export import build_saved_model, export_savedmodel

    saved_model, onnx_path = work / name / "saved_model", work / name / f"{name}.onnx"
    if not (saved_model / "saved_model.pb").exists():
        build_saved_model(name, saved_model)
    if not onnx_path.exists():
        export_savedmodel(saved_model, onnx_path)
    return saved_model, onnx_path


def run_child(framework: str, path: Path, repeats: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--worker", framework, str(path), "--repeats", str(repeats)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "artifacts" / "tf_bench"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.repeats)))
        return
    rows = []
    for name in MODELS:
        saved_model, onnx_path = ensure(Path(args.work), name)
        tf_ms, ort_ms = run_child("tf", saved_model, args.repeats), run_child("ort", onnx_path, args.repeats)
        for batch in BATCHES:
            t, o = tf_ms[str(batch)]["p50"], ort_ms[str(batch)]["p50"]
            rows.append((name, batch, f"{t:.3f}", f"{o:.3f}", f"{t / o:.1f}x"))
            print(f"{name} batch {batch}: TF p50 {t:.3f} ms, ORT p50 {o:.3f} ms", flush=True)
    print()
    print(table(rows, ("model", "batch", "TF p50 ms", "ORT p50 ms", "TF/ORT")))


if __name__ == "__main__":
    main()
