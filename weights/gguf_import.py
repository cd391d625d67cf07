"""Import a GGUF file (Gemma-3, Llama, Qwen2/2.5, Qwen3) as a plain Hugging Face model folder.

GGUF is llama.cpp's one-file format; everything else here reads Hugging Face folders, so a
GGUF is converted once into one (config.json, model.safetensors, tokenizer files) and built
from like any other. The conversion mirrors transformers' own GGUF loader, which the tests use
as the oracle, and llama.cpp's converter (convert_hf_to_gguf.py), whose steps it undoes:

- config.json comes from the `<arch>.*` metadata (sizes, RoPE base and scaling, sliding
  window, norm eps), tensor presence (tied head, q/k/v biases) and what llama.cpp hard-codes
  per family instead of storing (Gemma-3: every 6th layer global, local RoPE base 10000);
  Llama 3's RoPE scaling is stored only as a `rope_freqs` tensor of per-frequency divisors,
  from which the llama3 parameters are recovered (and checked to reproduce it);
- weights are dequantized with the `gguf` package and cast to `dtype`; Gemma norm weights are
  stored as 1 + w, so the 1 is taken off again; Llama's q/k rows are stored permuted for
  llama.cpp's interleaved RoPE, so the permutation is undone; names are mapped back;
- the tokenizer comes from `weights.gguf_tokenizer`.

A file is validated whole (architecture, tensor types, every part of a split file present,
no data past the end, a tokenizer) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from .config import parse_config
from .errors import WeightsError
from .folders import locked, remove_stale_partials, staged_folder
from .gguf_file import GGUFTensor, read_gguf_file
from .gguf_tokenizer import check_tokenizer, write_json, write_tokenizer
from .safetensors_file import DEFAULT_DTYPE, MODEL_DTYPES, MODEL_TAGS, write_header

Q = GGMLQuantizationType
# Tensor types we dequantize (with the gguf package): those of llama.cpp's common file types
# (Q4_K_M mixes Q4_K, Q5_0, Q6_K, ...), every one covered by the tests.
TENSOR_TYPES = (
    *(Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1),
    *(Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K),
)
# What llama.cpp assumes for every Gemma-3 file without storing it (src/llama-model.cpp).
SLIDING_WINDOW_PATTERN = 6
LOCAL_ROPE_BASE = 10_000.0
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a complete conversion

_TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_ATTENTION_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps back to its Hugging Face model."""

    model_type: str
    architecture: str
    block_tensors: dict[str, str]  # GGUF block tensor stem -> HF name inside `model.layers.N.`
    norm_offset: bool = False  # llama.cpp stores RMSNorm weights as 1 + w
    permute_qk: bool = False  # llama.cpp permutes q/k rows for its interleaved RoPE


_LLAMA_BLOCK = {**_ATTENTION_TENSORS, "ffn_norm": "post_attention_layernorm"}
FAMILIES = {
    "gemma3": Family(
        "gemma3_text",
        "Gemma3ForCausalLM",
        {
            **_ATTENTION_TENSORS,
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        norm_offset=True,
    ),
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK, permute_qk=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _LLAMA_BLOCK),
}
ARCHITECTURES = tuple(FAMILIES)  # `general.architecture` values we convert

# Bump when the conversion output changes, so cached folders are converted again.
CONVERTER_VERSION = 1

_SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


@dataclass
class GGUFFile:
    """A GGUF model, all parts of a split file together, validated by `open_gguf`."""

    path: Path  # the file named (the first part of a split file)
    parts: list[Path]
    meta: dict[str, Any]
    tensors: list[GGUFTensor] = field(repr=False)

    @property
    def arch(self) -> str:
        return self.meta["general.architecture"]

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]


