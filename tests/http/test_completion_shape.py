"""CompletionShape.events: one SSE item per engine step, with the role chunk in the first and
the finish, usage and [DONE] in the last; chunks are the JSON objects they always were."""
from __future__ import annotations

import json
import math

import trio

from kvmm_daemon.daemon.completion_shape import CompletionShape
from kvmm_daemon.daemon.openai_requests import parse_completion
from kvmm_daemon.daemon.server import Generation
from kvmm_daemon.engine.outputs import ChoiceDelta, OutputAccumulator, RequestOutput, Timings, Usage


class _NoMetrics:
    def observe_tokens(self, *args) -> None:
        pass


def _generation(steps: list[tuple[str, bool]], *, error_at: int | None = None) -> Generation:
    """A Generation whose engine outputs are `steps` of (text, finished), all ready at once."""
    send, recv = trio.open_memory_channel(math.inf)
    for k, (text, finished) in enumerate(steps):
        send.send_nowait(RequestOutput("r1", [ChoiceDelta(0, [100 + k], text)], finished,
                                       ["length" if finished else None], Usage(5, 0, k + 1),
                                       Timings(None, None, None),
                                       error="boom" if k == error_at else None))
    return Generation("r1", [1] * 5, recv, OutputAccumulator(1), lambda: None, _NoMetrics())


def _items(body: dict, steps: list[tuple[str, bool]], **kw) -> list[list[str]]:
    """Each item events() yields, as the list of its events' data."""
    req = parse_completion({"model": "m", "stream": True, **body}, chat="messages" in body)
    shape = CompletionShape(req, "r1", "m", tokenizer=None)

    async def collect() -> list[str]:
        return [item async for item in shape.events(_generation(steps, **kw))]

    items = trio.run(collect)
    assert all(item.endswith("\n\n") for item in items)
    return [[e[len("data: "):] for e in item.split("\n\n") if e] for item in items]


CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}


def test_a_chat_stream_writes_once_per_step():
    items = _items(CHAT, [("The", False), (" sky", False), (" is", True)])
    assert [len(i) for i in items] == [2, 1, 4]        # role+text, text, text+finish+usage+[DONE]
    first = [json.loads(e) for e in items[0]]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"] == {"content": "The"}
    last = items[2]
    assert json.loads(last[0])["choices"][0]["delta"] == {"content": " is"}
    assert json.loads(last[1])["choices"][0]["finish_reason"] == "length"
    assert json.loads(last[2])["usage"]["completion_tokens"] == 3 and json.loads(last[2])["choices"] == []
    assert last[3] == "[DONE]"


def test_chunks_keep_their_keys_and_order():
    chunk = json.loads(_items(CHAT, [("x", True)])[0][0])
    assert list(chunk) == ["id", "object", "created", "model", "choices", "usage"]
    assert chunk["id"] == "chatcmpl-r1" and chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    plain = json.loads(_items({"prompt": "hi"}, [("x", True)])[0][0])
    assert list(plain) == ["id", "object", "created", "model", "choices"]
    assert plain["choices"][0]["text"] == "x"


def test_a_text_completion_has_no_role_chunk_and_skips_empty_steps():
    items = _items({"prompt": "hi"}, [("a", False), ("", False), ("b", True)])
    assert [len(i) for i in items] == [1, 3]           # the empty step writes nothing
    assert json.loads(items[1][1])["choices"][0]["finish_reason"] == "length"
    assert items[1][2] == "[DONE]"


def test_an_engine_error_ends_the_stream_with_what_was_held():
    items = _items(CHAT, [("a", False), ("b", False)], error_at=0)
    assert len(items) == 1 and len(items[0]) == 2      # the role chunk, then the error
    assert json.loads(items[0][1])["error"]["code"] == "engine_error"
