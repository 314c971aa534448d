"""TensorFlow SavedModel -> ONNX through the tf2onnx CLI and onnxruntime-extensions.

Every TensorFlow or ONNX Runtime step runs in a child process (see
export_jobs._tf_string_worker): TensorFlow loaded before the extensions library
corrupts its string ops, so the two never share a process, and this module imports
neither. The tf2onnx CLI on the SavedModel is used because `from_function` breaks
graphs with lookup tables.

    report = export_savedmodel("use_ml/", "use_ml.onnx")
    validate_string_model("use_ml/", "use_ml.onnx")  # {"max_abs_diff": ..., ...}
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from export_jobs.validate import ExportError, check

CONTRIB_DOMAIN = "ai.onnx.contrib"
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_WORKER = "export_jobs._tf_string_worker"
_TIMEOUT_S = 900

# One mixed batch (languages, punctuation, emoji, an empty and a blank text, words
# outside any small vocabulary); validation adds a single-text and an all-empty batch.
DEFAULT_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund!",
    "我喜欢在周末学习机器学习。",
    "今日は良い天気ですね、散歩に行きましょう。",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Как дела?",
    "Emoji 🚀🔥👍 and ünïcödé — “quotes”, (brackets) & symbols #42 @home...",
    "",
    "   ",
    "zyxwv qwerty asdfgh unseenword",
)

# Strings whose hash buckets TF and the extensions must agree on.
HASH_PROBES: tuple[str, ...] = DEFAULT_TEXTS + (
    "a", "the", "Hund", "мир", "的", "!!!", " ", "x" * 300, "out-of-vocabulary", "ÄÖÜß", "🙂",
)


class ToolError(ExportError):
    """A TensorFlow, tf2onnx or ONNX Runtime child process failed."""

    def __init__(self, what: str, returncode: int, output: str):
        super().__init__(f"{what} exited with {returncode}:\n{output[-4000:]}")
        self.what, self.returncode, self.output = what, returncode, output


class UnsupportedOpsError(ExportError):
    """The converted graph holds ops that ONNX Runtime + extensions cannot run."""

    def __init__(self, ops: Sequence[str], detail: str = ""):
        self.ops = sorted(set(ops))
        super().__init__(f"unsupported ops after conversion: {self.ops}" + (f"\n{detail}" if detail else ""))


class HashMismatchError(ExportError):
    """The installed onnxruntime-extensions hashes strings differently from TensorFlow."""

    def __init__(self, mismatches: Sequence[tuple[str, int, int]]):
        self.mismatches = list(mismatches)
        super().__init__(
            f"StringToHashBucketFast differs from TensorFlow on {len(self.mismatches)} strings "
            f"(onnxruntime-extensions 0.15 switched hash functions; pin 0.14.0): {self.mismatches[:3]}")


@dataclass(frozen=True)
class TfExportReport:
    saved_model_dir: Path
    onnx_path: Path
    opset: int
    tf_ops: tuple[str, ...]
    onnx_ops: tuple[str, ...]  # "domain:op_type", "" domain written as "ai.onnx"
    seconds: float


def _run(args: Sequence[str], what: str, stdout_only: bool = False) -> str:
    """The child's output, stdout then stderr (or stdout alone: TensorFlow 2.21 writes an absl line to stderr
    at import that TF_CPP_MIN_LOG_LEVEL does not silence); raises ToolError, with both, when it fails."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ToolError(what, proc.returncode, output)
    return proc.stdout if stdout_only else output


def _worker(*args: str, stdout_only: bool = False) -> str:
    return _run(["-m", _WORKER, *args], f"{_WORKER} {args[0]}", stdout_only)


def build_saved_model(name: str, out_dir: str | os.PathLike) -> Path:
    """Build one of export_jobs.tf_models (e.g. "use-multilingual") in a child process."""
    _run(["-m", "export_jobs.tf_models", name, str(out_dir)], f"export_jobs.tf_models {name}")
    return Path(out_dir)


def list_tf_ops(saved_model_dir: str | os.PathLike) -> list[str]:
    """Op types of the serving_default signature, nested functions included."""
    output = _worker("tf-ops", str(saved_model_dir), stdout_only=True)
    return json.loads(output.strip().splitlines()[-1])


@functools.lru_cache(maxsize=1)
def check_hash_compatibility(num_buckets: int = 1 << 20) -> int:
    """Raise HashMismatchError unless the extensions hash like TF; returns strings checked."""
    with tempfile.TemporaryDirectory() as tmp:
        strings = Path(tmp, "strings.json")
        strings.write_text(json.dumps(list(HASH_PROBES)), encoding="utf-8")
        for side in ("tf", "ort"):
            _worker(f"{side}-hash", str(strings), str(num_buckets), str(Path(tmp, f"{side}.npy")))
        expected, actual = np.load(Path(tmp, "tf.npy")), np.load(Path(tmp, "ort.npy"))
    mismatches = [(s, int(e), int(a)) for s, e, a in zip(HASH_PROBES, expected, actual) if e != a]
    if mismatches:
        raise HashMismatchError(mismatches)
    return len(HASH_PROBES)


def _unsupported_in_log(log: str) -> list[str]:
    ops = re.findall(r"Tensorflow op \[[^\]]*: (\w+)\] is not supported", log)
    for counter in re.findall(r"Unsupported ops: Counter\((\{.*?\})\)", log):
        ops.extend(ast.literal_eval(counter))
    return ops


