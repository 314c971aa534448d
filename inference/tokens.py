"""Token ids a client sends, and a decoder's prompt tokenizer without its session.

``check_ids`` refuses ids outside the model's vocabulary before anything runs. ``PromptTokenizer`` holds a
decoder's tokenizer and chat template: the Generator's ``TextGenerator`` prepares prompts with it, and the
ingress serves /tokenize and /detokenize with its own copy (no session, no torch). No Ray and no HTTP here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from contract.errors import InvalidRequest
from contract.manifest import ManifestEntry

from .chat import ChatTemplate

Prompt = str | Sequence[int]  # a text, or the model's own token ids


def check_ids(ids: Sequence[int], tokenizer: Tokenizer, model_id: str, where: str) -> None:
    """Raise ``InvalidRequest`` naming ``where`` and the first id outside the vocabulary, or an empty list."""
    if not ids:
        raise InvalidRequest(f"{where} is an empty list of token ids", where)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for token in ids:
        if not 0 <= token < size:
            raise InvalidRequest(
                f"{where} has token id {token}, outside {model_id}'s vocabulary of {size}: token ids must come from "
                "this model's tokenizer (POST /tokenize). LangChain's OpenAIEmbeddings sends tiktoken ids unless "
                "check_embedding_ctx_length=False", where)


def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)


def detokenize(tokenizer: Tokenizer, ids: Sequence[int], model_id: str) -> str:
    check_ids(list(ids), tokenizer, model_id, "tokens")
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def where(field: str, index: int, count: int) -> str:
    return f"{field}[{index}]" if count > 1 else field


class PromptTokenizer:
    """A decoder artifact's tokenizer (as the export saved it) and chat template."""

    def __init__(self, entry: ManifestEntry, root: str | Path):
        from .encoder import load_tokenizer

        meta = entry.metadata
        self.model_id, self.max_length = entry.id, int(entry.max_length or 2048)
        self.tokenizer = load_tokenizer(entry, root)
        self.add_special_tokens = meta.add_special_tokens
        self.chat = ChatTemplate.from_tokenizer_dir((entry.dir_path(root) / meta.tokenizer).parent)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat is None:
            raise InvalidRequest(f"{self.model_id} has no chat template; use /v1/completions", "model")
        return self.chat.render(messages)

    def encode(self, prompts: Sequence[Prompt], add_special_tokens: bool | None = None) -> list[tuple[int, ...]]:
        """Texts tokenized, ids checked against the vocabulary, in order."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_batch(texts, add_special_tokens=special)) if texts else iter(())
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                out.append(tuple(next(encoded).ids))
            else:
                check_ids(prompt, self.tokenizer, self.model_id, where("prompt", i, len(prompts)))
                out.append(tuple(prompt))
        return out

    def tokenize(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """/tokenize: a prompt as /v1/completions tokenizes it, or messages as the chat route renders them."""
        if messages is not None:
            return list(self.encode([self.render_chat(messages)], add_special_tokens=False)[0])
        return list(self.encode([prompt or ""])[0])

    def detokenize(self, ids: Sequence[int]) -> str:
        return detokenize(self.tokenizer, ids, self.model_id)