def open_gguf(path: Path) -> GGUFFile:
    """Read and validate a GGUF file (and the other parts of a split one).

    Every way the file can be unusable fails here, with one sentence naming the fix: not a
    (complete) GGUF file, a part missing, an unsupported architecture or tensor type, no
    tokenizer, metadata missing or tensors not matching it."""
    path = Path(path)
    meta, tensors = read_gguf_file(path)
    count = int(meta.get("split.count", 1))
    parts = [path]
    if count > 1:
        if int(meta.get("split.no", 0)) != 0:
            raise WeightsError(
                f"{path} is part {int(meta['split.no']) + 1} of a {count}-part GGUF file; "
                "pass its first part (…-00001-of-…gguf)."
            )
        parts = named_parts(path)
        if len(parts) != count:
            raise WeightsError(
                f"{path} is the first of {count} parts, but is not named like one "
                f"(<name>-00001-of-{count:05d}.gguf), so its other parts cannot be found; keep "
                "llama.cpp's part names."
            )
        for no, part in enumerate(parts[1:], 2):
            if not part.is_file():
                raise WeightsError(
                    f"{path} is split into {count} parts, but part {no} ({part.name}) is "
                    f"missing from {path.parent}; download every part into the same folder."
                )
            tensors += read_gguf_file(part)[1]
    arch = meta.get("general.architecture")
    if arch is None:
        raise WeightsError(
            f"{path} has no general.architecture metadata, so it is not a model's GGUF file (a "
            "LoRA adapter or a vocabulary alone, say); pass the model's file."
        )
    if arch not in FAMILIES:
        raise WeightsError(
            f"{path} is a GGUF file of architecture {arch!r}, which is not supported; supported "
            f"architectures are {', '.join(ARCHITECTURES)} (Gemma-3, Llama 2/3.x, Qwen2/2.5, "
            "Qwen3)."
        )
    for t in tensors:
        if t.tensor_type not in TENSOR_TYPES:
            raise WeightsError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                f"supported; supported types are {', '.join(q.name for q in TENSOR_TYPES)} "
                "(re-quantize the model with llama-quantize to one of them)."
            )
    check_tokenizer(meta, path)
    gguf = GGUFFile(path, parts, meta, tensors)
    tensor_plan(gguf, hf_config(gguf, DEFAULT_DTYPE))  # the metadata a conversion reads, and shapes
    return gguf


def named_parts(path: Path) -> list[Path]:
    """The parts of a GGUF model as llama.cpp names them (`<name>-00001-of-0000N.gguf` and the
    rest), or `path` alone; found without reading the file, whose metadata must agree."""
    match = _SPLIT_NAME.fullmatch(path.name)
    if match is None or match["no"] != "00001":
        return [path]
    count = int(match["count"])
    return [
        path.with_name(f"{match['prefix']}-{no:05d}-of-{count:05d}.gguf")
        for no in range(1, count + 1)
    ]


def convert_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = DEFAULT_DTYPE, progress: bool = True
) -> Path:
    """Write `out_dir` as a Hugging Face folder holding the model of a GGUF file.

    Weights are stored as `dtype` (bfloat16, float16 or float32); `progress` shows a bar over
    the tensors. Returns `out_dir`. The folder is assembled under a hidden temporary name next
    to `out_dir` and renamed into place last, so an interrupted conversion leaves nothing that
    looks usable.
    """
    return write_model_dir(open_gguf(gguf_path), out_dir, dtype, progress)


def write_model_dir(
    gguf: GGUFFile, out_dir: Path, dtype: str = DEFAULT_DTYPE, progress: bool = True
) -> Path:
    """`convert_gguf` of a file already opened."""
    out_dir = Path(out_dir)
    if dtype not in MODEL_TAGS:
        raise ValueError(
            f"dtype {dtype!r} is not supported; choose one of {', '.join(MODEL_TAGS)}."
        )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another folder.")
    config = hf_config(gguf, dtype)
    with staged_folder(out_dir) as tmp:
        _write_weights(gguf, tmp / "model.safetensors", config, dtype, progress)
        tokenizer_class = "GemmaTokenizer" if gguf.arch == "gemma3" else "PreTrainedTokenizerFast"
        write_tokenizer(gguf.meta, gguf.arch, tokenizer_class, tmp)
        write_json(tmp / "config.json", config)
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        write_json(tmp / "generation_config.json", ids)
    return out_dir


def hf_config(gguf: GGUFFile, dtype: str) -> dict[str, Any]:
    """The config.json that the GGUF metadata (and tensor list) describes."""
    names = {t.name for t in gguf.tensors}
    if gguf.arch == "gemma3":
        return _gemma3_config(gguf, names, dtype)
    return _llama_config(gguf, names, dtype)


def _gemma3_config(gguf: GGUFFile, names: set[str], dtype: str) -> dict[str, Any]:
    meta, key = gguf.meta, partial(_arch_value, gguf)
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
        "tie_word_embeddings": "output.weight" not in names,
    }


