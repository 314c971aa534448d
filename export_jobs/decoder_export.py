"""Causal LM -> one ONNX decoder graph with a KV cache (prefill and decode alike).

Inputs:  input_ids [b, s] int64, attention_mask [b, past+s] int64, position_ids [b, s] int64,
         past_key_values.{i}.key / .value [b, kv_heads, past, head_dim]
Outputs: logits [b, s, vocab], present.{i}.key / .value [b, kv_heads, past+s, head_dim]

A prefill is a call with past length 0. The graph is traced through a small wrapper that
rebuilds a transformers `DynamicCache` from the flat past tensors, so the model's own
attention and masking code (sliding windows, GQA, RoPE) is what gets exported. The caller
keeps attention_mask's length equal to past + s (the trace relies on it, as generate() does).

Exporter: TorchScript (torch.onnx.export with dynamo=False). torch.export gives graphs that match
generate() as well, but its fake-tensor tracing of the attention masks is much slower on CPU.
The family's spec (export_jobs.specs) gives the KV cache geometry.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
from pathlib import Path
from typing import ClassVar

import onnx
import torch
from transformers import DynamicCache

from .specs import decoder_spec

TWO_GB = 2**31
INFO_FILE = "decoder_info.json"


class JsonInfo:
    """save/load of a frozen dataclass as `info_file` beside a graph; `tuple_fields` come back as tuples."""

    info_file: ClassVar[str]
    tuple_fields: ClassVar[tuple[str, ...]] = ()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.info_file
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path):
        raw = json.loads((Path(directory) / cls.info_file).read_text())
        for key in cls.tuple_fields:
            raw[key] = tuple(raw[key])
        return cls(**raw)


def save_graph(proto: onnx.ModelProto, out_path: Path, external_data: bool) -> None:
    """Write `proto` to out_path, its weights to one `<name>.data` file beside it when external_data."""
    data_name = out_path.name + ".data"
    for stale in (out_path, out_path.parent / data_name):
        stale.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(out_path))


@dataclasses.dataclass(frozen=True)
class DecoderExportInfo(JsonInfo):
    info_file: ClassVar[str] = INFO_FILE
    tuple_fields: ClassVar[tuple[str, ...]] = ("eos_token_ids", "input_names", "output_names")

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    dtype: str  # numpy name of the KV cache / logits dtype: "float32" or "float16"
    external_data: bool
    exporter: str = "torchscript"  # the only one; kept because manifests record it


def io_names(num_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ("input_ids", "attention_mask", "position_ids", *past), ("logits", *present)


# --- the traced wrapper ------------------------------------------------------------------


def cache_argument(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x; the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


class _FlatCacheDecoder(torch.nn.Module):
    """Flat tensors in, flat tensors out: what an ONNX graph can carry."""

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{cache_argument(self.model): cache},
        )
        present = []
        for i in range(self.num_layers):
            layer = returned_cache(out).layers[i]
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _example_inputs(model, num_layers, kv_heads, head_dim, batch=2, seq=3, past=4):
    # sizes > 1, so that no dynamic axis is traced as a constant 0 or 1
    device, dtype = model.device, model.dtype
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), dtype=torch.int64, device=device)
    mask = torch.ones(batch, past + seq, dtype=torch.int64, device=device)
    pos = torch.arange(past, past + seq, dtype=torch.int64, device=device).expand(batch, seq)
    kv = [
        torch.randn(batch, kv_heads, past, head_dim, dtype=dtype, device=device)
        for _ in range(2 * num_layers)
    ]
    return (ids, mask, pos.contiguous(), *kv)


def _dynamic_axes(input_names, output_names):
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in input_names[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    return axes


def needs_external_data(model) -> bool:
    """Weights over 2 GB (less room for the graph itself) cannot sit inside one protobuf."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > TWO_GB - 256 * 2**20


def check_io(model_proto, input_names, output_names):
    got_in = tuple(i.name for i in model_proto.graph.input)
    got_out = tuple(o.name for o in model_proto.graph.output)
    if got_in != tuple(input_names) or got_out != tuple(output_names):
        raise RuntimeError(f"exported graph io mismatch: inputs {got_in[:4]}..., outputs {got_out[:3]}...")


def eos_ids(model) -> tuple[int, ...]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def export_decoder(
    model,
    out_path: str | Path,
    opset: int = 18,
    external_data: bool | None = None,
) -> DecoderExportInfo:
    """Export `model` (a transformers causal LM in eval mode) to `out_path` (.onnx).

    external_data: None decides by parameter size (> 2 GB uses it); the weights then go to
    one file `<out_path name>.data` beside the graph. Writes decoder_info.json beside it too.
    """
    config = model.config
    spec = decoder_spec(config.model_type)
    num_layers, kv_heads, head_dim = spec.num_layers(config), spec.num_kv_heads(config), spec.head_dim(config)
    input_names, output_names = io_names(num_layers)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = needs_external_data(model)

    wrapper = _FlatCacheDecoder(model, num_layers).eval()
    args = _example_inputs(model, num_layers, kv_heads, head_dim)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(wrapper, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=_dynamic_axes(input_names, output_names), opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw), load_external_data=True)
        check_io(proto, input_names, output_names)
        save_graph(proto, out_path, bool(external_data))
    info = DecoderExportInfo(
        model_type=config.model_type,
        num_layers=num_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        eos_token_ids=eos_ids(model),
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        dtype=str(model.dtype).removeprefix("torch."),
        external_data=bool(external_data),
    )
    info.save(out_path.parent)
    return info
