"""Export one encoder model and prove it: torch -> ONNX -> parity against torch on fresh inputs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.config import EncoderMode, ModelConfig, SpeedOption

from . import validate
from .encoder_sources import load_encoder
from .sources import ResolvedSource
from .specs import EncoderSpec, spec_for
from .torch_export import PlainEncoder, SentenceEncoder, example_inputs, export_module

logger = logging.getLogger(__name__)

PARITY_TEXTS = (
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime serves transformer models; Ray Serve scales them across GPUs.",
    "Ünïcödé, émojis 🚀 and numbers 3.14159 all go through the same tokenizer.",
    " ".join(["A long sentence that keeps going to exercise many positions."] * 12),
)


def encode_texts(tokenizer, spec: EncoderSpec, max_length: int, texts) -> dict[str, np.ndarray]:
    """The graph's int64 feeds for ``texts``, padded to the longest."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: enc[name].astype(np.int64) if name in enc else np.zeros_like(enc["input_ids"])
            for name in spec.inputs}


def _parity_batches(tokenizer, spec: EncoderSpec, max_length: int, vocab: int, seed: int):
    """Each text alone, all texts as one padded batch, and random ids up to the length limit."""
    def encode(texts):
        return encode_texts(tokenizer, spec, max_length, texts)

    yield from (("text", encode([t])) for t in PARITY_TEXTS)
    yield "padded batch", encode(PARITY_TEXTS)
    rng = np.random.default_rng(seed)
    lengths = [max_length, 1, max_length // 3]
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(len(lengths), max_length), dtype=np.int64)
    mask = (np.arange(max_length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    rand = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    yield "random ids", {name: rand[name] for name in spec.inputs}


def _reference(module: torch.nn.Module, feeds: dict[str, np.ndarray], names) -> list[np.ndarray]:
    with torch.inference_mode():
        outs = module(*(torch.from_numpy(feeds[n]) for n in names))
    return [o.float().numpy() for o in outs]


def check_encoder(module, onnx_path: Path, tokenizer, spec: EncoderSpec, max_length: int,
                  vocab: int, tolerance: float, seed: int = 1234, *, min_cosine: float | None = None,
                  providers: tuple[str, ...] = ("CPUExecutionProvider",), label: str = "") -> dict[str, Any]:
    """Run ORT and torch on the same fresh inputs; raise ParityError/ShapeError past ``tolerance``
    and CosineError below ``min_cosine`` (speed options are held to a cosine as well)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=list(providers))
    diffs, cosines, cases = [], [], 0
    for what, feeds in _parity_batches(tokenizer, spec, max_length, vocab, seed):
        expected = _reference(module, feeds, spec.inputs)
        actual = session.run(None, feeds)
        for i, (exp, act) in enumerate(zip(expected, actual)):
            act = np.asarray(act, np.float32)
            if i == 0 and exp.ndim == 3:  # hidden states: padded positions are not part of the contract
                keep = feeds["attention_mask"].astype(bool)
                exp, act = exp[keep], act[keep]
            cosine = validate.min_cosine(exp, act)
            if min_cosine is not None and not cosine >= min_cosine:  # also refuses NaN
                raise validate.CosineError(f"{label}{what} output {i}", cosine, min_cosine)
            diffs.append(validate.check(f"{label}{what} output {i}", exp, act, tolerance))
            cosines.append(cosine)
        cases += 1
    return {"max_abs_diff": validate.worst(diffs), "min_cosine": min(cosines), "cases": cases,
            "providers": session.get_providers()}


def check_ranking(module, onnx_path: Path, tokenizer, spec: EncoderSpec, max_length: int,
                  providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """export_jobs.ranking's retrieval check of ``onnx_path`` against the torch ``module`` (first output,
    mean-pooled over the mask where it is per token)."""
    import onnxruntime as ort

    from inference.encoder import mean_pool

    from . import ranking

    session = ort.InferenceSession(str(onnx_path), providers=list(providers))

    def embedder(run):
        def embed(texts: list[str], batch: int) -> np.ndarray:
            out = []
            for start in range(0, len(texts), batch):
                feeds = encode_texts(tokenizer, spec, max_length, texts[start:start + batch])
                vectors = np.asarray(run(feeds), np.float32)
                out.append(mean_pool(vectors, feeds["attention_mask"]) if vectors.ndim == 3 else vectors)
            return np.concatenate(out)
        return embed

    return ranking.check_ranking(embedder(lambda feeds: _reference(module, feeds, spec.inputs)[0]),
                                 embedder(lambda feeds: session.run(None, feeds)[0]))


def export_encoder(cfg: ModelConfig, resolved: ResolvedSource, staging: Path) -> dict[str, Any]:
    model, tokenizer, settings, _ = load_encoder(resolved)
    spec = spec_for(cfg.task, model.config.model_type)
    assert isinstance(spec, EncoderSpec)
    limit = min(x for x in (cfg.max_length, settings.max_seq_length, tokenizer.model_max_length,
                            getattr(model.config, "max_position_embeddings", None)) if x)
    normalize = settings.normalize if cfg.normalize is None else cfg.normalize
    if cfg.mode is EncoderMode.sentence:
        module = SentenceEncoder(model, spec.inputs, settings.pooling, normalize)
    else:
        module = PlainEncoder(model, spec.inputs)
    output_names = module.output_names
    onnx_path = staging / "model.onnx"
    export_module(module, spec, example_inputs(spec.inputs, model.config.vocab_size), output_names,
                  onnx_path, cfg.opset)
    tokenizer.save_pretrained(staging / "tokenizer")
    tolerance = cfg.tolerance or spec.tolerance
    figures = check_encoder(module, onnx_path, tokenizer, spec, limit, model.config.vocab_size, tolerance)
    model_file, speed, cpu_file = onnx_path.name, None, None
    if cfg.optimize is SpeedOption.auto:  # fp32 stays the entry's graph (GPUs); CPUs serve int8 if it passes
        cpu_file, speed = _cpu_variant(module, onnx_path, tokenizer, spec, limit, model.config, tolerance, figures)
    elif cfg.optimize is not SpeedOption.none:  # a faster variant, proven on its own before it is served
        model_file, figures, speed = _speed_variant(cfg.optimize, module, onnx_path, tokenizer, spec, limit,
                                                    model.config, tolerance, figures)
    return {
        "family": spec.family,
        "model_file": model_file,
        "precision": {SpeedOption.fp16: "fp16", SpeedOption.int8: "int8",
                      SpeedOption.auto: "fp32; int8 on CPUs"}.get(cfg.optimize, "fp32"),
        "dim": int(model.config.hidden_size),
        "max_length": int(limit),
        "parity": {"max_abs_diff": figures["max_abs_diff"], "tolerance": figures.get("tolerance", tolerance),
                   "cases": figures["cases"], "details": {"min_cosine": figures["min_cosine"]}},
        "metadata": {
            "kind": "encoder", "speed": speed, "cpu_file": cpu_file,
            "mode": cfg.mode.value, "pooling": settings.pooling, "normalize": normalize,
            "inputs": list(spec.inputs), "outputs": list(output_names),
            "tokenizer": "tokenizer/tokenizer.json", "pad_token_id": int(tokenizer.pad_token_id or 0),
            "model_type": model.config.model_type,
        },
    }


def _variant_path(fp32_path: Path, option: SpeedOption) -> Path:
    return fp32_path.with_name(f"model.{option.value}.onnx")


def _cpu_variant(module, fp32_path: Path, tokenizer, spec: EncoderSpec, limit: int, hf_config,
                 tolerance: float, fp32_figures: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """optimize: auto. The int8 file for CPU replicas, or none (and why, in the figures) where it fails its
    gate: then CPUs serve the fp32 graph, which passed its own."""
    try:
        name, _, speed = _speed_variant(SpeedOption.int8, module, fp32_path, tokenizer, spec, limit, hf_config,
                                        tolerance, fp32_figures)
        return name, speed
    except validate.ExportError as exc:
        _variant_path(fp32_path, SpeedOption.int8).unlink(missing_ok=True)
        logger.warning("int8 failed its gate, CPUs will serve fp32: %s", exc)
        return None, {"option": SpeedOption.int8.value, "refused": str(exc)}


def _speed_variant(option: SpeedOption, module, fp32_path: Path, tokenizer, spec: EncoderSpec, limit: int,
                   hf_config, tolerance: float, fp32_figures: dict[str, Any]):
    """Build the fused / fp16 / int8 file beside the fp32 one and gate it (CUDA for fp16 where there is one)."""
    import onnxruntime as ort

    from . import optimize

    fast = _variant_path(fp32_path, option)
    built = optimize.apply_speed_option(fp32_path, fast, option, hf_config)
    on_gpu = option is SpeedOption.fp16 and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if on_gpu else ("CPUExecutionProvider",)
    gate = optimize.check_speed_option(module, fast, tokenizer, spec, limit, hf_config.vocab_size, option,
                                       tolerance, providers)
    speed = {**built, "gate": gate, "fp32_parity": {k: fp32_figures[k] for k in ("max_abs_diff", "min_cosine")}}
    return fast.name, gate, speed
