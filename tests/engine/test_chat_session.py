"""A chat session's turns render only the new messages: the session's history reads exactly
as the chat template renders the whole conversation (no repeated system preamble)."""
from __future__ import annotations

import pytest

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.engine import Engine
from kvmm_daemon.engine.sampling_params import SamplingParams


@pytest.mark.slow
def test_chat_turns_continue_the_rendered_conversation():
    e = Engine.from_config(EngineConfig(kv_budget="32MiB", max_model_len=256))
    p = SamplingParams(max_tokens=16)
    q1 = {"role": "user", "content": "What is the capital of France?"}
    q2 = {"role": "user", "content": "And of Italy?"}
    r1 = e.generate(e.encode_prompt(messages=[q1], session_id="c"), p, session_id="c")
    r2 = e.generate(e.encode_prompt(messages=[q2], session_id="c"), p, session_id="c")
    assert r2.usage.cached_prompt_tokens >= r1.usage.prompt_tokens
    convo = [q1, {"role": "assistant", "content": r1.choices[0].text}, q2,
             {"role": "assistant", "content": r2.choices[0].text}]
    want = e.chat_template.render(convo, add_generation_prompt=False)
    got = e.tokenizer.decode(e.sessions["c"].token_ids, special=True)
    assert want.startswith(got) and len(want) - len(got) <= 2, (got, want)
