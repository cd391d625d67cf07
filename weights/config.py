"""The normalized model description that netdef builds from.

Hugging Face configs differ per family and per transformers version (Hub-style
`rope_theta`/`rope_scaling`/`sliding_window_pattern` versus transformers 5's
`rope_parameters`/`layer_types`). They are read here, once, into `ModelConfig`,
in which every choice the network depends on is an explicit field. Nothing
downstream looks at the raw config again.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .safetensors_file import MODEL_DTYPES

Activation = Literal["gelu_tanh", "silu"]
RopeScaling = Literal["none", "linear", "llama3"]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer: base frequency and scaling."""

    theta: float
    scaling: RopeScaling = "none"
    factor: float = 1.0
    # llama3 scaling only.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 0


@dataclass(frozen=True)
class LayerConfig:
    """What differs between decoder layers: the attention window and its RoPE."""

    sliding_window: (
        int | None
    )  # None: global attention; W: key j visible to query i iff i - W < j <= i
    rope: RopeConfig


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder network needs, with the family's choices spelled out."""

    family: str  # gemma3 | llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerConfig, ...]
    rms_norm_eps: float
    max_position_embeddings: int
    attention_scale: float  # multiplies q before attention (TensorRT applies no scale itself)
    norm_offset: float  # RMSNorm multiplies by (offset + w): 1 for Gemma, 0 elsewhere
    norm_weight_in_float32: (
        bool  # Gemma scales in float32; Llama/Qwen cast to the model dtype first
    )
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Gemma-3, Qwen3)
    qkv_bias: bool
    o_bias: bool
    sandwich_norms: bool  # Gemma: extra norms after attention and around the MLP
    activation: Activation
    embedding_scale: float | None  # Gemma multiplies embeddings by sqrt(hidden) in the model dtype
    tie_word_embeddings: bool
    final_logit_softcap: float | None
    checkpoint_dtype: str  # bfloat16 | float16 | float32, as the checkpoint stores it
    float16_overflows: bool = False  # Gemma-3's activations exceed float16's range

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor names (HF names without the `model.` prefix) and their shapes."""
        d, f = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (self.vocab_size, d),
            "norm.weight": (d,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            norms = ["input_layernorm", "post_attention_layernorm"]
            if self.sandwich_norms:
                norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            for name in norms:
                shapes[p + name + ".weight"] = (d,)
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (self.q_size, d)
            shapes[a + "k_proj.weight"] = (self.kv_size, d)
            shapes[a + "v_proj.weight"] = (self.kv_size, d)
            shapes[a + "o_proj.weight"] = (d, self.q_size)
            if self.qkv_bias:
                shapes[a + "q_proj.bias"] = (self.q_size,)
                shapes[a + "k_proj.bias"] = (self.kv_size,)
                shapes[a + "v_proj.bias"] = (self.kv_size,)
            if self.o_bias:
                shapes[a + "o_proj.bias"] = (d,)
            if self.qk_norm:
                shapes[a + "q_norm.weight"] = (self.head_dim,)
                shapes[a + "k_norm.weight"] = (self.head_dim,)
            m = p + "mlp."
            shapes[m + "gate_proj.weight"] = (f, d)
            shapes[m + "up_proj.weight"] = (f, d)
            shapes[m + "down_proj.weight"] = (d, f)
        return shapes

    def summary(self) -> str:
        windows = sorted({w for w in (layer.sliding_window for layer in self.layers) if w})
        n_local = sum(1 for layer in self.layers if layer.sliding_window)
        attn = (
            f"{n_local} sliding (window {windows}) + {self.num_layers - n_local} global"
            if n_local
            else "all global"
        )
        return (
            f"{self.family}: {self.num_layers} layers ({attn}), hidden {self.hidden_size}, "
            f"mlp {self.intermediate_size} ({self.activation}), heads {self.num_heads}/{self.num_kv_heads} kv "
            f"x {self.head_dim}, vocab {self.vocab_size}, {self.checkpoint_dtype}"
        )


SUPPORTED_MODEL_TYPES = ("gemma3", "gemma3_text", "llama", "qwen2", "qwen3")


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and normalize `config.json` from a model folder."""
    folder = Path(model_dir)
    path = folder / "config.json"
    if not path.is_file():
        problem = f"{folder} is a file" if folder.is_file() else f"{path} does not exist"
        raise ConfigError(
            f"{problem}: point to a Hugging Face model folder that holds config.json (or "
            "download the model, or convert a .gguf file, with `python -m tools.build MODEL`, "
            "or in Python with weights.resolve_model(MODEL))."
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download the model.") from e
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; "
            "re-download the model."
        )
    try:
        return parse_config(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a field of the wrong kind
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"{path} has a field of the wrong type or shape ({type(e).__name__}: {e}); "
            "re-download the model."
        ) from None


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Normalize a Hugging Face config dict (either style) into a `ModelConfig`."""
    model_type = raw.get("model_type")
    if model_type == "gemma3":  # multimodal checkpoint: only its text decoder is ours
        text = dict(raw.get("text_config") or {})
        text.setdefault("model_type", "gemma3_text")
        for key in ("torch_dtype", "dtype"):
            if key not in text and key in raw:
                text[key] = raw[key]
        return parse_config(text)
    parse = _PARSERS.get(model_type)
    if parse is None:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return parse(raw)


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ConfigError(
            f"config.json has no {key!r}, which a {raw.get('model_type')} model needs; re-download the model."
        )
    return raw[key]


def is_int(value: object) -> bool:
    """An integer (NumPy's too), not a bool: True as a length or 1.5 tokens are mistakes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _count(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """A size field (heads, layers, widths): required unless `default`, a positive integer."""
    value = raw.get(key) or default if default is not None else _require(raw, key)
    if not is_int(value) or value <= 0:
        raise _reject(key, value, "it must be a positive integer")
    return value


def _reject(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config field {field}={value!r} is not supported: {why}.")


def _rope(params: dict[str, Any], field: str) -> RopeConfig:
    """One rope parameter dict (`rope_type`/`type`, `rope_theta`, scaling keys) -> RopeConfig."""
    kind = params.get("rope_type", params.get("type")) or "default"
    theta = float(params["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _reject(
            f"{field}.partial_rotary_factor",
            params["partial_rotary_factor"],
            "only full-head RoPE is built",
        )
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, "linear", float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta,
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise _reject(
        f"{field}.rope_type", kind, "the network builds default, linear and llama3 RoPE only"
    )


def _single_rope(raw: dict[str, Any]) -> RopeConfig:
    """Llama/Qwen: one RoPE for all layers, from either config style."""
    if raw.get("rope_parameters"):
        params = dict(raw["rope_parameters"])
        field = "rope_parameters"
    else:
        params = dict(raw.get("rope_scaling") or {})
        field = "rope_scaling"
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in raw:
        params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    if params.get("rope_type", params.get("type")) == "llama3":
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return _rope(params, field)


def _common(raw: dict[str, Any], family: str, tie_default: bool) -> dict[str, Any]:
    """Fields every family reads the same way; `tie_default` is the family's class default,
    which `save_pretrained` leaves out of config.json."""
    heads = _count(raw, "num_attention_heads")
    kv_heads = _count(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise _reject(
            "num_key_value_heads", kv_heads, f"it must divide num_attention_heads={heads}"
        )
    hidden = _count(raw, "hidden_size")
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    if dtype not in MODEL_DTYPES:
        raise _reject("torch_dtype", dtype, "checkpoints must be bfloat16, float16 or float32")
    return dict(
        family=family,
        vocab_size=_count(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_count(raw, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_count(raw, "head_dim", hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_count(raw, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", tie_default)),
        checkpoint_dtype=dtype,
    )


def _activation(raw: dict[str, Any], key: str) -> Activation:
    act = raw.get(key)
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    if act == "silu":
        return "silu"
    raise _reject(key, act, "the MLP supports gelu_pytorch_tanh and silu")


def _layer_windows(raw: dict[str, Any], pattern_default: int | None) -> list[int | None]:
    """Per-layer sliding window from `layer_types`, or the older per-family conventions."""
    n = _count(raw, "num_hidden_layers")
    window = raw.get("sliding_window")
    types = raw.get("layer_types")
    if types is None:
        if pattern_default is not None:  # Gemma-3: every `pattern`-th layer is global
            pattern = int(raw.get("sliding_window_pattern") or pattern_default)
            types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
            ]
        elif raw.get("use_sliding_window") and window:  # Qwen: layers from max_window_layers on
            first = int(raw.get("max_window_layers", n))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        else:
            types = ["full_attention"] * n
    if len(types) != n:
        raise _reject("layer_types", types, f"it must list num_hidden_layers={n} entries")
    windows: list[int | None] = []
    for t in types:
        if t == "full_attention":
            windows.append(None)
        elif t == "sliding_attention":
            if not window:
                raise _reject(
                    "sliding_window", window, "sliding_attention layers need a positive window"
                )
            windows.append(int(window))
        else:
            raise _reject("layer_types", t, "layers must be full_attention or sliding_attention")
    return windows


def _gemma3(raw: dict[str, Any]) -> ModelConfig:
    for field in ("attn_logit_softcapping",):
        if raw.get(field) is not None:
            raise _reject(
                field, raw[field], "attention softcapping is not built (Gemma-3 does not use it)"
            )
    if raw.get("use_bidirectional_attention"):
        raise _reject("use_bidirectional_attention", True, "only causal decoders are built")
    if raw.get("rope_parameters"):
        by_type = raw["rope_parameters"]
        global_params = dict(by_type.get("full_attention") or {})
        local_params = dict(by_type.get("sliding_attention") or {})
        global_params.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
        local_params.setdefault("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    else:
        global_params = dict(raw.get("rope_scaling") or {})
        global_params["rope_theta"] = raw.get("rope_theta", 1_000_000.0)
        local_params = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    global_rope = _rope(global_params, "rope_parameters.full_attention")
    local_rope = _rope(local_params, "rope_parameters.sliding_attention")
    common = _common(raw, "gemma3", tie_default=True)
    windows = _layer_windows(raw, pattern_default=6)
    layers = tuple(LayerConfig(w, local_rope if w else global_rope) for w in windows)
    scalar = float(raw.get("query_pre_attn_scalar") or common["head_dim"])
    return ModelConfig(
        **common,
        layers=layers,
        attention_scale=scalar**-0.5,
        norm_offset=1.0,
        norm_weight_in_float32=True,
        float16_overflows=True,
        qk_norm=True,
        qkv_bias=bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        sandwich_norms=True,
        activation=_activation(raw, "hidden_activation"),
        embedding_scale=math.sqrt(common["hidden_size"]),
        final_logit_softcap=raw.get("final_logit_softcapping"),
    )


def _llama_like(
    raw: dict[str, Any], family: str, qkv_bias: bool, o_bias: bool, qk_norm: bool
) -> ModelConfig:
    if raw.get("mlp_bias"):
        raise _reject("mlp_bias", True, "MLP biases are not built")
    common = _common(raw, family, tie_default=False)
    rope = _single_rope(raw)
    windows = _layer_windows(raw, pattern_default=None)
    return ModelConfig(
        **common,
        layers=tuple(LayerConfig(w, rope) for w in windows),
        attention_scale=common["head_dim"] ** -0.5,
        norm_offset=0.0,
        norm_weight_in_float32=False,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sandwich_norms=False,
        activation=_activation(raw, "hidden_act"),
        embedding_scale=None,
        final_logit_softcap=None,
    )


def _llama(raw: dict[str, Any]) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return _llama_like(raw, "llama", qkv_bias=bias, o_bias=bias, qk_norm=False)


def _qwen2(raw: dict[str, Any]) -> ModelConfig:
    return _llama_like(raw, "qwen2", qkv_bias=True, o_bias=False, qk_norm=False)


def _qwen3(raw: dict[str, Any]) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return _llama_like(raw, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True)


_PARSERS = {"gemma3_text": _gemma3, "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3}
