"""Render a model's chat template (Jinja, as transformers stores it) without importing transformers."""
from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contract.errors import InvalidRequest


def _raise(message: str):
    raise InvalidRequest(f"chat template: {message}", "messages")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_tokenizer_dir(cls, directory: Path) -> "ChatTemplate | None":
        """transformers 5 writes chat_template.jinja; older saves keep it in tokenizer_config.json."""
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        jinja = directory / "chat_template.jinja"
        source = jinja.read_text() if jinja.exists() else config.get("chat_template")
        if not isinstance(source, str):
            return None

        def token(name: str) -> str:
            value = config.get(name) or ""
            return value.get("content", "") if isinstance(value, dict) else str(value)

        return cls(source, token("bos_token"), token("eos_token"))

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", "messages") from None
