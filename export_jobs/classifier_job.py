"""Export one sequence classifier (task rerank: a one-logit cross-encoder; task classify: id2label) and prove it
against transformers on fresh texts and pairs: several lengths, one padded batch, pairs truncated at the limit.

The gate tokenizes with the runtime's own preparer (inference.classifier.PairPreparer over the saved
tokenizer.json) and checks that its ids equal the transformers tokenizer's, so what passed is what serves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.config import ModelConfig, SpeedOption, Task
from inference.classifier import PairPreparer, sigmoid, softmax

from . import validate
from .encoder_sources import load_with_tokenizer
from .sources import ResolvedSource
from .specs import EncoderSpec, UnsupportedModelError, spec_for
from .torch_export import additive_mask, example_inputs, export_module

QUERIES = ("what is onnx runtime?", "Wie spät ist es?", "capital of france")
DOCUMENTS = (
    "ONNX Runtime is a cross-platform inference engine for machine learning models.",
    "Paris is the capital and most populous city of France.",
    "Es ist halb drei. 🚀",
    "ok",
    " ".join(["A long passage that keeps going to push the pair past the model's token limit."] * 40),
)


class Logits(torch.nn.Module):
    """The classifier's logits [batch, num_labels], with the additive mask the ORT optimizer fuses."""

    output_names = ("logits",)

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        mask = additive_mask(named["attention_mask"], self.model.dtype)
        return (self.model(**dict(named, attention_mask=mask)).logits,)


def load_classifier(resolved: ResolvedSource):
    model, tokenizer, _ = load_with_tokenizer(resolved, "AutoModelForSequenceClassification")
    return model, tokenizer


def labels_for(task: Task, config) -> tuple[str, ...]:
    if task is Task.rerank:
        if config.num_labels != 1:
            raise UnsupportedModelError(f"task rerank takes a one-logit model; this one has {config.num_labels} "
                                        "labels (use task: classify)")
        return ("score",)
    if config.num_labels < 2:
        raise UnsupportedModelError("task classify takes a model with two labels or more (id2label); this one "
                                    "has one logit (use task: rerank)")
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def parity_inputs(task: Task) -> list[tuple[str, list]]:
    """(what, inputs): each input alone, then all of them as one padded batch."""
    if task is Task.rerank:
        items = [(q, d) for q in QUERIES for d in DOCUMENTS]
    else:
        items = [*QUERIES, *DOCUMENTS]
    return [(f"input {i}", [item]) for i, item in enumerate(items)] + [("padded batch", items)]


