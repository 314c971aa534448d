"""PyTorch encoder -> ONNX, in two modes: plain encoder outputs, or sentence embeddings with the
pooling (and optional L2 normalisation) inside the graph."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .specs import EncoderSpec

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph itself


class PlainEncoder(torch.nn.Module):
    """Encoder outputs as they are: last_hidden_state (+ pooler_output where the model has one)."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model, self.input_names = model, input_names
        self.output_names = ("last_hidden_state", "pooler_output") if _has_pooler(model) else ("last_hidden_state",)

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        out = self.model(**dict(named, attention_mask=additive_mask(named["attention_mask"], self.model.dtype)))
        return tuple(out[name] for name in self.output_names)


class SentenceEncoder(torch.nn.Module):
    """Token ids -> one (batch, dim) embedding: attention-mask-weighted pooling, then optional L2."""

    output_names = ("sentence_embedding",)

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], pooling: str, normalize: bool):
        super().__init__()
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"unsupported pooling {pooling!r}")
        self.model, self.input_names, self.pooling, self.normalize = model, input_names, pooling, normalize

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        hidden = self.model(**dict(named, attention_mask=additive_mask(named["attention_mask"], self.model.dtype)))
        hidden = hidden.last_hidden_state
        mask = named["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = torch.where(mask > 0, hidden, torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:  # F.normalize, spelled without ReduceL2/Expand (which stop ORT's shape inference)
            pooled = pooled / (pooled * pooled).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
        return (pooled,)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[b, s] 0/1 -> [b, 1, s, s] additive mask (0 keep, dtype min drop), built the way transformers 4's
    `_prepare_4d_attention_mask` built it. transformers 5 passes a 4D mask through as is; the ORT
    transformer optimizer recognises this subgraph and fuses Attention, but not transformers 5's own
    vmap-built mask (0 Attention fused, and no SkipLayerNormalization either)."""
    batch, length = mask.shape
    expanded = mask.unsqueeze(1).unsqueeze(2).expand(batch, 1, length, length).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


def _has_pooler(model: torch.nn.Module) -> bool:
    return getattr(model, "pooler", None) is not None


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def example_inputs(input_names: tuple[str, ...], vocab_size: int) -> tuple[torch.Tensor, ...]:
    """A padded batch of two: the mask is not all ones, so no all-ones shortcut is traced."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab_size, 1000), (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(tensors[name] for name in input_names)


def export_module(module: torch.nn.Module, spec: EncoderSpec, args: tuple[torch.Tensor, ...],
                  output_names: tuple[str, ...], path: Path, opset: int) -> ExportedGraph:
    """torch.export-based exporter (dynamo=True). The TorchScript exporter was seen to bake the
    trace's sequence length into BERT's mask path in transformers 5 (max diff 2.0): the gate catches
    that, but dynamo gets it right."""
    module.eval()
    dims = {name: {axis: torch.export.Dim(label, min=1) for axis, label in axes.items()}
            for name, axes in spec.dynamic_shapes().items()}
    # torch.export wants one Dim object per label so axes that must agree are tied together
    shared: dict[str, torch.export.Dim] = {}
    dynamic = {name: {axis: shared.setdefault(dim.__name__, dim) for axis, dim in axes.items()}
               for name, axes in dims.items()}
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, input_names=list(spec.inputs), output_names=list(output_names),
            dynamic_shapes=(tuple(dynamic[name] for name in spec.inputs),), opset_version=opset,
            dynamo=True, optimize=True, verbose=False,
        )
    program.save(str(path), external_data=params > EXTERNAL_DATA_BYTES)
    return ExportedGraph(path, spec.inputs, output_names)
