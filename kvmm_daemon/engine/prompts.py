"""PromptEncoder: request input (text, chat messages or token ids) -> prompt token ids.

Text and messages go through the model's chat template unless `raw`. For a session that
already has history only the new turn is rendered: render(probe + messages) minus
render(probe), after closing the previous assistant turn with the template's own
end-of-turn text (less the EOS the model already produced) — so the template's preamble
(SmolLM2 adds a default system prompt) is not repeated every turn, and the history reads
exactly as the template renders the whole conversation.
"""
from __future__ import annotations

from kvmm_daemon.errors import RequestError


class PromptEncoder:
    def __init__(self, tokenizer, chat_template, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids

    def encode(self, *, text: str | None = None, messages: list | None = None,
               token_ids: list[int] | None = None, raw: bool = False,
               add_generation_prompt: bool = True, history: list[int] | None = None) -> list[int]:
        given = sum(x is not None for x in (text, messages, token_ids))
        if given != 1:
            raise RequestError("give exactly one of prompt text, chat messages or token ids")
        if token_ids is not None:
            if not token_ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                        and 0 <= t < self.vocab_size for t in token_ids):
                raise RequestError(f"token ids must be a non-empty list of integers in 0..{self.vocab_size - 1}")
            return list(token_ids)
        if messages is None and raw:
            if not isinstance(text, str):
                raise RequestError("prompt text must be a string")
            return self.tokenizer.encode(text)
        if messages is None:
            messages = [{"role": "user", "content": text}]
        if self.chat_template is None:
            raise RequestError("this model has no chat template; send raw text (--raw) or token ids")
        if history:
            rendered = self.continue_chat(messages, history[-1])
        else:
            rendered = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(rendered, parse_special=True)

    def continue_chat(self, messages: list, last_token: int) -> str:
        """The template text of `messages` as the next turn after a history ending in
        `last_token`."""
        probe = [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": "\x01"}]
        before = self.chat_template.render(probe, add_generation_prompt=False)
        after = self.chat_template.render(probe + list(messages), add_generation_prompt=True)
        if not after.startswith(before):
            return after      # a template that rewrites earlier turns: render in full
        end_of_turn = before[before.rindex("\x01") + 1:]
        if last_token in self.eos_ids:
            eos_text = self.tokenizer.decode([last_token], special=True)
            if end_of_turn.startswith(eos_text):
                end_of_turn = end_of_turn[len(eos_text):]
        return end_of_turn + after[len(before):]
