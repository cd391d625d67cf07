"""weights/: config normalization against transformers' own modules, and the checkpoint reader."""

from __future__ import annotations

import json
import math
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import torch

from netdef.rope import inv_freq
from weights import Checkpoint, CheckpointError, ConfigError, load_config, parse_config

FAMILIES = ["gemma3", "gemma3_hub_style", "gemma3_mm", "llama", "qwen2", "qwen3"]


def text_model(model):
    """The decoder stack of a causal LM or of a multimodal Gemma-3."""
    inner = model.model
    return getattr(inner, "language_model", inner)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_the_instantiated_model(family, tiny_dir, hf_model):
    cfg = load_config(tiny_dir(family))
    model = hf_model(tiny_dir(family), torch.float32)
    decoder = text_model(model)
    assert cfg.num_layers == len(decoder.layers)
    assert cfg.vocab_size == decoder.embed_tokens.num_embeddings
    assert cfg.hidden_size == decoder.embed_tokens.embedding_dim
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        assert attn.scaling == pytest.approx(cfg.attention_scale, rel=1e-12)
        assert attn.head_dim == cfg.head_dim
        assert attn.k_proj.out_features == cfg.num_kv_heads * cfg.head_dim
        assert attn.q_proj.out_features == cfg.num_heads * cfg.head_dim
        assert (attn.q_proj.bias is not None) == cfg.qkv_bias
        assert (attn.o_proj.bias is not None) == cfg.o_bias
        assert hasattr(attn, "q_norm") == cfg.qk_norm
        assert hasattr(layer, "pre_feedforward_layernorm") == cfg.sandwich_norms
        assert layer.mlp.gate_proj.out_features == cfg.intermediate_size
        assert getattr(attn, "sliding_window", None) == cfg.layers[i].sliding_window
        eps = (
            layer.input_layernorm.eps
            if hasattr(layer.input_layernorm, "eps")
            else layer.input_layernorm.variance_epsilon
        )
        assert eps == pytest.approx(cfg.rms_norm_eps)
    act = type(decoder.layers[0].mlp.act_fn).__name__
    assert {
        "GELUTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "SiLUActivation": "silu",
        "SiLU": "silu",
    }[act] == cfg.activation
    scale = getattr(decoder.embed_tokens, "embed_scale", None)
    assert (None if scale is None else float(scale)) == (
        None
        if cfg.embedding_scale is None
        else float(torch.tensor(cfg.embedding_scale, dtype=scale.dtype))
    )
    lm_head = model.lm_head.weight
    assert (lm_head.data_ptr() == decoder.embed_tokens.weight.data_ptr()) == cfg.tie_word_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_frequencies_match_transformers(family, tiny_dir, hf_model):
    cfg = load_config(tiny_dir(family))
    rotary = text_model(hf_model(tiny_dir(family), torch.float32)).rotary_emb
    model_config = hf_model(tiny_dir(family), torch.float32).config
    layer_types = getattr(getattr(model_config, "text_config", model_config), "layer_types", None)
    for i, layer in enumerate(cfg.layers):
        if hasattr(rotary, "inv_freq"):
            theirs = rotary.inv_freq
        else:  # Gemma-3: one table per layer type
            theirs = getattr(rotary, f"{layer_types[i]}_inv_freq")
        np.testing.assert_allclose(inv_freq(layer.rope, cfg.head_dim), theirs.numpy(), rtol=1e-6)


def test_gemma_config_styles_normalize_alike(tiny_dir):
    assert load_config(tiny_dir("gemma3_hub_style")) == load_config(tiny_dir("gemma3"))
    assert load_config(tiny_dir("gemma3_mm")) == load_config(tiny_dir("gemma3"))


def test_llama3_rope_by_independent_formula(tiny_dir):
    """llama3 scaling written out per frequency from Meta's reference description."""
    rope = load_config(tiny_dir("llama")).layers[0].rope
    dim = load_config(tiny_dir("llama")).head_dim
    expected = []
    for i in range(0, dim, 2):
        f = 1.0 / rope.theta ** (i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < rope.original_max_positions / rope.high_freq_factor:
            expected.append(f)
        elif wavelen > rope.original_max_positions / rope.low_freq_factor:
            expected.append(f / rope.factor)
        else:
            s = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            expected.append((1 - s) * f / rope.factor + s * f)
    np.testing.assert_allclose(inv_freq(rope, dim), expected, rtol=1e-5)


BASE = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "hidden_act": "silu",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model_type": "mistral"},
            "model_type 'mistral' is not supported; supported model types are gemma3, gemma3_text, llama, qwen2, qwen3.",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "config field rope_scaling.rope_type='yarn' is not supported: the network builds default, linear and llama3 RoPE only.",
        ),
        (
            {"num_key_value_heads": 3},
            "config field num_key_value_heads=3 is not supported: it must divide num_attention_heads=2.",
        ),
        (
            {"hidden_act": "relu"},
            "config field hidden_act='relu' is not supported: the MLP supports gelu_pytorch_tanh and silu.",
        ),
        (
            {"mlp_bias": True},
            "config field mlp_bias=True is not supported: MLP biases are not built.",
        ),
        (
            {
                "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh",
                "attn_logit_softcapping": 50.0,
            },
            "config field attn_logit_softcapping=50.0 is not supported: attention softcapping is not built "
            "(Gemma-3 does not use it).",
        ),
        (
            {"vocab_size": None},
            "config.json has no 'vocab_size', which a llama model needs; re-download the model.",
        ),
    ],
)
def test_unsupported_configs(change, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **change})
    assert str(err.value) == message


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'config.json'} does not exist: point to a Hugging Face model folder that holds config.json "
        "(or download the model with `python -m tools.build MODEL`)."
    )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(
        ConfigError, match=r"config.json is not valid JSON \(.*\); re-download the model.$"
    ):
        load_config(tmp_path)


