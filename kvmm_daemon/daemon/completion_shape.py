"""CompletionShape: one request's outputs as OpenAI objects — the whole chat or text
completion, or the server-sent events of a stream.

Shapes follow vLLM's `entrypoints/openai` (usage in the last chunk, errors as {"error": ...}).
A stream is written one item per engine step (`events`), so that each step costs the HTTP
server one write and the client one read: the role chunk goes with the first step's text (as
vLLM sends it), and the last step's text with the finish chunk, the usage chunk and [DONE].
"""
from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from kvmm_daemon import protocol as P
from kvmm_daemon.daemon.openai_requests import ApiError, CompletionRequest


def usage_json(usage: Any) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


class CompletionShape:
    """How one request's outputs look as OpenAI chat or text completion objects.

    Attributes:
      text_offset: choice -> characters of its text covered by logprobs so far (completions).
      _chunk_open, _chunk_close: a streamed chunk's SSE text around its choices; the rest of
        a chunk (id, object, created, model, usage) is the same in every chunk of a request,
        so it is encoded once.
    """

    def __init__(self, req: CompletionRequest, request_id: str, model: str, tokenizer: Any):
        self.req = req
        self.chat = req.chat
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.text_offset: dict[int, int] = {}
        head = json.dumps(self._head("chat.completion.chunk" if self.chat else "text_completion"),
                          ensure_ascii=False)
        self._chunk_open = f"data: {head[:-1]}, \"choices\": "
        self._chunk_close = (', "usage": null}' if req.include_usage else "}") + "\n\n"

    def _token(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tokenizer.token_bytes(token_id)
        return piece.decode("utf-8", errors="replace"), piece

    def logprobs(self, index: int, lps: list | None) -> dict[str, Any] | None:
        """OpenAI's logprobs object of choice `index` for the tokens `lps` (TokenLogprob);
        for text completions `text_offset` continues where the previous call ended."""
        if lps is None:
            return None
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict[str, Any]:
                text, piece = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(piece)}
            return {"content": [{**entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps],
                    "refusal": None}
        tokens = [self._token(lp.token_id)[0] for lp in lps]
        offsets, at = [], self.text_offset.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self.text_offset[index] = at
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self._token(t)[0]: v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def engine_error(self, gen: Any) -> ApiError | None:
        last = gen.acc.last
        if last is None or last.error is None:
            return None
        return ApiError(500, f"the engine failed this request: {last.error}", type="server_error",
                        code=P.ErrorCode.ENGINE_ERROR.value)

    def whole(self, gen: Any) -> dict[str, Any]:
        choices = []
        for c in gen.acc.choices():
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": self.logprobs(c.index, c.logprobs), "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": c.text, "logprobs": self.logprobs(c.index, c.logprobs),
                                "finish_reason": c.finish_reason})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage_json(gen.acc.usage(len(gen.prompt_ids)))}

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        return self._chunk_open + json.dumps(choices, ensure_ascii=False) + self._chunk_close

    def _choice(self, index: int, text: str | None, finish_reason: str | None, *, role: bool = False,
                logprobs: dict[str, Any] | None = None) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    async def events(self, gen: Any) -> AsyncIterator[str]:
        """The stream's SSE text, one item per engine step (see the module docstring)."""
        n = len(gen.acc.finish_reasons)
        held = self._chunk([self._choice(i, "", None, role=True) for i in range(n)]) if self.chat else ""
        async for out in gen:
            if out.error is not None:
                yield held + f"data: {json.dumps(self.engine_error(gen).body())}\n\n"
                return
            texts = [self._choice(d.index, d.text, None, logprobs=self.logprobs(d.index, d.logprobs))
                     for d in out.deltas if d.text or d.logprobs]
            if texts:
                held += self._chunk(texts)
            if held and not gen.finished:
                yield held
                held = ""
        if gen.engine_stopped:
            err = ApiError(500, "the engine stopped; see the daemon log", type="server_error", code="internal")
            yield held + f"data: {json.dumps(err.body())}\n\n"
            return
        gen.retire()
        held += self._chunk([self._choice(i, None if self.chat else "", r)
                             for i, r in enumerate(gen.acc.finish_reasons)])
        if self.req.include_usage:
            usage = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                     "choices": [], "usage": usage_json(gen.acc.usage(len(gen.prompt_ids)))}
            held += f"data: {json.dumps(usage)}\n\n"
        yield held + "data: [DONE]\n\n"
