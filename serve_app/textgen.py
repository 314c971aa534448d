"""Text in, text out over an ONNX decoder: tokenize and check, decode loop, detokenize with stop strings.

No Ray and no HTTP here. The decode loops live in generation.py and static_generation.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer

from export_jobs.manifest import ManifestEntry

from .chat import ChatTemplate
from .continuous import CONTINUOUS_SLOTS, ContinuousBatcher
from .detokenize import IncrementalDecoder, StopStringMatcher
from .errors import InputTooLong, InvalidRequest
from .generation import DecoderSession, SamplingParams, generate
from .runtime import providers, session_options
from .static_generation import StaticDecoderSession, generate_static

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
                 continuous: bool = False):
        """continuous: requests share one KV bucket and one decode step (serve_app.continuous; static graphs)."""
        directory = entry.dir_path(root)
        meta = entry.metadata
        self.model_id, self.context = entry.id, int(entry.max_length or 2048)
        self.batcher = None
        if meta.get("static_decoder"):  # fused / fp16 / int8 / int4: the served file (model_file) passed its own gate
            self.session = StaticDecoderSession(entry.model_path(root), providers=providers(use_gpu),
                                                session_options=session_options(threads),
                                                max_batch=STATIC_MAX_BATCH)
            self._generate = generate_static
            if continuous:  # one bucket of STATIC_MAX_BATCH rows; a request's prompt + max_tokens must fit a row
                self.batcher = ContinuousBatcher(self.session, slots=min(self.context, CONTINUOUS_SLOTS))
                self.context = self.batcher.slots
                self._generate = lambda _session, prompts, params, pad: self.batcher.generate(prompts, params, pad)
        else:
            self.session = DecoderSession(entry.model_path(root), meta["decoder"], providers=providers(use_gpu),
                                          session_options=session_options(threads))
            self._generate = generate
        self.tokenizer = Tokenizer.from_file(str(directory / meta["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = meta.get("pad_token_id")
        self.add_special_tokens = bool(meta.get("add_special_tokens", True))
        self.chat = ChatTemplate.from_tokenizer_dir((directory / meta["tokenizer"]).parent)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat is None:
            raise InvalidRequest(f"{self.model_id} has no chat template; use /v1/completions", "model")
        return self.chat.render(messages)

    def prepare(self, prompts: list[str], *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                seed: int | None, stop: list[str], add_special_tokens: bool | None = None) -> Prepared:
        """Tokenize and check against the context before any decoding starts."""
        if not prompts:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if isinstance(self.session, StaticDecoderSession) and len(prompts) > self.session.max_batch:
            raise InvalidRequest(f"{self.model_id} decodes at most {self.session.max_batch} prompts per request, "
                                 f"got {len(prompts)}", "prompt")
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        encoded = [tuple(e.ids) for e in self.tokenizer.encode_batch(prompts, add_special_tokens=special)]
        for i, ids in enumerate(encoded):
            where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            if not ids:
                raise InvalidRequest(f"{where} is empty", where)
            if len(ids) + max_tokens > self.context:
                raise InputTooLong(f"{where} has {len(ids)} tokens; with max_tokens={max_tokens} that is over "
                                   f"{self.model_id}'s context of {self.context}", where)
        if any(not s for s in stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        return Prepared(tuple(encoded), params, tuple(stop))

    def steps(self, prepared: Prepared) -> Iterator[list[Delta]]:
        """Yield, per decode step, the text each prompt gained (and why it finished, when it did)."""
        decoders = [IncrementalDecoder(self.tokenizer, prompt_ids=p) for p in prepared.prompts]
        matchers = [StopStringMatcher(prepared.stop) for _ in prepared.prompts]
        finished = [False] * len(prepared.prompts)
        counts = [0] * len(prepared.prompts)
        for step in self._generate(self.session, prepared.prompts, prepared.params, self.pad_id):
            deltas = []
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
                    deltas.append(Delta(row, text, reason, counts[row] if reason else 0))
                finished[row] = reason is not None
            yield deltas
            if all(finished):
                return
