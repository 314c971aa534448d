"""ONNX Runtime session wrappers: prepare (tokenize, check) / run (session) / post-process (pool).

No Ray and no HTTP in here, and never torch or TensorFlow.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from contract.errors import InputTooLong, InvalidRequest
from contract.manifest import ManifestEntry

from .cuda_buckets import BucketedEncoder
from .ort import providers, session_options
from .tokens import check_ids, detokenize, special_ids, where

logger = logging.getLogger("serve_app")


@dataclass(frozen=True)
class Prepared:
    """One text, tokenized and checked: ready to join a batch."""

    ids: np.ndarray
    type_ids: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


def pad_batch(items: list[Prepared], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded int64 [n, longest] input_ids, attention_mask and token_type_ids for prepared items."""
    width = max(item.tokens for item in items)
    ids = np.full((len(items), width), pad_id, np.int64)
    type_ids = np.zeros((len(items), width), np.int64)
    mask = np.zeros((len(items), width), np.int64)
    for row, item in enumerate(items):
        ids[row, : item.tokens], type_ids[row, : item.tokens], mask[row, : item.tokens] = item.ids, item.type_ids, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def load_tokenizer(entry: ManifestEntry, root: str | Path) -> Tokenizer:
    """The artifact's tokenizer, as the export saved it, with padding and truncation off (we check lengths)."""
    tokenizer = Tokenizer.from_file(str(entry.dir_path(root) / entry.metadata.tokenizer))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class TextPreparer:
    """A token-input encoder's tokenizer and token limit, without its session: the ingress tokenizes with it
    so that the model replica, one per GPU, spends its CPU on batches and not on text."""

    def __init__(self, entry: ManifestEntry, root: str | Path, *, truncate: bool = False):
        self.model_id, self.max_length, self.truncate = entry.id, entry.max_length, truncate
        self.tokenizer = load_tokenizer(entry, root)
        self.special = special_ids(self.tokenizer)

    def prepare(self, texts: list[str], limit: int | None = None) -> list[Prepared]:
        """Tokenize; refuse (or truncate, if configured) texts over the model's token limit. ``limit``: truncate
        each text to at most that many tokens instead (a request's ``truncate_prompt_tokens``)."""
        encoded = self.tokenizer.encode_batch(texts)
        return [self._fit(enc.ids, enc.type_ids, where("input", i, len(texts)), limit) for i, enc in enumerate(encoded)]

    def prepare_ids(self, lists: list[list[int]], limit: int | None = None) -> list[Prepared]:
        """The model's own token ids (special tokens included, as /tokenize returns them), checked against the
        vocabulary, then the same length rule as text."""
        for i, ids in enumerate(lists):
            check_ids(ids, self.tokenizer, self.model_id, where("input", i, len(lists)))
        return [self._fit(ids, [0] * len(ids), where("input", i, len(lists)), limit) for i, ids in enumerate(lists)]

    def _fit(self, ids: list[int], type_ids: list[int], at: str, limit: int | None) -> Prepared:
        ids, type_ids = np.asarray(ids, np.int64), np.asarray(type_ids, np.int64)
        if limit is None and self.max_length and len(ids) > self.max_length:
            if not self.truncate:
                raise InputTooLong(f"{at} has {len(ids)} tokens; {self.model_id} accepts at most "
                                   f"{self.max_length}", param=at)
            limit = self.max_length
        if limit is not None and len(ids) > limit:
            if int(ids[-1]) in self.special:  # keep the closing special token ([SEP] / </s>)
                ids = np.append(ids[: limit - 1], ids[-1])
            else:
                ids = ids[:limit]
            type_ids = type_ids[:limit]
        return Prepared(ids, type_ids)

    def tokenize(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """/tokenize: the ids a text embeds with (special tokens included, before any truncation)."""
        if messages is not None:
            raise InvalidRequest(f"{self.model_id} is an embedding model: send prompt, not messages", "messages")
        return list(self.tokenizer.encode(prompt or "").ids)

    def detokenize(self, ids: list[int]) -> str:
        return detokenize(self.tokenizer, ids, self.model_id)


class EncoderSession:
    """A token-input encoder artifact: sentence mode (pooled in the graph) or plain (pooled here)."""

    def __init__(self, entry: ManifestEntry, root: str | Path, *, truncate: bool = False,
                 use_gpu: bool = False, threads: int | None = None, cuda_graphs: bool = True,
                 gemm_auto_tune: bool = True, inline_run_tokens: int = 512):
        """cuda_graphs: on the CUDA EP, run batches in (rows, width) buckets replayed from captured CUDA
        graphs (inference.cuda_buckets), when every node of the graph runs on CUDA (fused exports).
        gemm_auto_tune: see inference.ort.session_options. inline_run_tokens: see BucketedEncoder.quick."""
        meta = entry.metadata
        self.preparer = TextPreparer(entry, root, truncate=truncate)
        self.model_id, self.dim, self.max_length = entry.id, entry.dim, entry.max_length
        self.mode, self.normalize, self.pad_id = meta.mode, meta.normalize, meta.pad_token_id
        eps = providers(use_gpu)
        options = session_options(threads, eps, gemm_auto_tune=gemm_auto_tune, spin=False)
        self.model_file = meta.cpu_file if meta.cpu_file and eps[0] == "CPUExecutionProvider" else entry.model_file
        self.session, self.graphs = self._load(entry.dir_path(root) / self.model_file, options, eps, cuda_graphs)
        logger.info("%s: %s on %s", self.model_id, self.model_file, eps[0])
        if self.graphs is not None:
            self.graphs.inline_tokens = inline_run_tokens
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _load(self, path: Path, options: ort.SessionOptions, eps: list, cuda_graphs: bool):
        if cuda_graphs and eps[0] == "CUDAExecutionProvider":
            try:
                session = ort.InferenceSession(str(path), options, providers=[
                    ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *eps[1:]])
                return session, BucketedEncoder(session, self.dim, cuda_graph=True)
            except Exception as exc:  # noqa: BLE001 - e.g. nodes on the CPU (unfused graphs): no graphs then
                logger.info("%s: no CUDA graphs (%s)", self.model_id, str(exc).splitlines()[0][:200])
        return ort.InferenceSession(str(path), options, providers=eps), None

    def prepare(self, texts: list[str]) -> list[Prepared]:
        return self.preparer.prepare(texts)

    def run(self, items: list[Prepared]) -> np.ndarray:
        """One padded batch through the session; returns float32 (len(items), dim)."""
        feeds = pad_batch(items, self.pad_id)
        mask = feeds["attention_mask"]
        if self.graphs is not None:
            first = self.graphs.run(feeds)
        else:
            first = self.session.run(None, {name: feeds[name] for name in self.input_names})[0]
        if self.mode == "plain":
            first = mean_pool(first, mask)
            if self.normalize:
                first = l2_normalize(first)
        return np.asarray(first, np.float32)

    def quick(self, items: list[Prepared]) -> bool:
        """A run short enough for the event loop (a small captured CUDA graph; see BucketedEncoder.quick)."""
        return self.graphs is not None and self.graphs.quick(len(items), max(item.tokens for item in items))

    def run_sorted(self, items: list[Prepared], max_rows: int) -> np.ndarray:
        """Sort by length and run in chunks of ``max_rows``: less padding, bounded memory."""
        order = sorted(range(len(items)), key=lambda i: items[i].tokens)
        out = np.empty((len(items), self.dim or 0), np.float32)
        for start in range(0, len(order), max_rows):
            chunk = order[start : start + max_rows]
            out[chunk] = self.run([items[i] for i in chunk])
        return out
