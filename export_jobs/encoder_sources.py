"""Load a BERT-family encoder with its tokenizer and sentence-transformers settings."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sources import ResolvedSource


@dataclass(frozen=True)
class SentenceSettings:
    pooling: str = "mean"  # mean | cls | max
    normalize: bool = False
    max_seq_length: int | None = None


def local_dir(resolved: ResolvedSource) -> Path:
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved.location))
    return Path(resolved.location)


def sentence_settings(directory: Path) -> SentenceSettings:
    """Read pooling / normalisation / length from a sentence-transformers model directory."""
    modules_file = directory / "modules.json"
    if not modules_file.exists():
        return SentenceSettings()
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            cfg = json.loads((directory / module["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
    max_len = None
    bert_cfg = directory / "sentence_bert_config.json"
    if bert_cfg.exists():
        max_len = json.loads(bert_cfg.read_text()).get("max_seq_length")
    return SentenceSettings(pooling=pooling, normalize=normalize, max_seq_length=max_len)


def load_with_tokenizer(resolved: ResolvedSource, auto_class: str = "AutoModel"):
    """(model in eval mode, fast tokenizer, directory). Eager attention: it exports to fusable graphs."""
    import transformers
    from transformers import AutoTokenizer

    directory = local_dir(resolved)
    model = getattr(transformers, auto_class).from_pretrained(directory, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{directory}: a fast tokenizer (tokenizer.json) is required for serving")
    return model, tokenizer, directory


def load_encoder(resolved: ResolvedSource):
    """Returns (model, tokenizer, settings, directory)."""
    model, tokenizer, directory = load_with_tokenizer(resolved)
    return model, tokenizer, sentence_settings(directory), directory
