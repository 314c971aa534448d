"""Export one causal LM with its KV cache and prove it: logits parity and greedy tokens vs transformers."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from contract.config import ModelConfig, SpeedOption

from .sources import ResolvedSource
from .specs import DecoderSpec, decoder_spec
from .validate import ExportError

STATIC_DIR = "static"  # the `fused` speed option's graph (then the only one exported)
WEIGHT_BITS = {SpeedOption.int8: 8, SpeedOption.int4: 4}  # weight-only options over the static graph


def load_decoder(resolved: ResolvedSource):
    """(model, tokenizer) from a hub id, a local directory, or a package's GGUF file."""
    from .decoder_sources import load_pretrained

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    return load_pretrained(resolved.location, **kwargs)


def export_decoder_model(cfg: ModelConfig, resolved: ResolvedSource, staging: Path) -> dict[str, Any]:
    from .decoder_export import eos_ids, export_decoder
    from .decoder_sources import save_tokenizer
    from .decoder_validate import validate_decoder

    model, tokenizer = load_decoder(resolved)
    spec = decoder_spec(model.config.model_type)
    refusal = spec.refusal(cfg.optimize, model.config)
    if refusal:  # before any export work: the family's spec says what this model can be exported as
        raise ExportError(f"{cfg.id}: {refusal}")
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

    if cfg.optimize is not SpeedOption.none:
        # Only the static-cache graph: it is what the server loads, and it passes its own gate.
        static = _static_variant(model, staging, int(context), spec, tolerance, pad)
        figures = static["parity"]
        model_file, metadata = static["model_file"], {"kind": "static_decoder", "static_decoder": static}
        if cfg.optimize in WEIGHT_BITS:  # then its weights quantized, served only past their own gate
            quantized = _weight_only_variant(model, staging, WEIGHT_BITS[cfg.optimize], spec, pad)
            model_file, metadata["weight_only"] = quantized["model_file"], quantized
            del static["model_file"]
        elif cfg.optimize is SpeedOption.fp16:  # then in float16, served only past its own gate
            half = _fp16_variant(model, staging, spec, pad)
            model_file, metadata["fp16"] = half["model_file"], half
            del static["model_file"]
        precision = cfg.optimize.value if cfg.optimize in (*WEIGHT_BITS, SpeedOption.fp16) else "fp32"
        return entry(figures["logits_max_abs_diff"], figures["logits_steps"] + 2,  # + greedy batch 1, padded batch 2
                     figures, metadata, model_file=model_file, precision=precision)
    info = export_decoder(model, staging / "model.onnx", opset=cfg.opset)
    figures = validate_decoder(model, staging / "model.onnx", new_tokens=spec.greedy_tokens,
                               tolerance=tolerance, pad_token_id=pad)
    worst = max(figures["prefill_max_abs_diff"], figures["decode_max_abs_diff"])
    decoder = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(info).items()}
    return entry(worst, 2 + figures["decode_steps"], figures, {"kind": "decoder", "decoder": decoder})


def _static_variant(model, staging: Path, context: int, spec: DecoderSpec, tolerance: float, pad: int) -> dict:
    """The static-cache GQA graph (static/) with its own gate's figures."""
    from .decoder_validate import validate_static_decoder
    from .static_decoder import export_static_decoder

    info = export_static_decoder(model, staging / STATIC_DIR / "model.onnx", max_length=context)
    figures = validate_static_decoder(model, staging / STATIC_DIR / "model.onnx", new_tokens=spec.greedy_tokens,
                                      tolerance=tolerance, pad_token_id=pad)
    return {"model_file": f"{STATIC_DIR}/model.onnx", "max_length": info.max_length,
            "fused_operators": info.fused_operators, "parity": figures}


def _fp16_variant(model, staging: Path, spec: DecoderSpec, pad: int) -> dict:
    """static/model.fp16.onnx: the gated fp32 static graph with weights, compute and KV cache in float16 (half
    the bytes a decode step reads on a GPU; logits stay float32), gated on top-1 agreement with fp32
    (decoder_validate.agreement_gate); raises AgreementError below it. The fp32 graph is then removed."""
    from .decoder_validate import agreement_gate, default_prompts
    from .optimize import file_bytes
    from .static_decoder import save_float16

    name, source = f"{STATIC_DIR}/model.fp16.onnx", staging / STATIC_DIR / "model.onnx"
    save_float16(source, staging / name)  # its static_decoder.json now says float16: the fp32 graph goes below
    gate = agreement_gate(model, staging / name, default_prompts(model), "fp16 static decoder",
                          new_tokens=spec.greedy_tokens, pad_token_id=pad)
    built = {"bytes": file_bytes(staging / name), "source_bytes": file_bytes(source)}
    return {"model_file": name, **built, "gate": gate, "removed": _drop_fp32_static(source)}


def _weight_only_variant(model, staging: Path, bits: int, spec: DecoderSpec, pad: int) -> dict:
    """static/model.int{bits}.onnx beside the gated fp32 static graph (sharing its static_decoder.json),
    with its build and gate figures; raises AgreementError when it agrees too little with fp32."""
    from .decoder_validate import default_prompts
    from .weight_only import check_weight_only, quantize_weight_only

    name, source = f"{STATIC_DIR}/model.int{bits}.onnx", staging / STATIC_DIR / "model.onnx"
    built = quantize_weight_only(source, staging / name, bits)
    gate = check_weight_only(model, staging / name, default_prompts(model), bits, new_tokens=spec.greedy_tokens,
                             pad_token_id=pad)
    return {"model_file": name, **built, "gate": gate, "removed": _drop_fp32_static(source)}


def _drop_fp32_static(source: Path) -> str:
    """Delete the gated fp32 static graph (and its weights file) once its float16 or quantized copy passed its
    own gate: only the served file stays. Returns what the manifest records as removed."""
    for path in (source, source.with_name(source.name + ".data")):
        path.unlink(missing_ok=True)
    return f"{STATIC_DIR}/{source.name} (fp32, gated above)"