def check_classifier(model, onnx_path: Path, tokenizer, preparer: PairPreparer, spec: EncoderSpec, task: Task,
                     tolerance: float, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                     label: str = "") -> dict[str, Any]:
    """transformers' logits vs ORT's on the runtime's tokenization; raises ParityError past ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=list(providers))
    names = [i.name for i in session.get_inputs()]
    diffs, score_diffs, truncated = [], [], 0
    for what, items in parity_inputs(task):
        texts = [i[0] for i in items] if task is Task.rerank else list(items)
        pairs = [i[1] for i in items] if task is Task.rerank else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=preparer.max_length,
                        return_tensors="np")
        prepared = preparer.prepare(list(items))
        for row, item in enumerate(prepared):  # the runtime tokenizes exactly as transformers does
            length = int(enc["attention_mask"][row].sum())
            if not np.array_equal(item.ids, enc["input_ids"][row, :length]):
                raise validate.ExportError(f"{label}{what}: the runtime's tokenization differs from transformers'")
            truncated += int(length == preparer.max_length)
        feeds = {n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                 for n in spec.inputs}
        with torch.inference_mode():
            expected = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.float().numpy()
        actual = np.asarray(session.run(None, {n: feeds[n] for n in names})[0], np.float32)
        diffs.append(validate.check(f"{label}{what} logits", expected, actual, tolerance))
        norm = (lambda x: sigmoid(x[:, 0])) if task is Task.rerank else softmax
        score_diffs.append(validate.max_abs_diff(f"{label}{what} scores", norm(expected), norm(actual)))
    if not truncated:
        raise validate.ExportError(f"{label}the gate's inputs never reached the token limit")
    return {"max_abs_diff": validate.worst(diffs), "score_max_abs_diff": validate.worst(score_diffs),
            "cases": len(diffs), "truncated": truncated, "providers": session.get_providers()}


def export_classifier(cfg: ModelConfig, resolved: ResolvedSource, staging: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer

    model, tokenizer = load_classifier(resolved)
    spec = spec_for(cfg.task, model.config.model_type)
    assert isinstance(spec, EncoderSpec)
    labels = labels_for(cfg.task, model.config)
    limit = min(x for x in (cfg.max_length, tokenizer.model_max_length,
                            getattr(model.config, "max_position_embeddings", None)) if x)
    module = Logits(model, spec.inputs)
    onnx_path = staging / "model.onnx"
    export_module(module, spec, example_inputs(spec.inputs, model.config.vocab_size), module.output_names,
                  onnx_path, cfg.opset)
    tokenizer.save_pretrained(staging / "tokenizer")
    # the gate always truncates, so that it proves the truncated pairs too; serving may refuse instead
    preparer = PairPreparer(Tokenizer.from_file(str(staging / "tokenizer" / "tokenizer.json")), cfg.id, limit, True)
    tolerance = cfg.tolerance or spec.tolerance
    figures = check_classifier(model, onnx_path, tokenizer, preparer, spec, cfg.task, tolerance)
    model_file, speed = onnx_path.name, None
    if cfg.optimize is not SpeedOption.none:
        model_file, figures, speed = _speed_variant(cfg, model, onnx_path, tokenizer, preparer, spec, tolerance,
                                                    figures)
    return {
        "family": spec.family,
        "model_file": model_file,
        "precision": {SpeedOption.fp16: "fp16", SpeedOption.int8: "int8"}.get(cfg.optimize, "fp32"),
        "max_length": int(limit),
        "parity": {"max_abs_diff": figures["max_abs_diff"], "tolerance": figures.get("tolerance", tolerance),
                   "cases": figures["cases"], "details": {"score_max_abs_diff": figures["score_max_abs_diff"],
                                                          "truncated_rows": figures["truncated"]}},
        "metadata": {
            "kind": "classifier", "speed": speed, "labels": list(labels), "pairs": cfg.task is Task.rerank,
            "truncation": "longest_first" if cfg.truncate else "refuse",
            "inputs": list(spec.inputs), "outputs": list(module.output_names),
            "tokenizer": "tokenizer/tokenizer.json", "pad_token_id": int(tokenizer.pad_token_id or 0),
            "model_type": model.config.model_type,
        },
    }


def _speed_variant(cfg: ModelConfig, model, fp32_path: Path, tokenizer, preparer, spec, tolerance, fp32_figures):
    """The fused / fp16 / int8 file beside the fp32 one, gated on its own against transformers."""
    import onnxruntime as ort

    from . import optimize

    option = cfg.optimize
    fast = fp32_path.with_name(f"model.{option.value}.onnx")
    built = optimize.apply_speed_option(fp32_path, fast, option, model.config, int8_everything=False)
    gate = optimize.GATES[option]
    limit = tolerance if gate.max_abs_diff is None else gate.max_abs_diff
    on_gpu = option is SpeedOption.fp16 and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if on_gpu else ("CPUExecutionProvider",)
    figures = check_classifier(model, fast, tokenizer, preparer, spec, cfg.task, limit, providers,
                               f"{option.value}: ")
    figures["tolerance"] = limit
    speed = {**built, "gate": figures, "fp32_parity": {k: fp32_figures[k] for k in ("max_abs_diff",)}}
    return fast.name, figures, speed
