"""weights.config: every tiny checkpoint normalizes to what transformers itself builds from it.

The oracle is the instantiated HF model (its modules, buffers and config objects), never numbers
typed into the test; RoPE frequencies are recomputed from `RopeConfig` by an independent formula.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests.fixtures.tiny import TINY_MODELS, decoder_of, tiny_model_dir
from weights import ConfigError, ModelConfig, RopeConfig, load_config, parse_config


def raw_config(name: str) -> dict:
    return json.loads((tiny_model_dir(name) / "config.json").read_text())


def reference_inv_freq(rope: RopeConfig, head_dim: int) -> list[float]:
    """RoPE inverse frequencies written out per frequency (float64), from the RoPE and
    Llama-3.1 papers' descriptions rather than from any implementation's code."""
    out = []
    for i in range(0, head_dim, 2):
        f = rope.theta ** (-i / head_dim)
        if rope.scaling == "linear":
            f /= rope.factor
        elif rope.scaling == "llama3":
            wavelen = 2 * math.pi / f
            if wavelen > rope.original_max_positions / rope.low_freq_factor:
                f /= rope.factor  # long wavelengths: interpolated
            elif wavelen >= rope.original_max_positions / rope.high_freq_factor:
                s = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
                    rope.high_freq_factor - rope.low_freq_factor
                )
                f = (1 - s) * f / rope.factor + s * f  # the band between: blended
        out.append(f)
    return out


def hf_rope(rotary: torch.nn.Module, layer_type: str) -> tuple[torch.Tensor, float]:
    """HF's inverse frequencies and attention scaling for one layer: shared, or per layer type
    (transformers 5's Gemma-3 keeps `full_attention_inv_freq` and `sliding_attention_inv_freq`)."""
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq, rotary.attention_scaling
    return (
        getattr(rotary, f"{layer_type}_inv_freq"),
        getattr(rotary, f"{layer_type}_attention_scaling"),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """RMSNorm as ModelConfig describes it: eps, (offset + w), and where the cast happens."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    if cfg.norm_weight_in_float32:
        return (h * (cfg.norm_offset + weight.float())).to(x.dtype)
    return (cfg.norm_offset + weight) * h.to(x.dtype)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_config_matches_the_instantiated_model(name, hf_model):
    cfg = load_config(tiny_model_dir(name))
    model = hf_model(tiny_model_dir(name), torch.float32)
    hf_cfg = model.config.get_text_config()
    decoder = decoder_of(model)
    assert cfg.family == hf_cfg.model_type.removesuffix("_text")
    assert cfg.num_layers == len(decoder.layers) == hf_cfg.num_hidden_layers
    assert (cfg.vocab_size, cfg.hidden_size) == tuple(decoder.embed_tokens.weight.shape)
    assert cfg.max_position_embeddings == hf_cfg.max_position_embeddings
    assert cfg.final_logit_softcap == getattr(hf_cfg, "final_logit_softcapping", None)
    stored = AutoConfig.from_pretrained(tiny_model_dir(name))  # what dtype="auto" loads
    assert cfg.checkpoint_dtype == str(stored.dtype).removeprefix("torch.")
    layer_types = getattr(hf_cfg, "layer_types", None) or ["full_attention"] * cfg.num_layers
    for i, layer in enumerate(decoder.layers):
        attn, ours = layer.self_attn, cfg.layers[i]
        assert attn.scaling == pytest.approx(cfg.attention_scale, rel=1e-12)
        assert attn.head_dim == cfg.head_dim
        assert attn.num_key_value_groups == cfg.num_heads // cfg.num_kv_heads
        assert attn.q_proj.out_features == cfg.q_size
        assert attn.k_proj.out_features == attn.v_proj.out_features == cfg.kv_size
        assert layer.mlp.gate_proj.out_features == cfg.intermediate_size
        assert (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None) == cfg.qkv_bias
        assert (attn.o_proj.bias is not None) == cfg.o_bias
        assert hasattr(attn, "q_norm") == hasattr(attn, "k_norm") == cfg.qk_norm
        assert hasattr(layer, "pre_feedforward_layernorm") == cfg.sandwich_norms
        assert hasattr(layer, "post_feedforward_layernorm") == cfg.sandwich_norms
        assert getattr(attn, "sliding_window", None) == ours.sliding_window
        assert (layer_types[i] == "sliding_attention") == (ours.sliding_window is not None)
    x = torch.linspace(-6, 6, 101)
    expected = {
        "gelu_tanh": torch.nn.functional.gelu(x, approximate="tanh"),
        "silu": x * x.sigmoid(),
    }
    torch.testing.assert_close(decoder.layers[0].mlp.act_fn(x), expected[cfg.activation])
    assert (model.lm_head.weight is decoder.embed_tokens.weight) == cfg.tie_word_embeddings


@pytest.mark.parametrize("name", TINY_MODELS)
def test_embedding_scale_and_norms_behave_as_in_transformers(name, hf_model):
    """Checked in bf16, where the place of the cast in RMSNorm changes the result."""
    cfg = load_config(tiny_model_dir(name))
    decoder = decoder_of(hf_model(tiny_model_dir(name), torch.bfloat16))
    scale = getattr(decoder.embed_tokens, "embed_scale", None)
    if cfg.embedding_scale is None:
        assert scale is None
    else:  # applied in the model dtype
        assert scale.dtype == torch.bfloat16
        assert scale.item() == torch.tensor(cfg.embedding_scale, dtype=torch.bfloat16).item()
    layer = decoder.layers[1]
    norms = [decoder.norm, layer.input_layernorm, layer.post_attention_layernorm]
    if cfg.qk_norm:
        norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            x = (torch.randn(8, norm.weight.shape[0], generator=generator) * 3).to(torch.bfloat16)
            assert torch.equal(norm(x), rms_norm(x, norm.weight, cfg))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_rope_frequencies_match_transformers(name, hf_model):
    cfg = load_config(tiny_model_dir(name))
    model = hf_model(tiny_model_dir(name), torch.float32)
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    rotary = decoder_of(model).rotary_emb
    for i, layer in enumerate(cfg.layers):
        theirs, attention_scaling = hf_rope(rotary, layer_types[i] if layer_types else "")
        assert attention_scaling == 1.0  # ModelConfig has no such factor: none of ours uses one
        np.testing.assert_allclose(
            reference_inv_freq(layer.rope, cfg.head_dim), theirs.numpy(), rtol=1e-6
        )


def test_llama3_rope_in_all_three_bands():
    """Llama-3.1's own RoPE settings, where short, blended and long wavelengths all occur
    (the tiny llama's head_dim of 16 skips the blended band)."""
    hf_config = LlamaConfig(
        vocab_size=16,
        hidden_size=4096,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = parse_config(hf_config.to_dict())
    rope = cfg.layers[0].rope
    ours = reference_inv_freq(rope, cfg.head_dim)
    wavelens = [2 * math.pi / f for f in reference_inv_freq(RopeConfig(rope.theta), cfg.head_dim)]
    short, long = rope.original_max_positions / rope.high_freq_factor, rope.original_max_positions
    assert any(w < short for w in wavelens) and any(w > long for w in wavelens)
    assert any(short <= w <= long for w in wavelens)
    theirs = LlamaRotaryEmbedding(hf_config).inv_freq
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def test_gemma_config_styles_normalize_alike():
    """Hub-style (`rope_theta`, `rope_scaling`, `sliding_window_pattern`) and transformers 5
    (`rope_parameters`, `layer_types`) configs of one model, and its multimodal wrapper."""
    gemma3 = load_config(tiny_model_dir("gemma3"))
    assert load_config(tiny_model_dir("gemma3_hub_style")) == gemma3
    assert load_config(tiny_model_dir("gemma3_mm")) == gemma3


def test_multimodal_gemma_takes_dtype_from_the_outer_config():
    """As in google/gemma-3-4b-it's config.json: the dtype sits outside text_config."""
    raw = raw_config("gemma3_mm")
    for key in ("dtype", "torch_dtype"):
        raw["text_config"].pop(key, None)
        raw.pop(key, None)
    raw.update(torch_dtype="float32")
    cfg = parse_config(raw)
    assert cfg.checkpoint_dtype == "float32"
    text_part = load_config(tiny_model_dir("gemma3"))
    assert replace(cfg, checkpoint_dtype="bfloat16") == text_part


def edited(name: str, **changes) -> dict:
    raw = raw_config(name)
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            edited("llama", model_type="mistral"),
            "model_type 'mistral' is not supported; supported model types are gemma3, gemma3_text, "
            "llama, qwen2, qwen3.",
        ),
        (
            edited(
                "llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
            ),
            "config field rope_parameters.rope_type='yarn' is not supported: the network builds "
            "default, linear and llama3 RoPE only.",
        ),
        (
            {
                **edited("qwen2", rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0}),
                "rope_parameters": None,
            },
            "config field rope_scaling.rope_type='yarn' is not supported: the network builds "
            "default, linear and llama3 RoPE only.",
        ),
        (
            edited("gemma3", attn_logit_softcapping=50.0),
            "config field attn_logit_softcapping=50.0 is not supported: attention softcapping is "
            "not built (Gemma-3 does not use it).",
        ),
        (
            edited("qwen3", num_key_value_heads=3),
            "config field num_key_value_heads=3 is not supported: it must divide "
            "num_attention_heads=4.",
        ),
        (
            edited("llama", hidden_act="relu"),
            "config field hidden_act='relu' is not supported: the MLP supports gelu_pytorch_tanh "
            "and silu.",
        ),
        (
            edited("llama", vocab_size=None),
            "config.json has no 'vocab_size', which a llama model needs; re-download the model.",
        ),
    ],
    ids=["mistral", "yarn", "yarn-hub-style", "softcapping", "kv-heads", "activation", "missing"],
)
def test_unsupported_configs(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value) == message


def test_multimodal_errors_name_the_text_config_field():
    raw = raw_config("gemma3_mm")
    raw["text_config"]["rope_parameters"]["full_attention"] = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value) == (
        "config field rope_parameters.full_attention.rope_type='yarn' is not supported: the network "
        "builds default, linear and llama3 RoPE only."
    )


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    advice = (
        ": point to a Hugging Face model folder that holds config.json (or download the model, "
        "or convert a .gguf file, with `python -m tools.build MODEL`, or in Python with "
        "weights.resolve_model(MODEL))."
    )
    assert str(err.value) == f"{tmp_path / 'config.json'} does not exist{advice}"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as err:
        load_config(gguf)
    assert str(err.value) == f"{gguf} is a file{advice}"


def test_invalid_config_json(tmp_path):
    text = '{"model_type": "llama",'
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as decode_error:
        json.loads(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'config.json'} is not valid JSON ({decode_error.value}); re-download the model."
    )
