"""Import a Gemma-3 GGUF file as a plain Hugging Face model folder.

GGUF (llama.cpp's one-file format) is how the bundled default model ships, while everything
else here reads Hugging Face folders. The conversion mirrors transformers' own GGUF loader,
which the tests use as the oracle:

- config.json comes from the `gemma3.*` metadata; what llama.cpp hard-codes for Gemma-3
  instead of storing (every 6th layer global, local RoPE base 10000) is filled in the same way;
- weights are dequantized and cast to `dtype`; llama.cpp stores norm weights as 1 + w, so the
  1 is taken off again, and tensor names are mapped back to Hugging Face's;
- tokenizer.json is the byte-fallback BPE that transformers rebuilds from the vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGUFReader, ReaderTensor, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tqdm.auto import tqdm

from .config import parse_config
from .folders import partial_path

ARCH = "gemma3"
# Output dtype -> (numpy dtype, safetensors tag).
DTYPES: dict[str, tuple[Any, str]] = {
    "bfloat16": (ml_dtypes.bfloat16, "BF16"),
    "float16": (np.float16, "F16"),
    "float32": (np.float32, "F32"),
}
# What llama.cpp assumes for every Gemma-3 file without storing it (src/llama-model.cpp).
SLIDING_WINDOW_PATTERN = 6
LOCAL_ROPE_BASE = 10_000.0

_TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Bump when the conversion output changes, so cached folders are converted again.
CONVERTER_VERSION = 1


def convert_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "bfloat16", progress: bool = True
) -> Path:
    """Write `out_dir` as a Hugging Face folder holding the model of a Gemma-3 GGUF file.

    Weights are stored as `dtype` (bfloat16, float16 or float32); `progress` shows a bar over
    the tensors. Returns `out_dir`. The folder is assembled under a hidden temporary name next
    to `out_dir` and renamed into place last, so an interrupted conversion leaves nothing that
    looks usable.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder.")
    if progress:  # GGUFReader maps and indexes the whole file first: seconds without a bar
        print(f"Reading {gguf_path}...", file=sys.stderr)
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(
            f"{gguf_path} is a GGUF file of architecture {arch!r}, but only Gemma-3 GGUF files "
            f"(architecture {ARCH!r}) are supported."
        )
    config = hf_config(meta, [t.name for t in reader.tensors], dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out_dir)
    tmp.mkdir()  # not mkdtemp: the folder should get the umask's permissions, not 0700
    try:
        _write_weights(reader, tmp / "model.safetensors", config, dtype, progress)
        _write_tokenizer(meta, tmp)
        _write_json(tmp / "config.json", config)
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(tmp / "generation_config.json", ids)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_config(meta: dict[str, Any], tensor_names: list[str], dtype: str) -> dict[str, Any]:
    """The `gemma3_text` config.json that the GGUF metadata describes."""
    key = partial(_arch_value, meta)
    n_layers = key("block_count")
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    softcap = key("final_logit_softcapping", None)
    scaling = key("rope.scaling.type", "none")
    # llama.cpp applies rope scaling to the global layers only, as transformers does.
    rope_scaling = (
        None
        if scaling == "none"
        else {"rope_type": scaling, "factor": _f32(key("rope.scaling.factor"))}
    )
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "torch_dtype": dtype,
        "vocab_size": key("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "rope_theta": _f32(key("rope.freq_base")),
        "rope_local_base_freq": _f32(key("rope.freq_base_swa", LOCAL_ROPE_BASE)),
        "rope_scaling": rope_scaling,
        "sliding_window": key("attention.sliding_window"),
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "layer_types": [
            "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
            for i in range(n_layers)
        ],
        # llama.cpp: Gemma-3 27B (62 layers) scales queries by hidden/heads, the others by head_dim.
        "query_pre_attn_scalar": hidden // heads if n_layers == 62 else head_dim,
        "final_logit_softcapping": None if softcap is None else _f32(softcap),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }


_REQUIRED = object()


def _arch_value(meta: dict[str, Any], name: str, default: Any = _REQUIRED) -> Any:
    """The `gemma3.<name>` metadata value; required unless a default is given."""
    if f"{ARCH}.{name}" in meta:
        return meta[f"{ARCH}.{name}"]
    if default is _REQUIRED:
        raise ValueError(
            f"The GGUF file has no '{ARCH}.{name}' metadata, which a Gemma-3 model needs."
        )
    return default


def _f32(value: float) -> float:
    """GGUF stores floats as float32: report the short decimal they were written from (1e-06)."""
    return float(str(np.float32(value)))


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a Gemma-3 text model.")


def _write_weights(
    reader: GGUFReader, path: Path, config: dict[str, Any], dtype: str, progress: bool
) -> None:
    """Stream the tensors into one safetensors file, one tensor in memory at a time.

    Every shape is known from the GGUF header, so the safetensors header is written first and
    each tensor is dequantized, converted and appended after it.
    """
    np_dtype, tag = DTYPES[dtype]
    expected = parse_config(config).tensor_shapes()
    plan: list[tuple[str, tuple[int, ...], ReaderTensor]] = []
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
        want = expected.pop(name.removeprefix("model."), None)
        if want != shape:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has shape {shape}, but the config read from the "
                f"file's metadata expects {want} for {name}."
            )
        plan.append((name, shape, tensor))
    if expected:
        raise ValueError(
            f"The GGUF file lacks tensors the model needs: {', '.join(sorted(expected))}."
        )

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, np.dtype(np_dtype).itemsize
    for name, shape, _ in plan:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shape, tensor in tqdm(
            plan, desc="Converting GGUF tensors", unit="tensor", disable=not progress
        ):
            weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            if tensor.name.endswith("norm.weight"):
                weight = weight - 1.0
            f.write(weight.astype(np_dtype).tobytes())


def gemma_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer transformers builds from a Gemma GGUF vocabulary, token for token.

    A byte-fallback BPE that turns spaces into "▁" and splits after each. The file stores no
    merges; they are rebuilt from the vocabulary, ranked by the position of the merged token in
    the file (Gemma's scores do not follow merge order).
    """
    if meta.get("tokenizer.ggml.model") != "llama":
        raise ValueError(
            f"The GGUF tokenizer model is {meta.get('tokenizer.ggml.model')!r}, "
            "but Gemma-3 files use 'llama' (sentencepiece)."
        )
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
    ids = _special_ids(meta)
    unk = raw[ids["unk_token"]] if "unk_token" in ids else "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control tokens (<bos>, <start_of_turn>, ...) are special; user-defined ones ("\n\n",
    # "<b>", ...) are matched whole in text, as llama.cpp does.
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(raw, types)
            if k == TokenType.CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(raw, types)
            if k == TokenType.USER_DEFINED and t in vocab
        ]
    )
    tok.post_processor = _template(meta, ids)
    return tok


_SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """`{"bos_token": 2, ...}` for the special tokens the file names."""
    return {name: meta[key] for name, key in _SPECIAL_ID_KEYS.items() if key in meta}


def _adds(meta: dict[str, Any]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS; llama.cpp adds BOS to sentencepiece text unless told not to."""
    return (
        bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def _template(meta: dict[str, Any], ids: dict[str, int]) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, spelled as transformers' `update_post_processor` does."""
    tokens = meta["tokenizer.ggml.tokens"]
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


def _write_tokenizer(meta: dict[str, Any], folder: Path) -> None:
    gemma_tokenizer(meta).save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[i] for name, i in _special_ids(meta).items()}
    add_bos, add_eos = _adds(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
