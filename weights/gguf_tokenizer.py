"""The tokenizer a GGUF file describes, rebuilt as transformers' GGUF loader rebuilds it.

A GGUF holds no tokenizer.json, only llama.cpp's vocabulary metadata (`tokenizer.ggml.*`):
the tokens, their types and scores, and merges for byte-level BPE. transformers turns that
into a `tokenizers` pipeline (integrations/gguf/gguf_tokenizer_mapping.py); this module builds
the same pipeline with the `tokenizers` library alone, so that a folder converted here
tokenizes exactly as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does:

- `llama` (sentencepiece) vocabularies become a byte-fallback BPE whose merges are rebuilt from
  the vocabulary: ranked by score (Llama 2), or by file position for Gemma, whose scores do not
  follow merge order;
- `gpt2` (byte-level BPE: Llama 3, Qwen2/2.5, Qwen3) keeps the file's merges and splits text
  with the regex `tokenizer.ggml.pre` names.

Control tokens become special added tokens, user-defined ones plain added tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from .errors import WeightsError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex the merges were learned with (llama.cpp's names).
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
TOKENIZER_MODELS = ("llama", "gpt2")  # what `tokenizer.ggml.model` may be

_SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def check_tokenizer(meta: dict[str, Any], source: Path) -> None:
    """Refuse, before any work, a file whose vocabulary we cannot rebuild."""
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta or model is None:
        raise WeightsError(
            f"{source} has no tokenizer (no tokenizer.ggml.tokens metadata), so text cannot be "
            "encoded for it; use a GGUF file that embeds its tokenizer (llama.cpp's "
            "convert_hf_to_gguf.py writes one)."
        )
    if model not in TOKENIZER_MODELS:
        raise WeightsError(
            f"{source} has a {model!r} tokenizer; only 'llama' (sentencepiece) and 'gpt2' "
            "(byte-level BPE) tokenizers are supported."
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre not in PRE_TOKENIZER_SPLITS:
        raise WeightsError(
            f"{source} names the pre-tokenizer {pre!r}, which is not supported; supported are "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}."
        )


def gguf_tokenizer(meta: dict[str, Any], arch: str) -> Tokenizer:
    """The tokenizer of a GGUF file's metadata (checked by `check_tokenizer`)."""
    if meta["tokenizer.ggml.model"] == "gpt2":
        tok = _byte_level(meta)
    elif arch == "gemma3":
        tok = _gemma(meta)
    else:
        tok = _sentencepiece(meta)
    _add_special_tokens(tok, meta)
    tok.post_processor = _template(meta)
    return tok


def _gemma(meta: dict[str, Any]) -> Tokenizer:
    """Gemma: spaces become "▁" (normalizer) and split after each; merges ranked by position."""
    raw: list[str] = meta["tokenizer.ggml.tokens"]
    # Runs of spaces are stored as real spaces, but text reaches the model as "▁"s.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {token: i for i, token in enumerate(tokens)}
    # transformers' `generate_merges` order: merged token by file position, longer left piece first.
    merges = [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    ids = special_ids(meta)
    unk = raw[ids["unk_token"]] if "unk_token" in ids else "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def _sentencepiece(meta: dict[str, Any]) -> Tokenizer:
    """Llama 2: a "▁"-prefixed byte-fallback BPE, merges ranked by the tokens' scores."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab, _merges_by_score(meta, vocab), fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tok


def _merges_by_score(meta: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' `generate_merges`: each token's splits into two vocabulary pieces, best
    score first (ties: longer left piece, then longer right piece, then file order)."""
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]))
    merges = []
    for token, score in scores.items():
        local = [
            (token[:cut], token[cut:], score)
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(meta: dict[str, Any]) -> Tokenizer:
    """Llama 3 / Qwen: byte-level BPE with the file's merges, split by the named regex."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(
        BPE(
            vocab,
            merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS[meta.get("tokenizer.ggml.pre", "default")]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """Control tokens (<bos>, <|im_start|>, ...) are special; user-defined ones ("\\n\\n",
    "<think>", ...) are matched whole in text, as llama.cpp does. In a byte-level vocabulary a
    control token spelled outside the byte alphabet is a llama.cpp mislabel and is skipped."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if meta["tokenizer.ggml.model"] == "gpt2" else None
    vocab = tok.get_vocab()
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == TokenType.CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types)
            if k == TokenType.USER_DEFINED and t in vocab
        ]
    )


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """`{"bos_token": 2, ...}` for the special tokens the file names."""
    return {name: meta[key] for name, key in _SPECIAL_ID_KEYS.items() if key in meta}


def _adds(meta: dict[str, Any]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS; llama.cpp adds BOS to sentencepiece text unless told not to."""
    sentencepiece = meta["tokenizer.ggml.model"] == "llama"
    return (
        bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)),
        bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def _template(meta: dict[str, Any]) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, spelled as transformers' `update_post_processor` does."""
    tokens, ids = meta["tokenizer.ggml.tokens"], special_ids(meta)
    add_bos, add_eos = _adds(meta)
    before = [ids["bos_token"]] if add_bos and "bos_token" in ids else []
    after = [ids["eos_token"]] if add_eos and "eos_token" in ids else []

    def around(seq: str, type_id: int) -> str:
        parts = [tokens[i] for i in before] + [seq] + [tokens[i] for i in after]
        return " ".join(f"{part}:{type_id}" for part in parts)

    return processors.TemplateProcessing(
        single=around("$A", 0),
        pair=f"{around('$A', 0)} {around('$B', 1)}",
        special_tokens=[(tokens[i], i) for i in before + after],
    )


def write_tokenizer(meta: dict[str, Any], arch: str, tokenizer_class: str, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    gguf_tokenizer(meta, arch).save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[i] for name, i in special_ids(meta).items()}
    add_bos, add_eos = _adds(meta)
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