def _graph_ops(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    ops = set()
    for node in graph.node:
        ops.add((node.domain, node.op_type))
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                ops |= _graph_ops(sub)
    return ops


def _unknown_ops(ops: set[tuple[str, str]], contrib: bool) -> list[str]:
    unknown = []
    for domain, op_type in ops:
        if domain in _STANDARD_DOMAINS:
            if not onnx.defs.has(op_type, domain):
                unknown.append(f"{domain or 'ai.onnx'}:{op_type}")
        elif not (contrib and domain == CONTRIB_DOMAIN):
            unknown.append(f"{domain}:{op_type}")
    return unknown


def check_onnx_runnable(onnx_path: str | os.PathLike, use_extensions: bool = True) -> tuple[str, ...]:
    """UnsupportedOpsError unless every node is a known op and ORT (+ extensions) loads the graph.

    Returns the graph's ops as "domain:op_type".
    """
    ops = _graph_ops(onnx.load(str(onnx_path), load_external_data=False).graph)
    unknown = _unknown_ops(ops, contrib=use_extensions)
    if unknown:
        raise UnsupportedOpsError(unknown, "left in the ONNX graph")
    _check_loads(Path(onnx_path))
    return tuple(sorted(f"{d or 'ai.onnx'}:{t}" for d, t in ops))


def _check_loads(onnx_path: Path) -> None:
    try:
        _worker("ort-load", str(onnx_path))
    except ToolError as err:
        missing = re.findall(r"Could not find an implementation for (\w+)\(", err.output)
        missing += re.findall(r"(?:[\w.]+:)?(\w+)(?:\(-?\d+\))? is not a registered function/op", err.output)
        if missing:
            raise UnsupportedOpsError(missing, "ONNX Runtime with onnxruntime-extensions refused the graph") from err
        raise


def export_savedmodel(saved_model_dir: str | os.PathLike, out_onnx_path: str | os.PathLike,
                      opset: int = 17, *, use_extensions: bool = True) -> TfExportReport:
    """Convert a SavedModel's serving_default signature; refuse anything ORT can't run.

    use_extensions=False leaves out the contrib opset, so string ops stay raw TF ops
    and the export is refused; it exists to prove that refusal.
    """
    start = time.perf_counter()
    saved_model_dir, out_onnx_path = Path(saved_model_dir), Path(out_onnx_path)
    tf_ops = list_tf_ops(saved_model_dir)
    if use_extensions and "StringToHashBucketFast" in tf_ops:
        check_hash_compatibility()
    out_onnx_path.parent.mkdir(parents=True, exist_ok=True)
    args = ["-m", "tf2onnx.convert", "--saved-model", str(saved_model_dir), "--output", str(out_onnx_path),
            "--tag", "serve", "--signature_def", "serving_default", "--opset", str(opset)]
    if use_extensions:
        args += ["--extra_opset", f"{CONTRIB_DOMAIN}:1"]
    log = _run(args, "tf2onnx.convert")
    unsupported = _unsupported_in_log(log)
    if unsupported:
        raise UnsupportedOpsError(unsupported, "tf2onnx could not convert them")
    onnx_ops = check_onnx_runnable(out_onnx_path, use_extensions)
    return TfExportReport(saved_model_dir=saved_model_dir, onnx_path=out_onnx_path, opset=opset,
                          tf_ops=tuple(tf_ops), onnx_ops=onnx_ops, seconds=time.perf_counter() - start)


def validation_batches(texts: Sequence[str] | None = None) -> list[list[str]]:
    """The given (or default) batch, its first text alone, and a batch of empty texts."""
    texts = list(DEFAULT_TEXTS if texts is None else texts)
    return [texts, texts[:1], ["", "", ""]]


def run_both(saved_model_dir: str | os.PathLike, onnx_path: str | os.PathLike,
             batches: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outputs per batch from TensorFlow and from ONNX Runtime, each in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp, "batches.json")
        batch_file.write_text(json.dumps([list(b) for b in batches], ensure_ascii=False), encoding="utf-8")
        _worker("tf-run", str(saved_model_dir), str(batch_file), str(Path(tmp, "tf.npz")))
        _worker("ort-run", str(onnx_path), str(batch_file), str(Path(tmp, "ort.npz")))
        with np.load(Path(tmp, "tf.npz")) as tf_out, np.load(Path(tmp, "ort.npz")) as ort_out:
            keys = [str(i) for i in range(len(batches))]
            return [tf_out[k] for k in keys], [ort_out[k] for k in keys]


def validate_string_model(saved_model_dir: str | os.PathLike, onnx_path: str | os.PathLike,
                          texts: Sequence[str] | None = None, tolerance: float = 1e-5) -> dict:
    """Compare ONNX Runtime with TensorFlow; ShapeError / ParityError when they disagree."""
    batches = validation_batches(texts)
    expected, actual = run_both(saved_model_dir, onnx_path, batches)
    diffs = [check(f"batch {i} ({len(b)} texts)", e, a, tolerance)
             for i, (b, e, a) in enumerate(zip(batches, expected, actual))]
    return {"max_abs_diff": max(diffs), "tolerance": tolerance, "cases": sum(map(len, batches))}
