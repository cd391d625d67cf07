"""--make-random: a checkpoint with a real model's shapes and random bfloat16 weights."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from tools.bench import BenchError
from weights.folders import locked, remove_stale_partials, staged_folder
from weights.safetensors_file import write_header

RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-3-1b-it's config.json (its generation-only "cache_implementation" left out).
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "initializer_range": 0.02,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 262144,
    },
    # google/gemma-3-270m's config.json (where it differs from gemma-3-1b-it's), with its
    # layer pattern as sliding_window_pattern.
    "gemma-3-270m": {
        "eos_token_id": 1,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
    },
    # google/gemma-3-4b-it's text_config (where it differs from gemma-3-1b-it's).
    "gemma-3-4b": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "max_position_embeddings": 131072,
        "num_attention_heads": 8,
        "num_hidden_layers": 34,
        "num_key_value_heads": 4,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
        "vocab_size": 262208,
    },
    # meta-llama/Llama-3.2-1B's config.json.
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
}
RANDOM_PRESETS["gemma-3-270m"] = {**RANDOM_PRESETS["gemma-3-1b"], **RANDOM_PRESETS["gemma-3-270m"]}
RANDOM_PRESETS["gemma-3-4b"] = {**RANDOM_PRESETS["gemma-3-1b"], **RANDOM_PRESETS["gemma-3-4b"]}
SHAPE_OVERRIDES = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


def random_config(preset: str, **overrides: int | None) -> dict[str, Any]:
    """The preset's config.json, with shape overrides (None: keep the preset's value)."""
    if preset not in RANDOM_PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}.")
    config = dict(RANDOM_PRESETS[preset])
    for key, value in overrides.items():
        if value is not None:
            config[SHAPE_OVERRIDES[key]] = value
    return config


def check_out(out: Path) -> None:
    """Raise BenchError unless `out` is absent or an empty folder: what a user keeps there (a
    real model, say) is never overwritten."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BenchError(
            f"{out} exists and is not a folder; choose another --out (nothing was changed)."
        )
    if out.exists() and (names := sorted(p.name for p in out.iterdir())):
        held = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise BenchError(
            f"{out} is not empty (it holds {held}); nothing was written: choose another --out, "
            "or empty that folder yourself."
        )


def write_random_checkpoint(
    out: Path, config: dict[str, Any], seed: int = 0, std: float = 0.02
) -> Path:
    """config.json plus one model.safetensors of random bfloat16 weights, written tensor by
    tensor in chunks (memory stays around 100 MB whatever the model size). Matrices are
    uniform with standard deviation `std`; norm scales are the identity.

    `out` must be absent or empty. The folder is written beside it under a hidden partial name
    and renamed into place last, so a failure or an interrupt leaves nothing at `out`."""
    from weights.config import parse_config

    out = Path(out)
    check_out(out)
    parsed = parse_config(config)
    shapes = {f"model.{name}": shape for name, shape in parsed.tensor_shapes().items()}
    rng = np.random.default_rng(seed)
    half_width = np.float32(std * math.sqrt(3.0))
    norm_scale = ml_dtypes.bfloat16(1.0 - parsed.norm_offset)
    chunk = 1 << 23
    try:
        with locked(out):  # one writer of `out` at a time: any partial of it is a dead one's
            remove_stale_partials(out, lambda line: print(line, file=sys.stderr))
            with staged_folder(out) as tmp:
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                with open(tmp / "model.safetensors", "wb") as f:
                    write_header(f, ((name, shapes[name]) for name in sorted(shapes)), "BF16")
                    for name in sorted(shapes):
                        total = math.prod(shapes[name])
                        if name.endswith("norm.weight"):
                            f.write(np.full(total, norm_scale, ml_dtypes.bfloat16).tobytes())
                            continue
                        for start in range(0, total, chunk):
                            n = min(chunk, total - start)
                            values = rng.random(n, dtype=np.float32)
                            values *= 2 * half_width
                            values -= half_width
                            f.write(values.astype(ml_dtypes.bfloat16).tobytes())  # nearest even
                check_out(out)  # again: something may have been put there while this wrote
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        raise BenchError(f"could not write {out}: {reason} (nothing was left there).") from e
    return out
