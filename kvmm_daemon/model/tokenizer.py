"""Byte-level BPE tokenizer that reproduces llama.cpp's tokenization of a GGUF vocabulary.

`encode(text, parse_special)` returns what llama.cpp's `llama_tokenize(text,
add_special=True, parse_special)` returns on the same vocabulary:
  1. special-token partition (llama.cpp `tokenizer_st_partition`): control and user-defined
     tokens, longest text first, cut the text into fragments; control tokens only when
     parse_special, user-defined ones always;
  2. each text fragment is pre-tokenized (pretokenize.py) into words;
  3. each word's UTF-8 bytes are mapped to GPT-2's printable byte alphabet and merged by
     BPE: repeatedly the adjacent pair with the lowest merge rank, leftmost first
     (llama.cpp `llm_tokenizer_bpe_session`); results are cached per word;
  4. BOS is prepended when the vocabulary says add_bos.
Decoding maps tokens back to bytes (control tokens print as nothing unless asked for) and
decodes UTF-8 once at the end; `IncrementalDecoder` does the same for a stream of ids.

Prior art: GPT-2's encoder.py, llama.cpp llama-vocab.cpp. Left out: SentencePiece and
WordPiece vocabularies, llama.cpp's clean_spaces detokenizer pass (off for the supported
Llama/SmolLM vocabularies), lstrip/rstrip attributes of special tokens.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable, Sequence

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.pretokenize import PreTokenizer, pre_tokenize

# tokenizer.ggml.token_type values (llama.cpp llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre name -> (splitting rule, ignore_merges, default add_bos)
_PRE_TYPES: dict[str, tuple[PreTokenizer, bool, bool]] = {
    **{name: (PreTokenizer.GPT2, False, False)
       for name in ("gpt-2", "phi-2", "gigachat", "mpt", "olmo", "jais", "a.x-4.0", "mellum")},
    **{name: (PreTokenizer.DIGITS_GPT2, False, False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    **{name: (PreTokenizer.LLAMA3, True, True)
       for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    **{name: (PreTokenizer.LLAMA3, False, False) for name in ("dbrx", "smaug-bpe")},
}
SUPPORTED_PRE_TYPES = tuple(_PRE_TYPES)
WORD_CACHE_LIMIT = 200_000

# token texts llama.cpp treats as end of generation (llama-vocab.cpp, special_eog_ids)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<|fim_pad|>", "<fim-pad>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
    "<|file_sep|>"))


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100..."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_ENCODE_TABLE = {b: ch for b, ch in enumerate(_BYTE_TO_CHAR)}  # for str.translate on latin-1
_CHAR_TO_BYTE = {ch: b for b, ch in enumerate(_BYTE_TO_CHAR)}


class Tokenizer:
    """A byte-level BPE vocabulary with llama.cpp's encode/decode semantics.

    Attributes (fixed after construction):
      vocab_size: number of token ids; ids are 0 .. vocab_size-1.
      pre: the tokenizer.ggml.pre name; pre_tokenizer its splitting rule.
      bos_token_id / eos_token_id: None when the vocabulary has none.
      add_bos: encode() prepends bos_token_id (then bos_token_id is not None).
      eos_token_ids: every id that ends generation (eos plus llama.cpp's EOG texts).
    Invariants: _token_to_id[text] is the last id with that text; _ranks holds one rank
    per merge pair; _word_cache maps byte-encoded words to their ids, at most
    WORD_CACHE_LIMIT entries (cleared when full).
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int],
                 merges: Iterable[str | Sequence[str]], *, pre: str,
                 bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool | None = None, source: str = "tokenizer") -> None:
        if pre not in _PRE_TYPES:
            raise ModelLoadError(
                f"{source}: pre-tokenizer {pre!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_PRE_TYPES)}")
        if len(token_types) != len(tokens):
            raise ModelLoadError(f"{source}: {len(tokens)} tokens but {len(token_types)} "
                                 "token types; the tokenizer metadata is corrupt")
        self.pre = pre
        self.pre_tokenizer, self._ignore_merges, default_add_bos = _PRE_TYPES[pre]
        self.vocab_size = len(tokens)
        self._tokens = list(tokens)
        self._types = [int(t) for t in token_types]
        # a text listed twice maps to its last id, as in llama.cpp's token_to_id
        self._token_to_id = {text: i for i, text in enumerate(self._tokens)}
        for i, text in enumerate(self._tokens):
            if text in _EOG_TEXTS and self._types[i] != CONTROL:
                self._types[i] = CONTROL  # llama.cpp overrides "control-looking" tokens
        # a merge's halves are vocabulary texts: key on the vocabulary's own str objects, not
        # on fresh copies (~5 MiB less for a 49k vocabulary)
        ids, vocab = self._token_to_id, self._tokens
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if isinstance(merge, str):
                cut = merge.find(" ", 1)
                a, b = (merge[:cut], merge[cut + 1:]) if cut >= 0 else ("", "")
            else:
                a, b = merge[0], merge[1]
            ia, ib = ids.get(a), ids.get(b)
            self._ranks.setdefault((a if ia is None else vocab[ia], b if ib is None else vocab[ib]), rank)
        for name, tid in (("bos", bos_token_id), ("eos", eos_token_id)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ModelLoadError(f"{source}: {name} token id {tid} is outside the "
                                     f"vocabulary of {self.vocab_size} tokens")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        if self.add_bos and bos_token_id is None:
            raise ModelLoadError(f"{source}: add_bos_token is set but there is no BOS token")
        eog = {i for i, t in enumerate(self._tokens) if t in _EOG_TEXTS}
        if eos_token_id is not None:
            eog.add(eos_token_id)
        self.eos_token_ids = frozenset(eog)
        # special tokens cut the text before BPE; longest first, as llama.cpp sorts them
        specials = [i for i, t in enumerate(self._types)
                    if t in (CONTROL, USER_DEFINED, UNKNOWN) and self._tokens[i]]
        specials.sort(key=lambda i: -len(self._tokens[i].encode("utf-8")))
        self._specials = specials
        self._user_defined = [i for i in specials if self._types[i] == USER_DEFINED]
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._pieces: list[bytes | None] = [None] * self.vocab_size

    # -- vocabulary ---------------------------------------------------------------------
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary text of a token (byte-encoded for normal tokens)."""
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        """Id of the token whose vocabulary text is `text`, or None."""
        return self._token_to_id.get(text)

    def token_type(self, token_id: int) -> int:
        return self._types[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control/unknown tokens: they print as nothing in decode() by default."""
        return self._types[token_id] in (CONTROL, UNKNOWN)

    # -- encoding -----------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False, *,
               add_special: bool = True) -> list[int]:
        """Token ids of `text`, as llama.cpp's tokenize(text, add_special, parse_special)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, not {type(text).__name__}")
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_token_id)
        if not text:
            return out
        specials = self._specials if parse_special else self._user_defined
        for fragment in self._partition(text, specials):
            if isinstance(fragment, int):
                out.append(fragment)
            else:
                for word in pre_tokenize(fragment, self.pre_tokenizer):
                    out.extend(self._encode_word(word))
        return out

    def _partition(self, text: str, specials: list[int]) -> list[str | int]:
        """Cut `text` at occurrences of special tokens (ids) in `specials` order."""
        fragments: list[str | int] = [text]
        for tid in specials:
            needle = self._tokens[tid]
            nxt: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or needle not in frag:
                    nxt.append(frag)
                    continue
                parts = frag.split(needle)
                for k, part in enumerate(parts):
                    if k:
                        nxt.append(tid)
                    if part:
                        nxt.append(part)
            fragments = nxt
        return fragments

    def _encode_word(self, word: str) -> tuple[int, ...]:
        encoded = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(
            _ENCODE_TABLE)
        ids = self._word_cache.get(encoded)
        if ids is None:
            if len(self._word_cache) >= WORD_CACHE_LIMIT:
                self._word_cache.clear()
            ids = self._word_cache[encoded] = tuple(self._bpe(encoded))
        return ids

    def _bpe(self, word: str) -> list[int]:
        vocab = self._token_to_id
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        syms = list(word)  # one symbol per byte; merged symbols grow, absorbed ones empty
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ranks = self._ranks
        heap = []
        for i in range(n - 1):
            rank = ranks.get((syms[i], syms[i + 1]))
            if rank is not None:
                heap.append((rank, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue  # stale: one side was merged away or grew since it was queued
            syms[left] = merged
            syms[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            for a, b in ((prev[left], left), (left, after)):
                if a >= 0 and b >= 0:
                    rank = ranks.get((syms[a], syms[b]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, a, b, syms[a] + syms[b]))
        ids: list[int] = []
        for sym in syms:
            if not sym:
                continue
            tid = vocab.get(sym)
            if tid is not None:
                ids.append(tid)
            else:  # llama.cpp falls back to single-byte tokens and drops what has none
                for b in sym.encode("utf-8"):
                    tid = vocab.get(chr(b)) if b < 0x80 else None
                    if tid is not None:
                        ids.append(tid)
        return ids

    # -- decoding -----------------------------------------------------------------------
    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes a token prints as (llama.cpp token_to_piece)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"of {self.vocab_size} tokens")
        kind = self._types[token_id]
        if kind in (CONTROL, UNKNOWN):
            return self._tokens[token_id].encode("utf-8") if special else b""
        piece = self._pieces[token_id]
        if piece is None:
            text = self._tokens[token_id]
            if kind == NORMAL:
                piece = b"".join(bytes((_CHAR_TO_BYTE[ch],)) if ch in _CHAR_TO_BYTE
                                 else ch.encode("utf-8") for ch in text)
            elif kind == USER_DEFINED:
                piece = text.encode("utf-8")
            else:  # unused/byte tokens print as nothing in a byte-level vocabulary
                piece = b""
            self._pieces[token_id] = piece
        return piece

    def decode(self, ids: Iterable[int], *, special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        data = b"".join(self.token_bytes(int(i), special=special) for i in ids)
        return data.decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streaming detokenizer: feed token ids, get the text that is complete UTF-8 so far.

    Attributes: tokenizer, special (print control tokens). Invariant: the concatenation of
    every feed() result and the final finish() equals tokenizer.decode(all ids fed).
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Text delta for the new ids; an incomplete trailing UTF-8 char is held back."""
        if isinstance(ids, int):
            ids = (ids,)
        data = b"".join(self.tokenizer.token_bytes(int(i), special=self.special)
                        for i in ids)
        return self._utf8.decode(data)

    def finish(self) -> str:
        """Flush held-back bytes (an unfinished char becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
