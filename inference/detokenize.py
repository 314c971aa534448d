"""Streaming text from token ids: incremental detokenization and stop strings.

Works with a `tokenizers.Tokenizer` or a transformers tokenizer: only `.decode(ids,
skip_special_tokens=...)` is used. No torch.
"""
from __future__ import annotations

from collections.abc import Sequence


class IncrementalDecoder:
    """Turn a growing list of token ids into text deltas.

    Byte-level BPE can split one character over several tokens; a delta is held back while the
    decoded tail ends in U+FFFD, and text is re-decoded from a few tokens back so that
    tokenizers that add spaces between tokens (SentencePiece) still produce the right deltas.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-5:]  # a little context for the first delta
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream (an unfinished character, if any)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Find stop strings in streamed text without emitting part of one.

    `push(delta)` returns (text safe to emit now, stopped). Text that could be the start of a
    stop string is held back until it is decided. On a stop the stop string itself and all that
    follows are dropped (OpenAI semantics).
    """

    def __init__(self, stop: Sequence[str]):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(stop)
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)], True
        keep = _longest_partial_stop(text, self.stop)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _longest_partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def find_stop_string(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None (for non-streaming use)."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
