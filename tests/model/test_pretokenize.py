"""Pre-tokenizer splits, derived by hand from llama.cpp's unicode.cpp semantics."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmm_daemon.model.pretokenize import (LETTER, NUMBER, OTHER, SPACE, PreTokenizer,
                                           char_flags, pre_tokenize)

GPT2, DIGITS, LLAMA3 = PreTokenizer.GPT2, PreTokenizer.DIGITS_GPT2, PreTokenizer.LLAMA3


@pytest.mark.parametrize("text, expected", [
    ("Hello world! 123", ["Hello", " world", "!", " 123"]),
    ("  multiple   spaces", [" ", " multiple", "  ", " spaces"]),
    ("it's we'll they're I'M", ["it", "'s", " we", "'ll", " they", "'re", " I", "'", "M"]),
    ("\n\n  foo", ["\n\n ", " foo"]),
    ("a   ", ["a", "   "]),
    ("x\u00a0y", ["x", "\u00a0", "y"]),          # NBSP is \s
    ("a\x1cb", ["a", "\x1c", "b"]),              # U+001C is not \s for llama.cpp
    ("naïve café 東京 😀!!", ["naïve", " café", " 東京", " 😀!!"]),
    ("x²+y", ["x", "²", "+", "y"]),               # superscript two is \p{N}
    ("f(x) = 'a'", ["f", "(", "x", ")", " =", " '", "a", "'"]),
    ("tab\tend", ["tab", "\t", "end"]),
    (" ", [" "]),
    ("", []),
])
def test_gpt2_splits(text, expected):
    assert pre_tokenize(text, GPT2) == expected


@pytest.mark.parametrize("text, expected", [
    ("Hello world! 123", ["Hello", " world", "!", " ", "1", "2", "3"]),
    ("abc123def", ["abc", "1", "2", "3", "def"]),
    # a digit is a fragment boundary, so "\s+(?!\S)" keeps both spaces before it
    ("a  1", ["a", "  ", "1"]),
    ("approximately 311 million", ["approximately", " ", "3", "1", "1", " million"]),
    ("x²", ["x", "²"]),
    ("v1.2.3", ["v", "1", ".", "2", ".", "3"]),
])
def test_digit_split_then_gpt2(text, expected):
    assert pre_tokenize(text, DIGITS) == expected


@pytest.mark.parametrize("text, expected", [
    ("12345 apples", ["123", "45", " apples"]),
    ("I'M HERE", ["I", "'M", " HERE"]),
    ("Hello\n\nworld", ["Hello", "\n\n", "world"]),
    ("x = (a+b);\n", ["x", " =", " (", "a", "+b", ");\n"]),
    ("  indented", [" ", " indented"]),
    ("\tTab", ["\tTab"]),
    ("end  \n", ["end", "  \n"]),
])
def test_llama3_splits(text, expected):
    assert pre_tokenize(text, LLAMA3) == expected


def test_char_classes_follow_llama_cpp_tables():
    flags = char_flags("a5 \u3000\x1c\u0300中😀")
    assert flags == [LETTER, NUMBER, SPACE, SPACE, OTHER, OTHER, LETTER, OTHER, 0]
    assert char_flags("\U00031350")[0] == LETTER  # CJK Extension H (Unicode 15)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 \n\t'sS.,😀é²\u00a0")), max_size=40))
def test_splits_tile_the_text(text):
    for kind in PreTokenizer:
        words = pre_tokenize(text, kind)
        assert "".join(words) == text
        assert all(words)


# On ASCII text \p{L} is [A-Za-z] and \p{N} is [0-9], so Python's `re` is an exact oracle
# for the original regexes (llama.cpp's own scanners are meant to be equivalent to them).
_ASCII_GPT2 = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_ASCII_LLAMA3 = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}"
    r"| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 \n\t'sSrlmvdeL.,(\r")), max_size=24))
def test_scanners_match_the_regexes_on_ascii(text):
    assert pre_tokenize(text, GPT2) == _ASCII_GPT2.findall(text)
    assert pre_tokenize(text, LLAMA3) == _ASCII_LLAMA3.findall(text)
    fragments = re.findall(r"[0-9]|[^0-9]+", text)
    assert pre_tokenize(text, DIGITS) == [w for f in fragments for w in _ASCII_GPT2.findall(f)]
