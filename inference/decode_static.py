"""Decode loop over a static-cache decoder graph (export_jobs/static_decoder.py).

numpy + onnxruntime only. Each generation checks out a bucket: a KV buffer sized to its request
(power-of-two rows and cache slots), bound as both past and present so that GQA writes each step's
keys and values in place, plus two sets of step inputs that the graph fills for the next step (greedy
token, position, length). On the CUDA EP each bucket's two decode graphs are captured once and
replayed (ONNX Runtime's `gpu_graph_id`), which removes the per-kernel launch cost that dominates
small-batch decoding; the prefill (variable length) runs uncaptured. Greedy decoding reads back only
`next_token` (8 bytes a row); sampling reads the last position's logits and writes its token back.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .sampling import Finish, SamplingParams, StepOutput, collect, sample_next

INFO_FILE = "static_decoder.json"  # written by export_jobs.static_decoder


def _step_inputs(batch: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """A decode step's device inputs (shape, dtype); the graph has a next_* output for each."""
    return {"input_ids": ((batch, 1), np.int64), "position_ids": ((batch, 1), np.int64),
            "seqlens_k": ((batch,), np.int32)}


class _Bucket:
    """Buffers for one (batch, cache slots) shape: the KV cache, two sets of step inputs, their bindings.

    A decode step reads one set and writes the next step's inputs (the greedy token, position and
    length + 1, computed in the graph) into the other, so greedy decoding copies nothing to the device
    per step. Two bindings alternate, A -> B then B -> A; under CUDA graphs each is its own graph.
    """

    def __init__(self, session: "StaticDecoderSession", batch: int, slots: int, within: "_Bucket | None" = None):
        """within: use the first `batch` rows of that bucket's KV cache instead of a cache of its own."""
        self.batch, self.slots = batch, slots
        where = session.device
        shape = (batch, session.num_kv_heads, slots, session.head_dim)
        if within is not None and (within.slots != slots or within.batch < batch):
            raise ValueError(f"{batch} x {slots} is not a row prefix of {within.batch} x {within.slots}")
        self.cache = within.cache if within is not None else [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, session.dtype, *where) for _ in session.past_names]
        self.sets = [{name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, *where)
                      for name, (shape, dtype) in _step_inputs(batch).items() if name in session.input_names}
                     for _ in range(2)]
        self.last_index = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), *where)
        self.total = ort.OrtValue.ortvalue_from_shape_and_type((), np.int32, "cpu", 0)  # GQA reads it on the host
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, session.vocab_size), np.float32, *where)
        self.next_token = ort.OrtValue.ortvalue_from_shape_and_type((batch,), np.int64, *where)
        self.current = 0  # the set that holds the next decode step's inputs
        self.bindings, self.run_options = [], []
        for i in range(2):
            binding = session.session.io_binding()
            for name, value in self.sets[i].items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_input("total_sequence_length", self.total)
            binding.bind_ortvalue_input("last_index", self.last_index)
            self._bind_outputs(session, binding, self.sets[1 - i])
            self.bindings.append(binding)
            # None without graphs: onnxruntime's Python wrapper looks up gpu_graph_id in any RunOptions it
            # gets, and a missing key costs a caught exception, ~0.09 ms a step on CPU
            options = None
            if session.cuda_graph:
                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(next(session.graph_ids)))
            self.run_options.append(options)
        if session.cuda_graph:
            self._capture(session)

    def _capture(self, session) -> None:
        """Capture both decode graphs now, on dummy rows, not in the middle of a generation.

        ONNX Runtime captures on a later run than the first, and the capturing run itself executes
        nothing: mid-generation, that step's token and cache slot would be lost. The cache holds junk
        afterwards, which the next prefill overwrites (or, past a row's length, its own next tokens).
        """
        for name, (shape, dtype) in _step_inputs(self.batch).items():
            if name in self.sets[0]:
                self.sets[0][name].update_inplace(np.zeros(shape, dtype))
        for _ in range(6):  # three runs each of A -> B and B -> A
            session.decode(self)

    def _bind_outputs(self, session, binding, next_inputs: dict) -> None:
        session.bind_cache(binding, self, 0, self.batch)
        binding.bind_ortvalue_output("logits", self.logits)
        binding.bind_ortvalue_output("next_token", self.next_token)
        for name, value in next_inputs.items():
            binding.bind_ortvalue_output(f"next_{name}", value)

    def prefill_binding(self, session, feeds: dict[str, np.ndarray]):
        """A binding for a prefill: host inputs; the first decode step's inputs land in set 0."""
        binding = session.feed_binding(feeds)
        self._bind_outputs(session, binding, self.sets[0])
        self.current = 0
        return binding


