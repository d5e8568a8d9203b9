"""ChatTemplate: HF-compatible rendering in a sandbox, message validation."""

import pytest

from kvmm_daemon.errors import ModelLoadError, RequestError
from kvmm_daemon.model.chat_template import ChatTemplate, validate_messages

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_render_with_and_without_generation_prompt():
    t = ChatTemplate(CHATML)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert t.render(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                              "Hi<|im_end|>\n<|im_start|>assistant\n")
    assert not t.render(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_hf_conventions_trim_blocks_bos_tojson_raise_exception():
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}\n"
                     "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
                     "{{ m | tojson }}\n{% endfor %}", bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "é"}]) == \
        '<s>{"role": "user", "content": "é"}\n'
    with pytest.raises(RequestError, match="chat template: no tools"):
        t.render([{"role": "tool", "content": "x"}])


def test_sandbox_blocks_attribute_escapes():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="failed to render"):
        t.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "user"}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], r"messages\[1\].role"),
    ([{"role": "", "content": "b"}], r"messages\[0\].role"),
])
def test_bad_messages(messages, message):
    with pytest.raises(RequestError, match=message):
        ChatTemplate(CHATML).render(messages)


def test_validate_messages_drops_extra_keys():
    assert validate_messages([{"role": "user", "content": "x", "name": "bob"}]) == \
        [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("source, message", [("", "empty"), ("{% for %}", "does not compile")])
def test_bad_templates(source, message):
    with pytest.raises(ModelLoadError, match=message):
        ChatTemplate(source, origin="m.gguf")
