"""The decoder gate: an exported decoder must match transformers before it is served.

1. logits parity on a left-padded prefill and on several decode steps fed from the exported KV
   cache (max abs difference over real, non-pad positions);
2. greedy generation with the serving decode loop (inference.decode_dynamic) equal token for token
   to `model.generate(do_sample=False)`, on batch 1 and on a left-padded batch 2.

A decoder whose numbers are rounded on purpose (float16 compute, quantized weights) cannot match fp32 logits
within fp32 noise; `agreement_gate` judges it on what a reader sees: top-1 agreement with transformers fp32.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from inference.decode_dynamic import (
    DecoderSession,
    generate_all,
    left_pad,
    positions_from_mask,
)
from inference.sampling import SamplingParams

from .decoder_export import cache_argument, returned_cache
from .validate import ExportError, ParityError

MIN_TOP1 = 0.9  # the share of teacher-forced steps whose top-1 token must equal fp32's (fp16, int8, int4)


class AgreementError(ExportError):
    def __init__(self, what: str, agree: int, steps: int, minimum: float):
        super().__init__(f"{what}: top-1 token equals transformers fp32 on {agree} of {steps} steps "
                         f"({agree / steps:.1%}); the gate wants {minimum:.0%}")
        self.agree, self.steps, self.minimum = agree, steps, minimum


class TokenMismatchError(ExportError):
    def __init__(self, what: str, row: int, position: int, expected: list[int], actual: list[int]):
        super().__init__(
            f"{what}: row {row} differs at new token {position}: "
            f"transformers {expected[position:position + 4]}..., onnx {actual[position:position + 4]}..."
        )
        self.what, self.row, self.position, self.expected, self.actual = what, row, position, expected, actual


def default_prompts(model, seed: int = 0) -> list[list[int]]:
    """Two random prompts of different lengths, the longer one past any local attention window."""
    window = int(getattr(model.config, "window_size", 0) or getattr(model.config, "sliding_window", 0) or 0)
    long = max(24, window + 8)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    return [rng.integers(0, vocab, long).tolist(), rng.integers(0, vocab, max(2, long * 3 // 5)).tolist()]


def _real_rows(mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Logits at non-pad positions only: pad queries attend to nothing and carry no meaning."""
    return logits[mask.astype(bool)]


def logits_parity(model, session: DecoderSession, prompts: Sequence[Sequence[int]], pad_token_id: int,
                  decode_steps: int = 4) -> tuple[float, float]:
    """(prefill max abs diff, decode max abs diff); decode steps feed torch's greedy tokens to both."""
    ids, mask = left_pad(prompts, pad_token_id)
    pos = positions_from_mask(mask)
    def t(x):
        return torch.from_numpy(x).to(model.device)

    with torch.no_grad():
        ref = model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos), use_cache=True,
                    **{cache_argument(model): DynamicCache()})
    logits, past = session.step(ids, mask, pos, session.empty_past(len(prompts)))
    expected = ref.logits.float().cpu().numpy()
    prefill = _max_abs(_real_rows(mask, expected), _real_rows(mask, logits))
    decode = 0.0
    for _ in range(decode_steps):
        nxt = expected[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            ref = model(input_ids=t(nxt), attention_mask=t(mask), position_ids=t(pos), use_cache=True,
                        **{cache_argument(model): returned_cache(ref)})
        logits, past = session.step(nxt, mask, pos, past)
        expected = ref.logits.float().cpu().numpy()
        decode = max(decode, _max_abs(expected, logits))
    return prefill, decode


def _max_abs(expected: np.ndarray, actual: np.ndarray) -> float:
    if expected.shape != actual.shape or not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)), initial=0.0))


def transformers_greedy(model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_token_id: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_token_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids).to(model.device), attention_mask=torch.from_numpy(mask).to(model.device),
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0, pad_token_id=pad_token_id,
        )
    return out[:, ids.shape[1]:].tolist()


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def compare_greedy(what: str, expected: list[list[int]], actual: list[list[int]], eos: set[int]) -> int:
    """Number of matching new tokens; raises TokenMismatchError at the first difference."""
    matched = 0
    for row, (exp, act) in enumerate(zip(expected, actual)):
        exp = _until_eos(exp, eos)
        for i in range(max(len(exp), len(act))):
            if i >= len(exp) or i >= len(act) or exp[i] != act[i]:
                raise TokenMismatchError(what, row, i, exp, act)
        matched += len(exp)
    return matched


def validate_decoder(model, onnx_path: str | Path, prompts: Sequence[Sequence[int]] | None = None,
                     new_tokens: int = 16, tolerance: float = 1e-3, decode_steps: int = 4,
                     pad_token_id: int | None = None, providers: Sequence | None = None,
                     session: DecoderSession | None = None) -> dict:
    """Run the gate; return its figures or raise ParityError / TokenMismatchError."""
    session = session or DecoderSession(onnx_path, providers=providers)
    prompts = [list(p) for p in (prompts or default_prompts(model))][:2]
    if len(prompts) < 2:
        raise ValueError("the decoder gate needs two prompts (batch 1 and a left-padded batch 2)")
    eos = set(session.eos_token_ids)
    if pad_token_id is None:
        pad_token_id = min(eos) if eos else 0
    prefill, decode = logits_parity(model, session, prompts, pad_token_id, decode_steps)
    figures = {
        "prefill_max_abs_diff": prefill,
        "decode_max_abs_diff": decode,
        "decode_steps": decode_steps,
        "tolerance": tolerance,
        "prompt_lengths": [len(p) for p in prompts],
    }
    if not prefill <= tolerance:
        raise ParityError("decoder prefill logits", prefill, tolerance)
    if not decode <= tolerance:
        raise ParityError("decoder decode-step logits", decode, tolerance)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    matched, compared = 0, 0
    for what, batch in (("greedy batch 1", prompts[:1]), ("greedy left-padded batch 2", prompts)):
        expected = transformers_greedy(model, batch, new_tokens, pad_token_id)
        actual = generate_all(session, batch, params, pad_token_id)
        matched += compare_greedy(what, expected, actual, eos)
        compared += sum(len(_until_eos(e, eos)) for e in expected)
    figures.update(greedy_match_tokens=matched, greedy_compared_tokens=compared, greedy_new_tokens=new_tokens)
    return figures