class StaticDecoderSession:
    """An ORT session over a static-cache decoder graph plus its export info."""

    def __init__(self, onnx_path: str | Path, info: dict | None = None, providers: Sequence | None = None,
                 session_options: ort.SessionOptions | None = None, cuda_graph: bool | None = None,
                 max_batch: int = 32, max_length: int | None = None, min_slots: int = 256,
                 max_buckets: int = 4, shape_buckets: bool | None = None):
        """cuda_graph: None captures decode steps when the session runs on the CUDA EP.

        shape_buckets: pad prefills to power-of-two widths (>= 16) so that few input shapes ever reach ONNX
        Runtime; None: on the CUDA EP, where the first run of each new shape is slow (tens of ms or more).

        max_length: the most cache slots a row may use (at most the exported one). A request gets the
        smallest power-of-two slot count (>= min_slots) that holds its prompt + max_tokens, so memory
        follows what requests ask for. Without CUDA graphs at most max_buckets buckets are kept (least
        recently used go); captured graphs pin their buffers, so with them every bucket stays.
        """
        onnx_path = Path(onnx_path)
        if info is None:
            info = json.loads((onnx_path.parent / INFO_FILE).read_text())
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = int(info["head_dim"])
        self.vocab_size = int(info["vocab_size"])
        self.eos_token_ids = tuple(int(t) for t in info["eos_token_ids"])
        self.dtype = np.dtype(info["dtype"])
        self.max_length = min(int(max_length or info["max_length"]), int(info["max_length"]))
        self.max_batch = max_batch
        self.min_slots = min_slots
        self.max_buckets = max_buckets
        providers = list(providers or ["CPUExecutionProvider"])
        wants_cuda = _provider_name(providers[0]) == "CUDAExecutionProvider"
        self.cuda_graph = wants_cuda if cuda_graph is None else bool(cuda_graph and wants_cuda)
        if self.cuda_graph:
            providers[0] = ("CUDAExecutionProvider", {**_provider_options(providers[0]), "enable_cuda_graph": "1"})
        self.session = ort.InferenceSession(str(onnx_path), sess_options=session_options, providers=providers)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.shape_buckets = self.on_cuda if shape_buckets is None else shape_buckets
        self.cuda_graph = self.cuda_graph and self.on_cuda
        self.device = ("cuda", 0) if self.on_cuda else ("cpu", 0)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.past_names = tuple(n for n in self.input_names if n.startswith("past."))
        self.present_names = tuple(n.replace("past.", "present.", 1) for n in self.past_names)
        self._idle: dict[tuple[int, int], list[_Bucket]] = {}  # buckets not in use, least recently used first
        self._lock = threading.Lock()
        # ORT captures and replays CUDA graphs for one thread at a time: concurrent generations take turns
        # per step (prefill or decode); without graphs ORT runs them concurrently. A capture also fails when
        # another thread copies or allocates device memory meanwhile (cudaErrorStreamCaptureUnsupported, seen
        # with 32 concurrent generations on an H200), so with graphs every device copy and new bucket holds it.
        self._run_lock = threading.RLock() if self.cuda_graph else contextlib.nullcontext()
        self.graph_ids = itertools.count(1)
        self._uncaptured = None
        if self.cuda_graph:
            self._uncaptured = ort.RunOptions()
            self._uncaptured.add_run_config_entry("gpu_graph_id", "-1")

    def acquire(self, batch: int, length: int | None = None) -> _Bucket:
        """A bucket for `batch` rows of up to `length` tokens each (prompt + new), power-of-two sizes, for the
        caller alone until `release`: concurrent generations never share a KV cache."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
        length = self.max_length if length is None else length
        if length > self.max_length:
            raise ValueError(f"{length} tokens do not fit {self.max_length} cache slots")
        rows = min(1 << (batch - 1).bit_length(), self.max_batch)
        slots = min(max(self.min_slots, 1 << (max(length, 1) - 1).bit_length()), self.max_length)
        with self._lock:
            idle = self._idle.get((rows, slots))
            if idle:
                bucket = idle.pop()
                if not idle:
                    del self._idle[(rows, slots)]
                return bucket
        with self._run_lock:  # allocates device buffers and, with CUDA graphs, captures two graphs
            return _Bucket(self, rows, slots)

    def release(self, bucket: _Bucket) -> None:
        key = (bucket.batch, bucket.slots)
        with self._lock:
            idle = self._idle.pop(key, [])
            idle.append(bucket)
            self._idle[key] = idle  # most recently used last
            if not self.cuda_graph:  # captured graphs pin their buffers: then every bucket stays
                while sum(len(v) for v in self._idle.values()) > self.max_buckets:
                    oldest = next(iter(self._idle))
                    self._idle[oldest].pop(0)
                    if not self._idle[oldest]:
                        del self._idle[oldest]

    def bucket(self, batch: int, length: int | None = None) -> _Bucket:
        """acquire + release at once: for single-threaded callers (the export gate, benches, tests)."""
        bucket = self.acquire(batch, length)
        self.release(bucket)
        return bucket

    def prefill_width(self, longest: int, slots: int) -> int:
        """The width a prefill of prompts up to `longest` tokens is padded to (see shape_buckets)."""
        return bucket_width(longest, slots) if self.shape_buckets else longest

    def prefill(self, bucket: _Bucket, prompts: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
        """Right-padded prompts -> the KV cache filled, the first decode step's inputs in place, the last real
        position's logits and greedy token in bucket.logits / bucket.next_token. Returns each row's length."""
        width = self.prefill_width(max(len(p) for p in prompts), bucket.slots)
        feeds, lengths = _prefill_feeds(prompts, bucket.batch, bucket.slots, pad_id, width)
        with self._run_lock:
            binding = bucket.prefill_binding(self, feeds)
            self.session.run_with_iobinding(binding, self._uncaptured)
        return lengths

    def prefill_rows(self, bucket: _Bucket, first_row: int, prompts: Sequence[Sequence[int]],
                     pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Prefill rows first_row .. first_row + len(prompts) - 1 of a bucket in use, leaving its other rows
        and its step inputs untouched. Returns the last real position's logits and greedy token per prompt.
        width: pad the prompts to at least this many positions (fewer distinct shapes; pads are masked).

        The slice is bound by address (bind_cache): GQA writes the prompts' keys and values straight into the
        shared bucket, and the captured decode graphs go on reading the same buffers.
        """
        count = len(prompts)
        if not 0 <= first_row <= bucket.batch - count:
            raise ValueError(f"rows {first_row}..{first_row + count - 1} are outside the bucket's {bucket.batch}")
        feeds, _ = _prefill_feeds(prompts, count, bucket.slots, pad_id, width)
        kind, device_id = self.device
        binding = self.feed_binding(feeds)
        binding.bind_output("logits", kind, device_id)  # ORT allocates these two: outputs 0 and 1
        binding.bind_output("next_token", kind, device_id)
        self.bind_cache(binding, bucket, first_row, count)
        for name in _step_inputs(count):
            if name in self.input_names:
                binding.bind_output(f"next_{name}", kind, device_id)  # the batcher writes its own step inputs
        with self._run_lock:
            self.session.run_with_iobinding(binding, self._uncaptured)
            logits, tokens = binding.get_outputs()[:2]
            return logits.numpy(), tokens.numpy()

    def feed_binding(self, feeds: dict[str, np.ndarray]):
        """A new IO binding with the graph's inputs among `feeds` bound from host memory."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if name in self.input_names:
                binding.bind_cpu_input(name, value)
        return binding

    def bind_cache(self, binding, bucket: _Bucket, first_row: int, rows: int) -> None:
        """Bind rows first_row .. first_row + rows - 1 of a bucket's KV buffers as both past and present (GQA
        writes in place). Rows are contiguous in each buffer ([rows, heads, slots, head_dim]), so a slice is
        bound by address."""
        kind, device_id = self.device
        shape = (rows, self.num_kv_heads, bucket.slots, self.head_dim)
        row_bytes = self.num_kv_heads * bucket.slots * self.head_dim * self.dtype.itemsize
        for past, present, value in zip(self.past_names, self.present_names, bucket.cache):
            address = value.data_ptr() + first_row * row_bytes
            binding.bind_input(past, kind, device_id, self.dtype, shape, address)
            binding.bind_output(present, kind, device_id, self.dtype, shape, address)

    def row_prefix(self, bucket: _Bucket, rows: int) -> _Bucket:
        """A bucket over the first `rows` rows of `bucket`'s KV cache, with its own step inputs and (on CUDA)
        captured graphs: a step over it decodes those rows alone, at the cost of a `rows`-row step. Capturing
        writes junk into slot 0 of those rows, so take prefixes before the rows hold anything."""
        with self._run_lock:
            return _Bucket(self, rows, bucket.slots, within=bucket)

    def decode(self, bucket: _Bucket, tokens: np.ndarray | None = None, total: int | None = None) -> None:
        """One step on the inputs the previous step (or the prefill) left on the device.

        tokens: replace the device's greedy pick (sampling) with these.
        total: the longest row after this step (tokens in the cache), needed without CUDA graphs.
        """
        inputs = bucket.sets[bucket.current]
        with self._run_lock:
            if tokens is not None:
                inputs["input_ids"].update_inplace(np.asarray(tokens, np.int64).reshape(bucket.batch, 1))
            # GQA sizes its flash-decoding splits (and, in flash, which key blocks each split visits) from
            # total_sequence_length on the host; a captured graph keeps the value it was captured with, so
            # with CUDA graphs it is the cache size (keys past each row's length are masked by seqlens_k).
            bucket.total.update_inplace(np.array(bucket.slots if self.cuda_graph or total is None else total,
                                                 np.int32))
            self.session.run_with_iobinding(bucket.bindings[bucket.current], bucket.run_options[bucket.current])
        bucket.current = 1 - bucket.current

    def read(self, value: ort.OrtValue) -> np.ndarray:
        """A device output on the host (with CUDA graphs, never while another thread captures one)."""
        with self._run_lock:
            return value.numpy()

    def write(self, value: ort.OrtValue, array: np.ndarray) -> None:
        """Host data into a device input (with CUDA graphs, never while another thread captures one)."""
        with self._run_lock:
            value.update_inplace(array)


def bucket_width(longest: int, slots: int) -> int:
    """A power of two of at least 16 that holds `longest` prompt tokens, below the cache's slots."""
    return max(longest, min(max(16, 1 << (longest - 1).bit_length()), slots - 1))