# Checkpoint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_reads_zero_copy_and_exact(family, tiny_dir, hf_model):
    ckpt = Checkpoint.open(tiny_dir(family))
    ckpt.validate()
    params = dict(text_model(hf_model(tiny_dir(family), torch.bfloat16)).named_parameters())
    if not ckpt.config.tie_word_embeddings:
        params["lm_head.weight"] = hf_model(tiny_dir(family), torch.bfloat16).lm_head.weight
    for name in ckpt.config.tensor_shapes():
        ours = ckpt.tensor(name)
        assert ours.dtype == ml_dtypes.bfloat16
        assert not ours.flags.writeable and not ours.flags.owndata  # a view of the mapped file
        theirs = params[name].detach().float().numpy()
        np.testing.assert_array_equal(ours.astype(np.float32), theirs)
    embed = ckpt.tensor("embed_tokens.weight")
    assert np.shares_memory(embed, ckpt.tensor("embed_tokens.weight"))
    if ckpt.config.tie_word_embeddings:
        assert np.shares_memory(embed, ckpt.tensor("lm_head.weight"))


def test_sharded_checkpoint(tiny_dir, hf_model, tmp_path):
    hf_model(tiny_dir("qwen3"), torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded, single = Checkpoint.open(tmp_path), Checkpoint.open(tiny_dir("qwen3"))
    sharded.validate()
    for name in single.config.tensor_shapes():
        np.testing.assert_array_equal(sharded.tensor(name), single.tensor(name))


def test_missing_shard(tiny_dir, hf_model, tmp_path):
    hf_model(tiny_dir("qwen3"), torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(tmp_path)
    assert str(err.value) == (
        f"shard {victim.name} listed in model.safetensors.index.json is missing from {tmp_path}; re-download the model."
    )


@pytest.fixture
def llama_copy(tiny_dir, tmp_path):
    dest = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), dest)
    return dest


def rewrite(path, edit) -> None:
    """Rewrite a safetensors file after `edit(header, data)` changes its header or bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header, data = edit(header, data)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_truncated_file(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=r"re-download model.safetensors \(it is truncated or corrupt\)\.$"
    ):
        Checkpoint.open(llama_copy)


def test_corrupt_header(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy)
    assert str(err.value) == (
        f"{path} has a header of 1000000000 bytes but only 10 bytes in all; "
        "re-download model.safetensors (it is truncated or corrupt)."
    )
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy)
    assert (
        str(err.value)
        == f"{path} has an unreadable header; re-download model.safetensors (it is truncated or corrupt)."
    )


def test_wrong_shape(llama_copy):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(header, data):
        header[name]["shape"] = header[name]["shape"][::-1]
        return header, data

    rewrite(llama_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy).validate()
    assert str(err.value) == (
        f"tensor '{name}' in model.safetensors has shape [64, 16] but config.json implies [16, 64]; "
        "the weights and config.json do not belong together."
    )


def test_wrong_dtype(llama_copy):
    name = "model.norm.weight"

    def edit(header, data):
        header[name]["dtype"] = "I16"
        return header, data

    rewrite(llama_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy).validate()
    assert str(err.value) == (
        f"tensor '{name}' in model.safetensors is int16, but weights must be bfloat16, float16 or float32; "
        "re-export the checkpoint in a floating-point dtype."
    )


def test_missing_tensor(llama_copy):
    def edit(header, data):
        del header["model.layers.2.mlp.up_proj.weight"]
        return header, data

    rewrite(llama_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy).validate()
    assert str(err.value) == (
        f"tensor 'layers.2.mlp.up_proj.weight' is missing from the checkpoint in {llama_copy}; "
        "the weights do not match config.json — re-download the model."
    )


def test_no_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(llama_copy)
    assert str(err.value) == (
        f"{llama_copy} has no model.safetensors or model.safetensors.index.json; "
        "point to a Hugging Face folder with safetensors weights."
    )


def test_gemma3_270m_reads_in_bf16_with_every_tensor_accounted_for(gemma3_270m_dir):
    from weights.checkpoint import sanitize

    ckpt = Checkpoint.open(gemma3_270m_dir)
    ckpt.validate()
    stored = {sanitize(name) for f in ckpt.files for name in f.names()}
    assert stored == set(ckpt.config.tensor_shapes())  # nothing missing, nothing left over
    assert {ckpt.tensor(name).dtype for name in stored} == {np.dtype(ml_dtypes.bfloat16)}
    assert ckpt.config.num_layers == 18 and ckpt.config.tie_word_embeddings