def greedy_reference(model, prompt: Sequence[int], new_tokens: int, pad_token_id: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of `prompt` and its fp32 logits [len(tokens), vocab] along it: row i
    is transformers' prediction of tokens[i], what `static_logits_along` gives for the exported graph."""
    tokens = transformers_greedy(model, [list(prompt)], new_tokens, pad_token_id)[0]
    with torch.no_grad():
        full = torch.tensor([list(prompt) + tokens], device=model.device)
        reference = model(full).logits[0].float().cpu().numpy()[len(prompt) - 1:-1]
    return tokens, reference


def common_prefix(expected: Sequence[int], actual: Sequence[int]) -> int:
    """How many tokens two sequences share before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))


def static_logits_along(session, prompt: Sequence[int], tokens: Sequence[int], pad_token_id: int = 0) -> np.ndarray:
    """Logits [len(tokens), vocab] of a static-cache session (inference.decode_static) fed `prompt`, then
    `tokens` one decode step at a time: row i is its prediction of tokens[i] (teacher forcing)."""
    bucket = session.bucket(1, len(prompt) + len(tokens) + 1)
    lengths = session.prefill(bucket, [list(prompt)], pad_token_id)
    rows = []
    for token in tokens:
        rows.append(bucket.logits.numpy()[0].copy())
        session.decode(bucket, np.array([token]), int(lengths.max()) + 1)
        lengths = lengths + 1
    return np.stack(rows)


def validate_static_decoder(model, onnx_path: str | Path, prompts: Sequence[Sequence[int]] | None = None,
                            new_tokens: int = 16, tolerance: float = 1e-3, pad_token_id: int | None = None,
                            providers: Sequence | None = None) -> dict:
    """The gate for the static-cache GQA graph (export_jobs.static_decoder), as for the dynamic one:

    1. logits along transformers' greedy continuation of each prompt (prefill, then every decode step
       fed the same tokens) within `tolerance`;
    2. greedy generation through inference.decode_static equal to `model.generate` on batch 1 and
       on a right-padded batch 2.
    """
    from inference.decode_static import StaticDecoderSession, generate_all_static

    session = StaticDecoderSession(onnx_path, providers=providers, max_batch=2, min_slots=16)
    prompts = [list(p) for p in (prompts or default_prompts(model))][:2]
    eos = set(session.eos_token_ids)
    if pad_token_id is None:
        pad_token_id = min(eos) if eos else 0
    worst, steps = 0.0, 0
    for prompt in prompts:
        tokens, reference = greedy_reference(model, prompt, new_tokens, pad_token_id)
        worst = max(worst, _max_abs(reference, static_logits_along(session, prompt, tokens, pad_token_id)))
        steps += len(tokens)
    figures = {"logits_max_abs_diff": worst, "logits_steps": steps, "tolerance": tolerance,
               "prompt_lengths": [len(p) for p in prompts]}
    if not worst <= tolerance:
        raise ParityError("static decoder logits", worst, tolerance)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    matched = 0
    for what, batch in (("static greedy batch 1", prompts[:1]), ("static greedy right-padded batch 2", prompts)):
        expected_tokens = transformers_greedy(model, batch, new_tokens, pad_token_id)
        actual_tokens = generate_all_static(session, batch, params, pad_token_id)
        matched += compare_greedy(what, expected_tokens, actual_tokens, eos)
    figures["greedy_match_tokens"] = matched
    return figures


def agreement_gate(model, onnx_path: str | Path, prompts: Sequence[Sequence[int]], what: str,
                   new_tokens: int = 16, pad_token_id: int = 0, min_top1: float | None = None,
                   providers: Sequence | None = None) -> dict:
    """The gate of a static decoder rounded on purpose (`what` names it in the error): teacher-forced along
    transformers' greedy continuation of each prompt, its top-1 token must equal fp32's on at least `min_top1`
    of the steps. Records the logits' max abs difference and how many greedy tokens it writes before it
    diverges; raises AgreementError below the minimum."""
    from inference.decode_static import StaticDecoderSession, generate_all_static

    minimum = MIN_TOP1 if min_top1 is None else min_top1
    session = StaticDecoderSession(onnx_path, providers=providers, max_batch=1, min_slots=16)
    agree = steps = same_prefix = 0
    worst = 0.0
    for prompt in prompts:
        tokens, reference = greedy_reference(model, prompt, new_tokens, pad_token_id)
        got = static_logits_along(session, prompt, tokens, pad_token_id)
        worst = max(worst, _max_abs(reference, got))
        agree += int(np.sum(got.argmax(-1) == reference.argmax(-1)))
        steps += len(tokens)
        ours = generate_all_static(session, [list(prompt)], SamplingParams(max_tokens=len(tokens), temperature=0.0),
                                   pad_token_id)[0]
        same_prefix += common_prefix(tokens, ours)
    figures = {"top1_agree": agree, "top1_steps": steps, "min_top1": minimum, "logits_max_abs_diff": worst,
               "greedy_same_prefix_tokens": same_prefix}
    if agree < minimum * steps:
        raise AgreementError(what, agree, steps, minimum)
    return figures
