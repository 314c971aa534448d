"""A sequence-classifier artifact (task rerank or classify): prepare (tokenize texts or (query, document) pairs)
/ run (logits) / scores (sigmoid or softmax, plain numpy).

Pairs over the token limit are truncated longest_first (the longer side loses a token at a time, as
sentence-transformers' CrossEncoder and transformers' tokenizers do), or refused (truncation: refuse).
No Ray and no HTTP in here, and never torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from contract.errors import InputTooLong
from contract.manifest import ManifestEntry

from .encoder import Prepared, pad_batch
from .ort import providers, session_options


def sigmoid(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class PairPreparer:
    """The artifact's tokenizer and token limit: texts, or pairs as (text, text_pair) with token_type_ids."""

    def __init__(self, tokenizer: Tokenizer, model_id: str, max_length: int | None, truncate: bool):
        self.model_id, self.max_length, self.truncate = model_id, max_length, truncate
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        if truncate and max_length:
            self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        else:
            self.tokenizer.no_truncation()

    @classmethod
    def from_entry(cls, entry: ManifestEntry, root: str | Path, truncate: bool) -> "PairPreparer":
        tokenizer = Tokenizer.from_file(str(entry.dir_path(root) / entry.metadata.tokenizer))
        return cls(tokenizer, entry.id, entry.max_length, truncate)

    def prepare(self, inputs: list, field: str = "input") -> list[Prepared]:
        """``inputs``: texts, or (query, document) tuples; ``field`` names the request field at fault."""
        out = []
        for index, enc in enumerate(self.tokenizer.encode_batch(inputs)):
            ids = np.asarray(enc.ids, np.int64)
            if self.max_length and len(ids) > self.max_length:  # only when truncation is off
                where = f"{field}[{index}]" if len(inputs) > 1 else field
                raise InputTooLong(f"{where} has {len(ids)} tokens; {self.model_id} accepts at most "
                                   f"{self.max_length}", param=where)
            out.append(Prepared(ids, np.asarray(enc.type_ids, np.int64)))
        return out

    def pairs(self, query: str, documents: list[str]) -> list[Prepared]:
        return self.prepare([(query, doc) for doc in documents], "documents")


class ClassifierSession:
    """Runs prepared rows through the ONNX graph: float32 logits [rows, len(labels)]."""

    def __init__(self, entry: ManifestEntry, root: str | Path, *, truncate: bool = True, use_gpu: bool = False,
                 threads: int | None = None, options: ort.SessionOptions | None = None):
        meta = entry.metadata
        self.model_id, self.max_length, self.labels = entry.id, entry.max_length, tuple(meta.labels)
        self.pairs, self.pad_id = meta.pairs, meta.pad_token_id
        self.preparer = PairPreparer.from_entry(entry, root, truncate)
        eps = providers(use_gpu)
        self.session = ort.InferenceSession(str(entry.model_path(root)),
                                            options or session_options(threads, eps, spin=False), providers=eps)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, items: list[Prepared]) -> np.ndarray:
        feeds = pad_batch(items, self.pad_id)
        return np.asarray(self.session.run(None, {n: feeds[n] for n in self.input_names})[0], np.float32)

    def run_sorted(self, items: list[Prepared], max_tokens: int) -> np.ndarray:
        """Sorted by length, in runs of at most ``max_tokens`` padded tokens (the embedder's budget idea)."""
        order = sorted(range(len(items)), key=lambda i: items[i].tokens)
        out = np.empty((len(items), len(self.labels)), np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and items[order[end]].tokens * (end + 1 - start) <= max_tokens:
                end += 1
            chunk = order[start:end]
            out[chunk] = self.run([items[i] for i in chunk])
            start = end
        return out

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """rerank: sigmoid of the one logit, [rows]; classify: softmax probabilities, [rows, labels]."""
        return sigmoid(logits[:, 0]) if self.pairs else softmax(logits)
