"""Encoder runs in fixed (rows, width) buckets with device-resident buffers and, on the CUDA EP, one captured
CUDA graph per bucket.

A small batch through a fused encoder is launch-bound: replayed from a CUDA graph it runs in a fraction of the
time its separate kernel launches take (BENCHMARKS.md, "Lab experiments"). A graph replays fixed shapes only, so each
batch is padded to the smallest bucket that holds it: rows to a power of two, width to the next of WIDTHS.
Padding rows get one real token, so no row attends to nothing. Graphs pin their buffers, so at most
`max_graphs` buckets are captured; a batch beyond that (or wider than the widest bucket) runs uncaptured.
"""
from __future__ import annotations

import bisect
import logging
import threading

import numpy as np
import onnxruntime as ort

logger = logging.getLogger("serve_app")

ROWS = (1, 2, 4, 8, 16, 32, 64)
WIDTHS = (16, 32, 64, 96, 128, 192, 256, 384, 512)
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def bucket_shape(rows: int, width: int) -> tuple[int, int] | None:
    """The smallest (rows, width) bucket that holds a batch, or None if none does."""
    r, w = bisect.bisect_left(ROWS, rows), bisect.bisect_left(WIDTHS, width)
    if r == len(ROWS) or w == len(WIDTHS):
        return None
    return ROWS[r], WIDTHS[w]


class _Bucket:
    def __init__(self, runner: "BucketedEncoder", rows: int, width: int, graph_id: int | None):
        self.rows, self.width = rows, width
        device = runner.device
        self.inputs = {name: ort.OrtValue.ortvalue_from_shape_and_type((rows, width), np.int64, *device)
                       for name in runner.input_names}
        shape = (rows, runner.dim) if runner.pooled else (rows, width, runner.dim)
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(shape, runner.output_dtype, *device)
        self.binding = runner.session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output(runner.output_name, self.output)
        self.options = None
        if graph_id is not None:
            self.options = ort.RunOptions()
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))


class BucketedEncoder:
    """Runs padded [n, width] int64 feeds through `session` in buckets; returns its first output for the n rows.

    `session` must have been created with the CUDA EP option enable_cuda_graph for `cuda_graph=True`.
    """

    def __init__(self, session: ort.InferenceSession, dim: int, cuda_graph: bool, max_graphs: int = 32,
                 inline_tokens: int = 512):
        self.session, self.dim, self.cuda_graph, self.max_graphs = session, dim, cuda_graph, max_graphs
        # a captured bucket of up to this many padded tokens replays in well under a millisecond (MiniLM)
        self.inline_tokens = inline_tokens
        self.input_names = [i.name for i in session.get_inputs()]
        if not set(self.input_names) <= set(NAMES):
            raise ValueError(f"unexpected encoder inputs {self.input_names}")
        output = session.get_outputs()[0]
        self.output_name, self.pooled = output.name, len(output.shape) == 2
        self.output_dtype = np.float16 if output.type == "tensor(float16)" else np.float32
        on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = ("cuda", 0) if on_cuda else ("cpu", 0)
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.uncaptured = None
        if cuda_graph:
            self.uncaptured = ort.RunOptions()
            self.uncaptured.add_run_config_entry("gpu_graph_id", "-1")
        self._lock = threading.Lock()  # ORT captures and replays graphs for one thread at a time

    def _bucket(self, rows: int, width: int) -> _Bucket | None:
        shape = bucket_shape(rows, width)
        if shape is None:
            return None
        bucket = self.buckets.get(shape)
        if bucket is None:
            if len(self.buckets) >= self.max_graphs:
                return None
            graph_id = len(self.buckets) + 1 if self.cuda_graph else None
            bucket = self.buckets[shape] = _Bucket(self, *shape, graph_id)
            if self.cuda_graph:  # ORT runs a few times, then captures; the capturing run computes nothing
                dummy = self._padded({n: np.ones((1, 1), np.int64) for n in self.input_names}, bucket)
                for name, value in dummy.items():
                    bucket.inputs[name].update_inplace(value)
                for _ in range(3):
                    self.session.run_with_iobinding(bucket.binding, bucket.options)
                logger.info("captured a CUDA graph for encoder bucket %s", shape)
        return bucket

    def quick(self, rows: int, width: int) -> bool:
        """Whether this batch replays an already captured graph of at most `inline_tokens` padded tokens: short
        enough to run on the caller's event loop, where a hop to a worker thread would cost more than the run."""
        shape = bucket_shape(rows, width)
        return self.cuda_graph and shape is not None and shape[0] * shape[1] <= self.inline_tokens and shape in self.buckets

    def _padded(self, feeds: dict[str, np.ndarray], bucket: _Bucket) -> dict[str, np.ndarray]:
        rows, width = next(iter(feeds.values())).shape
        out = {}
        for name, value in feeds.items():
            full = np.zeros((bucket.rows, bucket.width), np.int64)
            full[:rows, :width] = value
            out[name] = full
        if "attention_mask" in out:
            out["attention_mask"][rows:, 0] = 1  # padding rows see one token
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: input_ids / attention_mask / token_type_ids [n, width] int64 (right padded)."""
        rows, width = feeds["attention_mask"].shape
        with self._lock:
            bucket = self._bucket(rows, width)
            if bucket is None:  # over the bucket limits: one ordinary run
                binding = self.session.io_binding()
                for name in self.input_names:
                    binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
                binding.bind_output(self.output_name)
                self.session.run_with_iobinding(binding, self.uncaptured)
                return binding.copy_outputs_to_cpu()[0]
            for name, value in self._padded({n: feeds[n] for n in self.input_names}, bucket).items():
                bucket.inputs[name].update_inplace(value)
            self.session.run_with_iobinding(bucket.binding, bucket.options)
            out = bucket.output.numpy()
        return out[:rows] if self.pooled else out[:rows, :width]