def _llama_config(gguf: GGUFFile, names: set[str], dtype: str) -> dict[str, Any]:
    """Llama / Qwen2 / Qwen3: one RoPE for every layer, SiLU MLP, biases as the tensors say."""
    meta, family = gguf.meta, gguf.family
    key = partial(_arch_value, gguf)
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", key("rope.dimension_count", hidden // heads))
    theta = _f32(key("rope.freq_base", 10_000.0))
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "torch_dtype": dtype,
        "vocab_size": key("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(gguf, key, theta, head_dim),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if gguf.arch != "qwen2":  # Qwen2 always has q/k/v biases; the others say so by tensors
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    return config


def _rope_scaling(gguf: GGUFFile, key: Any, theta: float, head_dim: int) -> dict | None:
    """Linear scaling from the metadata, or llama3 scaling from the `rope_freqs` tensor."""
    freqs = next((t for t in gguf.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        factors = dequantize(freqs.data, freqs.tensor_type).astype(np.float64).ravel()
        return llama3_scaling(factors, theta, head_dim, gguf.path)
    scaling = key("rope.scaling.type", "none")
    if scaling == "none":
        return None
    if scaling != "linear":
        raise WeightsError(
            f"{gguf.path} asks for {scaling!r} RoPE scaling; only linear scaling and Llama 3's "
            "(rope_freqs) are built."
        )
    return {"rope_type": "linear", "factor": _f32(key("rope.scaling.factor"))}


def llama3_scaling(
    factors: np.ndarray, theta: float, head_dim: int, source: Path
) -> dict[str, Any] | None:
    """The llama3 `rope_scaling` whose per-frequency divisors are `factors`.

    llama.cpp stores Llama 3's scaling as those divisors alone: 1 for short wavelengths,
    `factor` for long ones, a blend between. Only the table matters to the model, so any
    parameters that reproduce it give the same network; Llama 3's own (low 1, high 4, original
    context 8192) are tried first, then the context each blended entry (or the boundary)
    implies. None reproducing the table is an error: the file's RoPE is not Llama 3's."""
    if np.all(factors == 1.0):
        return None
    factor = float(np.float32(factors.max()))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    blended = (factors > 1.0) & (factors < factor)
    smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
    candidates = [8192, *np.rint(wavelen[blended] * (1 + 3 * smooth)).astype(int)]
    if (factors == factor).any():
        candidates.append(math.floor(wavelen[factors == factor].min()))
    for context in candidates:
        params = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": int(context),
        }
        if np.allclose(_llama3_factors(params, wavelen), factors, rtol=1e-5, atol=0):
            return params
    raise WeightsError(
        f"{source}: its rope_freqs tensor is not a Llama 3 RoPE scaling table, which is the "
        "only per-frequency scaling supported."
    )


def _llama3_factors(params: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    """llama.cpp's divisors (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    smooth = (context / wavelen - lo) / (hi - lo)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / hi, 1.0, np.where(wavelen > context / lo, factor, blend))


_REQUIRED = object()


def _arch_value(gguf: GGUFFile, name: str, default: Any = _REQUIRED) -> Any:
    """The `<arch>.<name>` metadata value; required unless a default is given."""
    key = f"{gguf.arch}.{name}"
    if key in gguf.meta:
        return gguf.meta[key]
    if default is _REQUIRED:
        raise WeightsError(
            f"{gguf.path} has no {key!r} metadata, which a {gguf.arch} model needs; the file is "
            "incomplete or was written by an unsupported converter: convert the model again "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    return default


def _f32(value: float) -> float:
    """GGUF stores floats as float32: report the short decimal they were written from (1e-06)."""
    return float(str(np.float32(value)))


def hf_tensor_name(gguf_name: str, family: Family) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for
    `rope_freqs.weight`, which the config holds."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if stem == "rope_freqs":
        return None
    if len(parts) == 1 and stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in family.block_tensors:
        return f"model.layers.{parts[1]}.{family.block_tensors[parts[2]]}.{suffix}"
    raise WeightsError(
        f"GGUF tensor {gguf_name!r} has no counterpart in a {family.model_type} text model; "
        "the file is not a plain model of its architecture."
    )


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows of each head interleaved in pairs) for
    rows [heads · head_dim] (weights [out, in] or biases [out])."""
    half = weight.shape[0] // heads // 2
    w = weight.reshape(heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def tensor_plan(
    gguf: GGUFFile, config: dict[str, Any]
) -> list[tuple[str, tuple[int, ...], GGUFTensor]]:
    """(HF name, [out, in] shape, GGUF tensor) of every model tensor, checked against the
    shapes the config implies, none missing."""
    expected = parse_config(config).tensor_shapes()
    plan: list[tuple[str, tuple[int, ...], GGUFTensor]] = []
    for tensor in gguf.tensors:
        name = hf_tensor_name(tensor.name, gguf.family)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
        want = expected.pop(name.removeprefix("model."), None)
        if want != shape:
            raise WeightsError(
                f"{gguf.path}: tensor {tensor.name!r} has shape {shape}, but the file's metadata "
                f"makes {name} {want}; the file is damaged or not a plain {gguf.arch} model."
            )
        plan.append((name, shape, tensor))
    if expected:
        raise WeightsError(
            f"{gguf.path} lacks tensors a {gguf.arch} model needs ({', '.join(sorted(expected))}); "
            "the file is incomplete: download it again."
        )
    return plan


def load_tensor(tensor: GGUFTensor, shape: tuple[int, ...], gguf: GGUFFile) -> np.ndarray:
    """One tensor in float32 as the Hugging Face model holds it."""
    weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    family, meta = gguf.family, gguf.meta
    if family.norm_offset and tensor.name.endswith("norm.weight"):
        weight = weight - 1.0
    if family.permute_qk and re.search(r"\.attn_[qk]\.", tensor.name):
        heads = meta[f"{gguf.arch}.attention.head_count"]
        if ".attn_k." in tensor.name:
            heads = meta.get(f"{gguf.arch}.attention.head_count_kv", heads)
        weight = unpermute_qk(weight, heads)
    return weight


def _write_weights(
    gguf: GGUFFile, path: Path, config: dict[str, Any], dtype: str, progress: bool
) -> None:
    """Stream the tensors into one safetensors file, one tensor in memory at a time.

    Every shape is known from the GGUF header, so the safetensors header is written first and
    each tensor is dequantized, converted and appended after it.
    """
    plan = tensor_plan(gguf, config)
    with path.open("wb") as f:
        write_header(f, ((name, shape) for name, shape, _ in plan), MODEL_TAGS[dtype])
        for _, shape, tensor in tqdm(
            plan, desc="Converting GGUF tensors", unit="tensor", disable=not progress
        ):
            f.write(load_tensor(tensor, shape, gguf).astype(MODEL_DTYPES[dtype]).tobytes())


def find_gguf(path: Path) -> Path:
    """The GGUF file a path names: the file itself, or the one (first part) in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise WeightsError(f"{path} does not exist; check the path of the GGUF file.")
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    firsts = [p for p in files if not (m := _SPLIT_NAME.fullmatch(p.name)) or m["no"] == "00001"]
    if files and not firsts:  # only later parts of a split file
        first = _SPLIT_NAME.sub(r"\g<prefix>-00001-of-\g<count>.gguf", files[0].name)
        raise WeightsError(
            f"{path} holds parts of a split GGUF file but not its first part ({first}); "
            "download every part into that folder."
        )
    if len(firsts) != 1:
        listed = ", ".join(p.name for p in firsts) or "none"
        raise WeightsError(
            f"{path} holds {len(firsts)} GGUF models ({listed}); pass the path of the one to build."
        )
    return firsts[0]


def gguf_model_dir(path: Path, cache_dir: Path, progress: bool = True) -> Path:
    """The Hugging Face folder of a GGUF file (or of the folder holding one), converted into
    `cache_dir/gguf/` on first use and reused while the file (every part) is unchanged: then
    without reading it again."""
    source = find_gguf(path).resolve()
    target = converted_path(source, cache_dir)
    if is_complete(target):
        return target
    gguf = open_gguf(source)  # every input error before any work
    try:
        return converted(gguf, target, progress)
    except OSError as e:
        raise WeightsError(
            f"cannot convert {source} into {target.parent} ({e.strerror}); set TRT_NETDEF_CACHE "
            "to a writable folder with room for the model in bfloat16."
        ) from None


def converted_path(source: Path, cache_dir: Path) -> Path:
    """Where `gguf_model_dir` keeps the conversion of the GGUF file `source` as it is now:
    named by its path, size and mtime (every part's, a missing one left out), which a full
    hash of a multi-GB file would take seconds to confirm. Only a file that `open_gguf`
    validated is ever converted there."""
    stamp = [
        [str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in named_parts(source) if p.is_file()
    ]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    stem = _SPLIT_NAME.sub(r"\g<prefix>", source.name).removesuffix(".gguf")
    return Path(cache_dir) / "gguf" / f"{stem}-{key}-v{CONVERTER_VERSION}"


def converted(gguf: GGUFFile, target: Path, progress: bool) -> Path:
    """`target`, converted from `gguf` unless complete; one process converts at a time."""
    with locked(target, on_wait=lambda: waiting(target)):
        if not is_complete(target):  # else another process converted it meanwhile
            clean_partials(target)
            write_model_dir(gguf, target, progress=progress)
    return target


def clean_partials(target: Path) -> None:
    """Remove what interrupted runs left beside `target`, and say so."""
    remove_stale_partials(target, _say)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def waiting(target: Path) -> None:
    """Say that another process holds the lock of `target` (`folders.locked`'s on_wait)."""
    _say(f"Waiting for another process to finish {target}...")


def _say(message: str) -> None:
    print(message, file=sys.stderr)
