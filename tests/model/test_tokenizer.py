"""Tokenizer: llama.cpp-exact ids on the embedded SmolLM2 vocabulary, decoding, streaming."""

import json
import random
import time
from pathlib import Path

import pytest

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.model_file import default_model_path
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.pretokenize import pre_tokenize
from kvmm_daemon.model.tokenizer import CONTROL, IncrementalDecoder, Tokenizer

GOLDEN = Path("/work/shared/golden/smollm2_greedy.json")


@pytest.fixture(scope="module")
def model():
    return GGUFModelFile(default_model_path())


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


@pytest.fixture(scope="module")
def metadata():
    """The raw vocabulary metadata (a model file whose tokenizer is built drops it)."""
    return GGUFModelFile(default_model_path()).metadata


def fresh_tokenizer(metadata) -> Tokenizer:
    md = metadata
    return Tokenizer(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                     md["tokenizer.ggml.merges"], pre="smollm", bos_token_id=1,
                     eos_token_id=2, add_bos=False)


def reference_bpe(tok: Tokenizer, text: str) -> list[int]:
    """GPT-2 encoder.py-style BPE (merge every occurrence of the lowest-ranked pair),
    a different algorithm from the heap-based one under test; same pre-tokenization."""
    ids = []
    for word in pre_tokenize(text, tok.pre_tokenizer):
        syms = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
        while len(syms) > 1:
            pairs = {(a, b): tok._ranks.get((a, b)) for a, b in zip(syms, syms[1:])}
            ranked = [(r, p) for p, r in pairs.items() if r is not None]
            if not ranked:
                break
            best = min(ranked)[1]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        ids.extend(tok.token_to_id(s) for s in syms)
    return ids


def _gpt2_byte_chars() -> list[str]:
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return out


_BYTE_CHARS = _gpt2_byte_chars()

TRICKY = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t\tindent", "trailing   ", "   leading",
    "it's we'll they've I'd she'd've 'quoted'", "I'M YELLING'S", "don't stop",
    "3.14159 and 1,000,000 and 2024-01-22", "x²+y³=z¹", "١٢٣ Arabic digits",
    "naïve café résumé Zürich", "日本語のテキスト、東京。", "Привет, мир!", "😀🎉👍🏽 emoji",
    "e\u0301 combining", "zero\u200bwidth", "nbsp\u00a0here", "ideographic\u3000space",
    "file\x1cseparator", "bell\x07", "<|im_start|> literal", "<|im_end|>", "<b>html</b>",
    "def f(x):\n    return x ** 2  # comment\n", "tab\tsep\tvalues\n", "a" * 300,
    "multiple     spaces   between\twords", "MiXeD CaSe WoRdS", "http://example.com/a?b=c&d=e",
]


def test_golden_prompts_encode_exactly(tok):
    cases = json.loads(GOLDEN.read_text())["cases"]
    assert cases
    for case in cases:
        assert tok.encode(case["prompt"]) == case["prompt_token_ids"], case["prompt"]


def test_golden_outputs_decode_exactly(tok):
    for case in json.loads(GOLDEN.read_text())["cases"]:
        assert tok.decode(case["greedy_token_ids"]) == case["greedy_text"]
        ref = case["float32_reference"]
        assert tok.decode(ref["greedy_token_ids"]) == ref["greedy_text"]


@pytest.mark.parametrize("text, ids", [
    # cross-checked SmolLM2 tokenizations (Hugging Face tokenizer / llama.cpp agree)
    ("Hello, we can use", [19556, 28, 392, 416, 722]),
    ("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
     [2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
      19712, 8182]),
    ("\n", [198]),
    ("Hello world! 123", [19556, 905, 17, 216, 33, 34, 35]),
    ("Café déjà vu.", [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
    ("  multiple   spaces", [216, 2701, 256, 5600]),
])
def test_known_tokenizations(tok, text, ids):
    assert tok.encode(text) == ids


def test_digits_are_single_tokens(tok):
    digit = {d: tok.token_to_id(d) for d in "0123456789"}
    assert tok.encode("2024") == [digit["2"], digit["0"], digit["2"], digit["4"]]
    space = tok.token_to_id("Ġ")
    assert tok.encode(" 7") == [space, digit["7"]]


@pytest.mark.parametrize("text", TRICKY)
def test_heap_bpe_matches_reference_bpe_and_round_trips(tok, text):
    ids = tok.encode(text)
    assert ids == reference_bpe(tok, text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_random_unicode_round_trips(tok):
    rng = random.Random(0)
    pool = [chr(c) for c in [*range(0x20, 0x7F), 0x0A, 0x09, 0xE9, 0x3B1, 0x416, 0x4E2D,
                             0x1F600, 0x1F3FD, 0x0301, 0x00A0, 0x2028, 0xFFFD]]
    for _ in range(200):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == reference_bpe(tok, text)


def test_special_tokens_only_with_parse_special(tok):
    text = "<|im_start|>user\nhi<|im_end|>\n"
    parsed = tok.encode(text, parse_special=True)
    assert parsed[0] == 1 and parsed[-2] == 2
    assert parsed[1:-2] == tok.encode("user\nhi") and parsed[-1] == tok.encode("\n")[0]
    plain = tok.encode(text)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == text
    assert tok.decode(parsed) == "user\nhi\n"  # control tokens print as nothing
    assert tok.decode(parsed, special=True) == text


def test_vocabulary_metadata(tok):
    assert tok.vocab_size == 49152 and tok.pre == "smollm"
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, False)
    assert tok.eos_token_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert tok.token_type(1) == CONTROL and tok.is_special(2) and not tok.is_special(504)
    assert tok.encode("", add_special=True) == []


def test_bos_is_added_when_the_vocabulary_asks(metadata):
    md = metadata
    with_bos = Tokenizer(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                         md["tokenizer.ggml.merges"], pre="smollm", bos_token_id=1,
                         eos_token_id=2, add_bos=True)
    assert with_bos.encode("Hi") == [1, *with_bos.encode("Hi", add_special=False)]
    assert with_bos.encode("") == [1]


def test_unsupported_pre_tokenizer_is_refused(metadata):
    md = metadata
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'qwen2' is not supported"):
        Tokenizer(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], [],
                  pre="qwen2", bos_token_id=None, eos_token_id=None)


def test_incremental_decoder_holds_back_partial_utf8(tok):
    text = "ok 😀 日本 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some chars span several byte tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.feed(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.finish() == text
    partial = IncrementalDecoder(tok)
    cut = tok.encode("😀")[:-1]
    assert partial.feed(cut) == ""
    assert partial.finish() == "\ufffd"


def test_two_thousand_token_prompt_encodes_fast(metadata):
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(1500)]
    text = " ".join(w + rng.choice(["", ",", ".", " 42", "\n"]) for w in words)
    tok = fresh_tokenizer(metadata)  # cold word cache
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert len(ids) >= 2000
    assert elapsed < 1.0, f"{len(ids)} tokens took {elapsed:.2f}s"
