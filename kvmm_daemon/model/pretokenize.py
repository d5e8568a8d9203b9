"""Pre-tokenization: split text into the words that byte-level BPE then merges.

This reproduces llama.cpp's `unicode_regex_split` for the BPE pre-tokenizer families a
Llama-family GGUF names in `tokenizer.ggml.pre`, so that prompts tokenize to exactly the ids
llama.cpp produces on the same file:

  GPT2           's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
  DIGITS_GPT2    first every \\p{N} code point becomes a fragment of its own, then GPT2
                 inside each fragment (SmolLM, StarCoder, Command-R...)
  LLAMA3         (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|
                  ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

The splitters are hand-written scanners, like llama.cpp's `unicode_regex_split_custom_gpt2`
and `..._llama3` (the `regex` module with \\p{...} is not available here, and `re` lacks
Unicode classes). Like llama.cpp, a fragment boundary acts as the end of the text for
look-aheads, so "\\s+(?!\\S)" never looks across a split digit.

Character classes follow llama.cpp's tables: \\p{L} and \\p{N} are the Unicode general
categories L* and N*, and \\s is the Unicode White_Space property (not str.isspace, which
also accepts U+001C..U+001F). Categories come from `unicodedata` (Unicode 14 on Python
3.11); llama.cpp's tables are Unicode 15, so the CJK Extension H and I letters are added by
hand. Left out: code points assigned in Unicode 15/15.1 outside those blocks are classified
as "other" rather than letters/numbers (the tokenization of such text may differ).
"""

from __future__ import annotations

import enum
import unicodedata

LETTER = 1
NUMBER = 2
SPACE = 4
OTHER = 8  # any code point that is not a letter, number or white space
# a position past the end of a fragment has flags 0 (llama.cpp's OUT_OF_RANGE)

_WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
     0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
_UNICODE15_LETTERS = ((0x31350, 0x323AF), (0x2EBF0, 0x2EE5D))  # CJK Ext. H, Ext. I


class PreTokenizer(enum.Enum):
    """The splitting rule of a vocabulary (llama.cpp's pre-tokenizer type)."""

    GPT2 = "gpt2"
    DIGITS_GPT2 = "digits+gpt2"
    LLAMA3 = "llama3"


def _classify(ch: str) -> int:
    cp = ord(ch)
    if cp in _WHITE_SPACE:
        return SPACE
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return LETTER
    if cat[0] == "N":
        return NUMBER
    if cat == "Cn" and any(lo <= cp <= hi for lo, hi in _UNICODE15_LETTERS):
        return LETTER
    return OTHER


_FLAGS: dict[str, int] = {chr(cp): _classify(chr(cp)) for cp in range(128)}


def char_flags(text: str) -> list[int]:
    """Flags of every character of `text`, plus a trailing 0 for "past the end"."""
    table = _FLAGS
    flags = []
    for ch in text:
        f = table.get(ch)
        if f is None:
            f = table[ch] = _classify(ch)
        flags.append(f)
    flags.append(0)
    return flags


def split_digits(text: str) -> list[str]:
    """Split before and after every \\p{N} code point (each number char stands alone)."""
    flags = char_flags(text)
    out: list[str] = []
    start = 0
    for i, f in enumerate(flags[:-1]):
        if f == NUMBER:
            if i > start:
                out.append(text[start:i])
            out.append(text[i])
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def split_gpt2(text: str, out: list[str]) -> None:
    """Append the GPT-2 regex matches of one fragment to `out` (they tile the fragment)."""
    n = len(text)
    f = char_flags(text)
    word_chars = SPACE | LETTER | NUMBER
    pos = 0
    while pos < n:
        start = pos
        c = text[pos]
        if c == "'" and pos + 1 < n:
            c1 = text[pos + 1]
            if c1 in "stmd":
                out.append(text[pos:pos + 2])
                pos += 2
                continue
            if pos + 2 < n and text[pos + 1:pos + 3] in ("re", "ve", "ll"):
                out.append(text[pos:pos + 3])
                pos += 3
                continue
        f2 = f[pos + 1] if c == " " else f[pos]
        if f2 & (LETTER | NUMBER):  # " ?\p{L}+" or " ?\p{N}+"
            cls = f2 & (LETTER | NUMBER)
            pos += c == " "
            while f[pos] & cls:
                pos += 1
        elif f2 and not f2 & word_chars:  # " ?[^\s\p{L}\p{N}]+"
            pos += c == " "
            while f[pos] and not f[pos] & word_chars:
                pos += 1
        else:
            pos = _whitespace_end(text, f, pos, n, newlines=False)
        out.append(text[start:pos])


def split_llama3(text: str, out: list[str]) -> None:
    """Append the Llama-3 regex matches of one fragment to `out`."""
    n = len(text)
    f = char_flags(text)
    word_chars = SPACE | LETTER | NUMBER
    pos = 0
    while pos < n:
        start = pos
        c = text[pos]
        fc = f[pos]
        if c == "'" and pos + 1 < n:  # case-insensitive contractions
            c1 = text[pos + 1].lower() if text[pos + 1].isascii() else ""
            if c1 and c1 in "stmd":
                out.append(text[pos:pos + 2])
                pos += 2
                continue
            if pos + 2 < n and text[pos + 1:pos + 3].isascii() \
                    and text[pos + 1:pos + 3].lower() in ("re", "ve", "ll"):
                out.append(text[pos:pos + 3])
                pos += 3
                continue
        if c not in "\r\n" and not fc & NUMBER and (fc & LETTER or f[pos + 1] & LETTER):
            pos += 1  # "[^\r\n\p{L}\p{N}]?\p{L}+"
            while f[pos] & LETTER:
                pos += 1
            out.append(text[start:pos])
            continue
        if fc & NUMBER:  # "\p{N}{1,3}"
            while f[pos] & NUMBER:
                pos += 1
                if pos - start == 3:
                    out.append(text[start:pos])
                    start = pos
            if pos > start:
                out.append(text[start:pos])
            continue
        f2 = f[pos + 1] if c == " " else fc
        if f2 and not f2 & word_chars:  # " ?[^\s\p{L}\p{N}]+[\r\n]*"
            pos += c == " "
            while f[pos] and not f[pos] & word_chars:
                pos += 1
            while pos < n and text[pos] in "\r\n":
                pos += 1
        else:
            pos = _whitespace_end(text, f, pos, n, newlines=True)
        out.append(text[start:pos])


def _whitespace_end(text: str, f: list[int], pos: int, n: int, *, newlines: bool) -> int:
    """End of the white-space match starting at `pos` ("\\s*[\\r\\n]+" first if `newlines`,
    then "\\s+(?!\\S)", then "\\s+"); a lone non-matching char is consumed by itself."""
    count = 0
    last_newline_end = 0
    while f[pos + count] & SPACE:
        if newlines and text[pos + count] in "\r\n":
            last_newline_end = pos + count + 1
        count += 1
    if last_newline_end:
        return last_newline_end
    if count > 1 and pos + count < n:  # leave the last space to prefix the next word
        return pos + count - 1
    return pos + max(count, 1)


def pre_tokenize(text: str, kind: PreTokenizer) -> list[str]:
    """Split `text` into BPE words; "".join(result) == text."""
    out: list[str] = []
    if kind is PreTokenizer.GPT2:
        split_gpt2(text, out)
    elif kind is PreTokenizer.DIGITS_GPT2:
        for fragment in split_digits(text):
            split_gpt2(fragment, out)
    else:
        assert kind is PreTokenizer.LLAMA3, kind
        split_llama3(text, out)
    assert "".join(out) == text
    return out