def _prefill_feeds(prompts: Sequence[Sequence[int]], rows: int, slots: int, pad_id: int,
                   width: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A prefill's host inputs: prompts right-padded to at least `width` (rows past the prompts get one pad
    token), and each row's length."""
    lengths = np.array([len(p) for p in prompts] + [1] * (rows - len(prompts)), np.int64)
    width = max(int(lengths.max()), width)
    if width >= slots:
        raise ValueError(f"a prompt of {width} tokens leaves no room in {slots} cache slots")
    ids = np.full((rows, width), pad_id, np.int64)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(width), ids.shape).copy(),
             "seqlens_k": (lengths - 1).astype(np.int32), "total_sequence_length": np.array(width, np.int32),
             "last_index": (lengths - 1)[:, None]}
    return feeds, lengths


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _provider_options(provider) -> dict:
    return dict(provider[1]) if isinstance(provider, tuple) else {}


def generate_static(session: StaticDecoderSession, prompts_token_ids: Sequence[Sequence[int]],
                    params: SamplingParams, pad_token_id: int | None = None,
                    stop_ids: Sequence[int] | None = None) -> Iterator[StepOutput]:
    """As inference.decode_dynamic.generate, over a static-cache session (prompts right-padded)."""
    if not prompts_token_ids or any(len(p) == 0 for p in prompts_token_ids):
        raise ValueError("every prompt needs at least one token")
    finish = Finish(session.eos_token_ids, params.max_tokens, pad_token_id, stop_ids)
    batch = len(prompts_token_ids)
    longest = max(len(p) for p in prompts_token_ids)
    bucket = session.acquire(batch, min(longest + params.max_tokens, session.max_length))
    try:
        yield from _decode_loop(session, bucket, prompts_token_ids, params, finish)
    finally:  # also when the caller stops early (a cancelled stream closes this generator)
        session.release(bucket)


def _decode_loop(session, bucket, prompts_token_ids, params, finish: Finish) -> Iterator[StepOutput]:
    batch = len(prompts_token_ids)
    rng = np.random.default_rng(params.seed)
    lengths = session.prefill(bucket, prompts_token_ids, finish.pad)
    reasons: list[str | None] = [None] * batch
    for step in range(params.max_tokens):
        if params.greedy:
            tokens = session.read(bucket.next_token)
        else:
            tokens = sample_next(session.read(bucket.logits), params, rng)
        room = int(lengths.max()) + 1 < bucket.slots  # a slot for the next token
        emitted = finish.update(tokens[:batch], reasons, step + 1, room)
        yield StepOutput(step, emitted, tuple(reasons))
        if all(r is not None for r in reasons):
            return
        # greedy: the device already holds the next inputs (finished rows decode on, unread)
        session.decode(bucket, None if params.greedy else tokens, int(lengths.max()) + 1)
        lengths = lengths + 1


def generate_all_static(session: StaticDecoderSession, prompts_token_ids: Sequence[Sequence[int]],
                        params: SamplingParams, pad_token_id: int | None = None,
                        stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    return collect(generate_static(session, prompts_token_ids, params, pad_token_id, stop_ids),
                   len(prompts_token_ids))
