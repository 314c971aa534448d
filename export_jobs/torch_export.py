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
        out = self.model(**dict(zip(self.input_names, inputs)))
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
        hidden = self.model(**named).last_hidden_state
        mask = named["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = torch.where(mask > 0, hidden, torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return (pooled,)


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
