"""Text in, text out over an ONNX decoder: tokenize and check, decode loop, detokenize with stop strings.

No Ray and no HTTP here. The decode loops live in generation.py and static_generation.py.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

from contract.errors import InputTooLong, InvalidRequest
from contract.manifest import ManifestEntry, StaticDecoderMeta

from .continuous import CONTINUOUS_SLOTS, ContinuousBatcher
from .decode_dynamic import DecoderSession, generate
from .decode_static import StaticDecoderSession, generate_static
from .detokenize import IncrementalDecoder, StopStringMatcher
from .ort import providers, session_options
from .sampling import SamplingParams
from .tokens import Prompt, PromptTokenizer

T = TypeVar("T")
STATIC_MAX_BATCH = 32  # prompts per request on the static-cache graph (one KV buffer per batch bucket)


@dataclass(frozen=True)
class Prepared:
    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    stop: tuple[str, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # tokens this prompt generated, set when it finishes


class TextGenerator:
    def __init__(self, entry: ManifestEntry, root: str | Path, *, use_gpu: bool = False, threads: int | None = None,
                 continuous: bool = False, stream_interval_s: float = 0.0, gemm_auto_tune: bool = True):
        """continuous: requests share one KV bucket and one decode step (inference.continuous; static graphs).
        gemm_auto_tune: see inference.ort.session_options.
        stream_interval_s: the least time between two items of `steps` after the first (0: one per step)."""
        self.stream_interval_s = stream_interval_s
        self.decode_steps = 0  # steps all requests have read: shows that a cancelled stream stops
        self._count_lock = threading.Lock()
        meta = entry.metadata
        self.model_id, self.context = entry.id, int(entry.max_length or 2048)
        self.batcher = None
        eps = providers(use_gpu)
        options = session_options(threads, eps, gemm_auto_tune=gemm_auto_tune)
        if isinstance(meta, StaticDecoderMeta):  # fused / fp16 / int8 / int4: the served file (model_file) passed its own gate
            self.session = StaticDecoderSession(entry.model_path(root), providers=eps,
                                                session_options=options,
                                                max_batch=STATIC_MAX_BATCH)
            self._generate = generate_static
            if continuous:  # one bucket of STATIC_MAX_BATCH rows; a request's prompt + max_tokens must fit a row
                self.batcher = ContinuousBatcher(self.session, slots=min(self.context, CONTINUOUS_SLOTS))
                self.context = self.batcher.slots
                self._generate = None  # steps() reads the batcher's stream
        else:
            self.session = DecoderSession(entry.model_path(root), meta.decoder, providers=eps,
                                          session_options=options)
            self._generate = generate
        self.tokens = PromptTokenizer(entry, root)
        self.tokens.max_length = self.context  # what /tokenize reports: a continuous batcher's rows may be shorter
        self.tokenizer = self.tokens.tokenizer
        self.pad_id = meta.pad_token_id

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokens.render_chat(messages)

    def prepare(self, prompts: list[Prompt], *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                seed: int | None, stop: list[str], add_special_tokens: bool | None = None,
                truncate: int | None = None) -> Prepared:
        """Tokenize (or check the ids of) and check against the model (batch size, context) before any decoding
        starts. The caller has checked the request itself first (at least one prompt, non-empty stop strings, its
        max_tokens limit). ``truncate``: keep the first that many tokens of each prompt (-1: as many as fit the
        context with ``max_tokens``)."""
        if isinstance(self.session, StaticDecoderSession) and len(prompts) > self.session.max_batch:
            raise InvalidRequest(f"{self.model_id} decodes at most {self.session.max_batch} prompts per request, "
                                 f"got {len(prompts)}", "prompt")
        encoded = self.tokens.encode(prompts, add_special_tokens)
        if truncate is not None:
            keep = self.context - max_tokens if truncate == -1 else truncate
            encoded = [ids[: max(keep, 1)] for ids in encoded]
        for i, ids in enumerate(encoded):
            where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            if not ids:
                raise InvalidRequest(f"{where} is empty", where)
            if len(ids) + max_tokens > self.context:
                raise InputTooLong(f"{where} has {len(ids)} tokens; with max_tokens={max_tokens} that is over "
                                   f"{self.model_id}'s context of {self.context}", where)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        return Prepared(tuple(encoded), params, tuple(stop))

    def steps(self, prepared: Prepared) -> Iterator[list[Delta]]:
        """Yield the text each prompt gained (and why it finished, when it did), at most one Delta per prompt and
        item. The first step is an item of its own; after it an item covers the steps of `stream_interval_s`,
        so the hops each item takes (a thread, Serve's stream, an SSE event) are paid per interval, not per
        token (BENCHMARKS.md, "Served generation over HTTP")."""
        decoders = [IncrementalDecoder(self.tokenizer, prompt_ids=p) for p in prepared.prompts]
        matchers = [StopStringMatcher(prepared.stop) for _ in prepared.prompts]
        finished = [False] * len(prepared.prompts)
        counts = [0] * len(prepared.prompts)
        if self.batcher is not None:  # its reader sleeps through each interval
            chunks = self.batcher.stream(prepared.prompts, prepared.params, self.pad_id, self.stream_interval_s)
        else:  # the loop computes each step when asked for it
            chunks = chunked(self._generate(self.session, prepared.prompts, prepared.params, self.pad_id),
                             self.stream_interval_s)
        for chunk in chunks:
            with self._count_lock:
                self.decode_steps += len(chunk)
            texts: dict[int, str] = {}  # prompt -> text gained in this chunk, in order of first appearance
            reasons: dict[int, str] = {}
            for step in chunk:
                for row, (token, reason) in enumerate(zip(step.token_ids, step.finish_reasons)):
                    if finished[row] or token is None:
                        continue
                    counts[row] += 1
                    text, stopped = matchers[row].push(decoders[row].push(token))
                    if reason is not None and not stopped:
                        text += matchers[row].push(decoders[row].flush())[0] + matchers[row].flush()
                    if stopped:
                        reason = "stop"
                    if text or reason:
                        texts[row] = texts.get(row, "") + text
                    if reason is not None:
                        reasons[row] = reason
                    finished[row] = reason is not None
            yield [Delta(row, text, reasons.get(row), counts[row] if row in reasons else 0)
                   for row, text in texts.items()]
            if all(finished):
                return


def chunked(steps: Iterator[T], interval_s: float) -> Iterator[list[T]]:
    """Group steps so that items go out at most every `interval_s`: the first step alone (the first token is not
    held back), then everything that arrived until `interval_s` after the previous item, and the rest at the end.
    A step is never held for longer than the interval plus one step."""
    chunk: list[T] = []
    last = None
    try:
        for step in steps:
            chunk.append(step)
            now = time.monotonic()
            if last is None or now - last >= interval_s:
                yield chunk
                chunk, last = [], now
        if chunk:
            yield chunk
    finally:  # a reader that stops early stops the loop now (it gives back its KV bucket)
        getattr(steps, "close", lambda: None)()
