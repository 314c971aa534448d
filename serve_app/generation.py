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

INFO_FILE = "decoder_info.json"  # written by export_jobs.decoder_export


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 means no top-k cut. seed None means fresh entropy."""

    max_tokens: int = 16
    min_tokens: int = 0  # stop and EOS tokens are masked out until this many new tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One decode step. token_ids[i] is None where prompt i had already finished.

    A stop or EOS token that ends a row is yielded (finish_reason "stop"), as generate() does;
    a server hides it from the text.
    """

    step: int
    token_ids: tuple[int | None, ...]
    finish_reasons: tuple[str | None, ...]  # "stop", "length" or None (still running)

    @property
    def all_finished(self) -> bool:
        return all(r is not None for r in self.finish_reasons)


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


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits [b, vocab] -> token ids [b]. Order as in transformers: temperature, top-k, top-p."""
    if params.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if params.top_p < 1:
        order = np.argsort(-scores, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(_softmax(scores), order, axis=-1)
        # keep a token while the mass before it is < top_p: the smallest set reaching top_p
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop_sorted = before >= params.top_p
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    probs = _softmax(scores)
    u = rng.random((probs.shape[0], 1))
    picked = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(picked, probs.shape[-1] - 1).astype(np.int64)


def stop_ids_and_pad(eos_token_ids: Sequence[int], params: SamplingParams,
                     pad_token_id: int | None) -> tuple[np.ndarray, int]:
    """The token ids that end a row (stop tokens, and EOS unless ignored) and the pad id (default: EOS)."""
    eos = () if params.ignore_eos else tuple(eos_token_ids)
    stop_ids = np.array(sorted(set(params.stop_token_ids) | set(eos)), np.int64)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return stop_ids, pad_token_id


def generate(session: DecoderSession, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
             pad_token_id: int | None = None) -> Iterator[StepOutput]:
    """Decode a batch of prompts together (left padded); yield the new token of every row per step."""
    stop_ids, pad_token_id = stop_ids_and_pad(session.eos_token_ids, params, pad_token_id)
    rng = np.random.default_rng(params.seed)
    input_ids, mask = left_pad(prompts_token_ids, pad_token_id)
    positions = positions_from_mask(mask)
    batch = input_ids.shape[0]
    past = session.empty_past(batch)
    reasons: list[str | None] = [None] * batch
    for step in range(params.max_tokens):
        logits, past = session.step(input_ids, mask, positions, past)
        last = logits[:, -1, :]
        if step < params.min_tokens and stop_ids.size:
            last = last.copy()
            last[:, stop_ids] = -np.inf  # as transformers' MinNewTokensLengthLogitsProcessor
        tokens = sample_next(last, params, rng)
        emitted = row_updates(tokens, reasons, stop_ids, final=step == params.max_tokens - 1)
        yield StepOutput(step, emitted, tuple(reasons))
        if all(r is not None for r in reasons):
            return
        # finished rows keep running (their rows are independent) on the pad token
        done = np.array([r is not None for r in reasons])
        input_ids = np.where(done, pad_token_id, tokens)[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def row_updates(tokens: np.ndarray, reasons: list[str | None], stop_ids: np.ndarray,
                final: bool) -> tuple[int | None, ...]:
    """This step's token per row (None where the row had finished); marks rows that finish now."""
    emitted: list[int | None] = []
    for row, reason in enumerate(reasons):
        if reason is not None:
            emitted.append(None)
            continue
        emitted.append(int(tokens[row]))
        if tokens[row] in stop_ids:
            reasons[row] = "stop"
        elif final:
            reasons[row] = "length"
    return tuple(emitted)


def collect(steps: Iterator[StepOutput], rows: int) -> list[list[int]]:
    """Run a step iterator to the end; new tokens per row (stop/EOS token included, as generate() does)."""
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in steps:
        for row, tok in enumerate(step.token_ids):
            if tok is not None:
                out[row].append(tok)
    return out


def generate_all(session: DecoderSession, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 pad_token_id: int | None = None) -> list[list[int]]:
    """Run `generate` to the end; new tokens per prompt."""
    return collect(generate(session, prompts_token_ids, params, pad_token_id), len(prompts_token_ids))
