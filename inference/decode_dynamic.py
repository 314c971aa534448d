"""Decode loop over an exported ONNX decoder (see export_jobs/decoder_export.py).

numpy + onnxruntime only: no torch, no Ray, no HTTP. `generate` is a generator that yields one
`StepOutput` per decode step so that a server can stream tokens as they come.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .sampling import Finish, SamplingParams, StepOutput, collect, sample_next

INFO_FILE = "decoder_info.json"  # written by export_jobs.decoder_export


class DecoderSession:
    """An ORT session over one decoder graph plus its export info (a dict or the info file)."""

    def __init__(self, onnx_path: str | Path, info: dict | None = None, providers: Sequence | None = None,
                 session_options: ort.SessionOptions | None = None, io_binding: bool | None = None):
        """io_binding: None uses it on the CUDA EP only (True also works on CPU, for tests)."""
        onnx_path = Path(onnx_path)
        if info is None:
            info = json.loads((onnx_path.parent / INFO_FILE).read_text())
        elif dataclasses.is_dataclass(info):
            info = dataclasses.asdict(info)
        self.num_layers = int(info["num_layers"])
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = int(info["head_dim"])
        self.vocab_size = int(info["vocab_size"])
        self.eos_token_ids = tuple(int(t) for t in info["eos_token_ids"])
        self.input_names = tuple(info["input_names"])
        self.output_names = tuple(info["output_names"])
        self.dtype = np.dtype(info.get("dtype", "float32"))
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=session_options,
            providers=list(providers or ["CPUExecutionProvider"]),
        )
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if io_binding is None else io_binding
        self._device = ("cuda", 0) if self.on_cuda else ("cpu", 0)
        self._past_names = self.input_names[3:]
        self._present_names = self.output_names[1:]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past of length 0, [b, kv_heads, 0, head_dim], as host arrays (nothing to keep on a device)."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.dtype) for _ in self._past_names]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list) -> tuple[np.ndarray, list]:
        """One forward. Returns (logits [b, s, vocab] as numpy on the host, present KV).

        On CUDA the KV cache stays on the device: the returned present values are OrtValues
        there, and are bound as the next step's past without a copy.
        """
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if not self.io_binding:
            feeds.update(zip(self._past_names, past))
            logits, *present = self.session.run(None, feeds)
            return logits, present
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        for name, value in zip(self._past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, *self._device)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present


# --- prompts, positions, sampling: plain functions --------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask), both int64 [b, longest]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """cumsum(mask) - 1, clipped at 0: what transformers' generate() feeds with left padding."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def generate(session: DecoderSession, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
             pad_token_id: int | None = None, stop_ids: Sequence[int] | None = None) -> Iterator[StepOutput]:
    """Decode a batch of prompts together (left padded); yield the new token of every row per step.
    stop_ids: what ends a row (None: the model's EOS; see sampling.Finish)."""
    finish = Finish(session.eos_token_ids, params.max_tokens, pad_token_id, stop_ids)
    rng = np.random.default_rng(params.seed)
    input_ids, mask = left_pad(prompts_token_ids, finish.pad)
    positions = positions_from_mask(mask)
    batch = input_ids.shape[0]
    past = session.empty_past(batch)
    reasons: list[str | None] = [None] * batch
    for step in range(params.max_tokens):
        logits, past = session.step(input_ids, mask, positions, past)
        tokens = sample_next(logits[:, -1, :], params, rng)
        emitted = finish.update(tokens, reasons, step + 1)
        yield StepOutput(step, emitted, tuple(reasons))
        if all(r is not None for r in reasons):
            return
        # finished rows keep running (their rows are independent) on the pad token
        done = np.array([r is not None for r in reasons])
        input_ids = np.where(done, finish.pad, tokens)[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def generate_all(session: DecoderSession, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 pad_token_id: int | None = None, stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Run `generate` to the end; new tokens per prompt."""
    return collect(generate(session, prompts_token_ids, params, pad_token_id, stop_ids), len(prompts_token_ids))
