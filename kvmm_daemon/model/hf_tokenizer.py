"""Build a Tokenizer from a Hugging Face tokenizer.json (+ tokenizer_config.json).

The result is the tokenizer llama.cpp would have after convert_hf_to_gguf.py turned the
same directory into a GGUF: BPE vocab and merges as they are, added tokens typed CONTROL
(special, or "<|...|>"-looking) or USER_DEFINED, ids without a token padded as UNUSED
"[PAD{id}]", and the pre-tokenizer family recognised from the pre_tokenizer structure
(llama.cpp identifies it by hashing a test tokenization; without `tokenizers` installed the
structure is what we can read). BOS/EOS come from tokenizer_config.json, then config.json;
add_bos from tokenizer_config.json, then the post-processor template, then the family's
default.

Left out: non-BPE models (Unigram, WordPiece), normalizers (llama.cpp ignores them too),
pre-tokenizer layouts other than the three listed in _detect_pre.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, Tokenizer


def read_json(path: Path) -> Any:
    """Parse a JSON file; ModelLoadError naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc}); fix or re-download "
                             "the model directory") from None


def _detect_pre(pre: Any, origin: str) -> str:
    """The llama.cpp pre-tokenizer name equivalent to a tokenizer.json pre_tokenizer."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and \
        pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if "\\p{N}{1,3}" in pattern and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            return "llama-bpe"
    raise ModelLoadError(
        f"{origin}: pre_tokenizer {kinds} is not supported; kvmm understands ByteLevel "
        "(GPT-2), Digits+ByteLevel (SmolLM/StarCoder) and Split+ByteLevel (Llama 3)")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(directory: Path, config: dict[str, Any], vocab_size: int) -> Tokenizer:
    """The Tokenizer of a Hugging Face model directory (tokenizer.json is required)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json; kvmm needs the fast "
                             "tokenizer file of the model (byte-level BPE)")
    tj = read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelLoadError(f"{path}: tokenizer model {model.get('type')!r} is not "
                             "supported; kvmm reads byte-level BPE tokenizers")
    pre = _detect_pre(tj.get("pre_tokenizer"), str(path))
    cfg_path = directory / "tokenizer_config.json"
    tcfg = read_json(cfg_path) if cfg_path.is_file() else {}

    ids: dict[str, int] = dict(model["vocab"])
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict)]
    size = max([vocab_size, *(i + 1 for i in ids.values()), *(a["id"] + 1 for a in added)])
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in ids.items():
        tokens[i], types[i] = text, NORMAL
    for a in added:
        text = a["content"]
        looks_special = text.startswith("<|") and text.endswith("|>")
        tokens[a["id"]] = text
        types[a["id"]] = CONTROL if a.get("special") or looks_special else USER_DEFINED
        ids.setdefault(text, a["id"])

    def special_id(key: str) -> int | None:
        text = _token_text(tcfg.get(key))
        if text is not None and text in ids:
            return ids[text]
        value = config.get(f"{key}_id")
        if isinstance(value, list):  # e.g. Llama 3.1 lists several eos ids
            value = value[0] if value else None
        return value if isinstance(value, int) and 0 <= value < size else None

    bos, eos = special_id("bos_token"), special_id("eos_token")
    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = None
        post = tj.get("post_processor") or {}
        single = post.get("single") if post.get("type") == "TemplateProcessing" else None
        if single and bos is not None:
            first = single[0].get("SpecialToken", {}).get("id") if isinstance(
                single[0], dict) else None
            add_bos = first == tokens[bos]
    return Tokenizer(tokens, types, model.get("merges") or [], pre=pre, bos_token_id=bos,
                     eos_token_id=eos, add_bos=add_bos, source=str(path))


def load_hf_chat_template(directory: Path) -> str | None:
    """Template source from tokenizer_config.json (str, or the "default" of a list) or
    chat_template.jinja; None when the model has none."""
    cfg_path = directory / "tokenizer_config.json"
    template = read_json(cfg_path).get("chat_template") if cfg_path.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = directory / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None
