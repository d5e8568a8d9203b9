"""Chat templates: render a list of chat messages into one prompt string.

Models ship a Jinja2 template (GGUF `tokenizer.chat_template`, or `chat_template` in a
Hugging Face tokenizer_config.json). It is rendered the way transformers'
`apply_chat_template` does: an immutable sandboxed environment with trim_blocks and
lstrip_blocks, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that keeps non-ASCII,
and the variables messages, add_generation_prompt, bos_token, eos_token. The rendered text
is meant to be encoded with parse_special=True so its <|im_start|>-style markers become
control tokens.

Left out: tool/function-calling schemas and multimodal content parts (content must be a
string), llama.cpp's built-in non-Jinja template fallbacks.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvmm_daemon.errors import ModelLoadError, RequestError


class TemplateError(RequestError):
    """The template itself rejected the conversation (its raise_exception was called)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the wire shape of chat messages: a non-empty list of {"role", "content"}
    string pairs. Returns plain dict copies; raises RequestError naming the bad item."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of "
                           '{"role": str, "content": str} objects')
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content, "
                               f"not {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise RequestError(f"messages[{i}].role must be a non-empty string "
                               '(e.g. "system", "user", "assistant")')
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    return clean


class ChatTemplate:
    """A compiled chat template.

    Attributes: source (the Jinja2 text), bos_token / eos_token (strings the template may
    reference, "" when the model has none). The compiled template is immutable and
    rendering is thread-safe.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 origin: str = "model") -> None:
        if not isinstance(source, str) or not source.strip():
            raise ModelLoadError(f"{origin}: the chat template is empty; "
                                 "use raw prompts (--raw) with this model")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"{origin}: chat template does not compile (line "
                                 f"{exc.lineno}: {exc.message}); use raw prompts (--raw) "
                                 "or fix the template") from None

    @classmethod
    def for_tokenizer(cls, source: str, tok, *, origin: str) -> ChatTemplate:
        """The template with the tokenizer's BOS/EOS texts as bos_token/eos_token."""
        bos = tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else ""
        eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else ""
        return cls(source, bos_token=bos, eos_token=eos, origin=origin)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for `messages`; ends with the assistant header when
        add_generation_prompt. Raises RequestError for malformed messages."""
        clean = validate_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": clean, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise RequestError(f"chat template failed to render these messages: {exc}; "
                               "send a raw prompt instead") from None
