"""Sampling and finish rules, once for the three decode loops (dynamic, static and continuous).

A loop asks `sample_next` for each row's next token and `Finish.reason` whether that token ends the row: a stop
token (the model's EOS by default) ends it with "stop", the token budget or a full cache with "length". The
stop token itself is yielded, as transformers' generate() does; the server hides it from the text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 means no top-k cut. seed None means fresh entropy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One decode step. token_ids[i] is None where prompt i had already finished."""

    step: int
    token_ids: tuple[int | None, ...]
    finish_reasons: tuple[str | None, ...]  # "stop", "length" or None (still running)

    @property
    def all_finished(self) -> bool:
        return all(r is not None for r in self.finish_reasons)


class Finish:
    """What ends a row: one of `stop_ids`, or `max_tokens` new tokens, or no cache slot left.

    stop_ids None: the model's EOS tokens; () runs every row to its budget (benchmarks that need a fixed count).
    `pad` is the token finished and padding rows are fed: pad_token_id, else the first EOS, else 0.
    """

    def __init__(self, eos_token_ids: Sequence[int], max_tokens: int, pad_token_id: int | None = None,
                 stop_ids: Sequence[int] | None = None):
        self.stop_ids = frozenset(int(t) for t in (eos_token_ids if stop_ids is None else stop_ids))
        self.max_tokens = max_tokens
        self.pad = pad_token_id if pad_token_id is not None else (int(eos_token_ids[0]) if eos_token_ids else 0)

    def reason(self, token: int, generated: int, room: bool = True) -> str | None:
        """Why a row ends with `token`, its `generated`-th new token (None: it goes on). room: a cache slot is
        left for the next token."""
        if token in self.stop_ids:
            return "stop"
        if generated >= self.max_tokens or not room:
            return "length"
        return None

    def update(self, tokens: np.ndarray, reasons: list[str | None], generated: int, room: bool = True
               ) -> tuple[int | None, ...]:
        """A lock-step loop's rows after their `generated`-th token: the token per row (None where the row had
        finished), and `reasons` updated for rows that finish now."""
        emitted: list[int | None] = []
        for row, reason in enumerate(reasons):
            if reason is not None:
                emitted.append(None)
                continue
            token = int(tokens[row])
            emitted.append(token)
            reasons[row] = self.reason(token, generated, room)
        return tuple(emitted)


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


def collect(steps: Iterator[StepOutput], rows: int) -> list[list[int]]:
    """Run a step iterator to the end; new tokens per row (stop/EOS token included, as generate() does)."""
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in steps:
        for row, tok in enumerate(step.token_ids):
            if tok is not None:
                out[row].append(tok)
    return out
