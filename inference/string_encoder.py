"""ONNX Runtime session for string-input encoders exported from TensorFlow.

The graph takes raw text (a 1-D string tensor) and runs its tokenizer itself
through onnxruntime-extensions' custom ops, so there is no Python tokenization
here. No torch, no TensorFlow (loaded before the extensions library, TF corrupts
its string ops), no Ray, no HTTP.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from contract.errors import InvalidRequest


def extensions_library_path() -> str:
    """Path of the onnxruntime-extensions custom-op library.

    Found on disk rather than through `onnxruntime_extensions.get_library_path()`:
    importing that package imports torch when torch is installed.
    """
    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("inference.string_encoder needs onnxruntime-extensions: "
                          "pip install onnxruntime-extensions==0.14.0 "
                          "(0.15 hashes StringToHashBucketFast differently from TensorFlow)")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder, "_extensions_pydll" + suffix)
            if path.is_file():
                return str(path)
    raise ImportError(f"no _extensions_pydll library in {list(spec.submodule_search_locations)}")


class StringEncoderSession:
    """Embeds a batch of texts with a string-in, float32-[n, dim]-out ONNX graph."""

    def __init__(self, onnx_path: str | os.PathLike, providers: Sequence[str] | None = None,
                 intra_op_threads: int = 0):
        options = ort.SessionOptions()
        options.register_custom_ops_library(extensions_library_path())
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"]))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(string)":
            raise ValueError(f"{onnx_path}: expected one string input, got {[(i.name, i.type) for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.dim = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim]; an empty list gives [0, dim]."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        batch = np.array(texts, dtype=object)
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.ascontiguousarray(out, dtype=np.float32)


class TextItem:
    """One raw text, ready to join a batch (the graph tokenizes it)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    @property
    def tokens(self) -> int:
        """Usage figure only: whitespace words (the graph's own token count is not exposed)."""
        return max(1, len(self.text.split()))


def text_items(texts: Sequence[str]) -> list[TextItem]:
    """The prepare step of a string-input graph: the texts as they are (the graph tokenizes them)."""
    return [TextItem(t) for t in texts]


class TextOnly:
    """The prepare step of a string-input graph (``TextPreparer``'s interface): its tokenizer is inside the
    graph, so token ids, truncation and /tokenize are refused with a 400 that says so."""

    max_length = None

    def __init__(self, model_id: str):
        self.model_id = model_id

    def _refuse(self, what: str, param: str):
        raise InvalidRequest(f"{self.model_id} takes text only: its graph tokenizes the text itself, so {what} "
                             "is not available for it", param)

    def prepare(self, texts: Sequence[str], limit: int | None = None) -> list[TextItem]:
        if limit is not None:
            self._refuse("truncate_prompt_tokens", "truncate_prompt_tokens")
        return text_items(texts)

    def prepare_ids(self, lists, limit: int | None = None):
        self._refuse("token ids as input", "input")

    def tokenize(self, prompt=None, messages=None):
        self._refuse("/tokenize", "model")

    def detokenize(self, ids):
        self._refuse("/detokenize", "model")


class TextInputEncoder:
    """The embedder's interface (prepare / run_sorted) over a string-input graph."""

    def __init__(self, onnx_path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 model_id: str = "this model"):
        self.impl = StringEncoderSession(onnx_path, providers, threads)
        self.dim, self.max_length, self.session = self.impl.dim, None, self.impl.session
        self.preparer = TextOnly(model_id)

    def prepare(self, texts: Sequence[str]) -> list[TextItem]:
        return text_items(texts)

    def run(self, items: Sequence[TextItem]) -> np.ndarray:
        return self.impl.embed([item.text for item in items])

    def quick(self, items: Sequence[TextItem]) -> bool:
        """String graphs run their tokenizer on the CPU: never short enough for the event loop."""
        return False

    def run_sorted(self, items: Sequence[TextItem], max_rows: int) -> np.ndarray:
        chunks = [self.run(items[i:i + max_rows]) for i in range(0, len(items), max_rows)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim or 0), np.float32)
