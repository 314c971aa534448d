"""Export one causal LM with its KV cache and prove it: logits parity and greedy tokens vs transformers."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import ModelConfig, Precision, SpeedOption
from .sources import ResolvedSource
from .specs import DecoderSpec, spec_for
from .validate import ExportError

STATIC_DIR = "static"  # the `fused` speed option's graph (then the only one exported)


def load_decoder(resolved: ResolvedSource):
    """(model, tokenizer) from a hub id, a local directory, or a package's GGUF file."""
    from .decoder_sources import load_pretrained

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    return load_pretrained(resolved.location, **kwargs)


def export_decoder_model(cfg: ModelConfig, resolved: ResolvedSource, staging: Path) -> dict[str, Any]:
    from .decoder_export import eos_ids, export_decoder
    from .decoder_sources import save_tokenizer
    from .decoder_validate import validate_decoder

    if cfg.precision is not Precision.fp32:
        raise ExportError(f"{cfg.id}: the CPU gate checks fp32 decoders; fp16 is a GPU bench option for now")
    if cfg.optimize not in (SpeedOption.none, SpeedOption.fused):
        raise ExportError(f"{cfg.id}: decoders take optimize: none or fused (the static-cache GQA graph), "
                          f"not {cfg.optimize.value}")
    model, tokenizer = load_decoder(resolved)
    spec = spec_for(cfg.task, model.config.model_type)
    assert isinstance(spec, DecoderSpec)
    save_tokenizer(tokenizer, staging / "tokenizer")
    eos = eos_ids(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or (0,))[0]
    tolerance = cfg.tolerance or spec.tolerance
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    if cfg.max_length:
        context = min(context, cfg.max_length)
    common = {"tokenizer": "tokenizer/tokenizer.json", "pad_token_id": int(pad), "add_special_tokens": True,
              "model_type": model.config.model_type}

    def entry(worst: float, cases: int, figures: dict, metadata: dict, **fields) -> dict[str, Any]:
        return {"family": spec.family, "max_length": int(context), **fields,
                "parity": {"max_abs_diff": worst, "tolerance": tolerance, "cases": cases,
                           "details": {k: v for k, v in figures.items() if isinstance(v, (int, float, str))}},
                "metadata": {**metadata, **common}}

    if cfg.optimize is SpeedOption.fused:
        # Only the static-cache graph: it is what the server loads, and it passes its own gate.
        static = _static_variant(model, staging, int(context), spec, tolerance, pad)
        figures = static["parity"]
        return entry(figures["logits_max_abs_diff"], figures["logits_steps"] + 2,  # + greedy batch 1, padded batch 2
                     figures, {"static_decoder": static}, model_file=static["model_file"])
    info = export_decoder(model, staging / "model.onnx", opset=cfg.opset)
    figures = validate_decoder(model, staging / "model.onnx", new_tokens=spec.greedy_tokens,
                               tolerance=tolerance, pad_token_id=pad)
    worst = max(figures["prefill_max_abs_diff"], figures["decode_max_abs_diff"])
    decoder = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(info).items()}
    return entry(worst, 2 + figures["decode_steps"], figures, {"decoder": decoder})


def _static_variant(model, staging: Path, context: int, spec: DecoderSpec, tolerance: float, pad: int) -> dict:
    """The static-cache GQA graph (static/) with its own gate's figures."""
    from .decoder_validate import validate_static_decoder
    from .static_decoder import export_static_decoder

    info = export_static_decoder(model, staging / STATIC_DIR / "model.onnx", max_length=context)
    figures = validate_static_decoder(model, staging / STATIC_DIR / "model.onnx", new_tokens=spec.greedy_tokens,
                                      tolerance=tolerance, pad_token_id=pad)
    return {"model_file": f"{STATIC_DIR}/model.onnx", "max_length": info.max_length,
            "fused_operators": info.fused_operators, "parity": figures}
