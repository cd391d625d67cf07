"""The tiny checkpoints load in transformers with the properties the parity tests rely on."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny import TINY_MODELS


def header(path: Path) -> dict[str, dict]:
    """The tensor entries of a folder's safetensors header: name → {dtype, shape, ...}."""
    with open(path / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(size))
    entries.pop("__metadata__", None)
    return entries


def random_logits(model, vocab: int = 512) -> torch.Tensor:
    ids = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_bf16_weights_and_separated_logits(name, tiny_dir, hf_model):
    path = tiny_dir(name)
    assert {e["dtype"] for e in header(path).values()} == {"BF16"}
    logits = random_logits(hf_model(path, torch.float32))
    top2 = logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    assert 2.0 < logits.std() < 8.0
    assert (margin > 0.1).float().mean() > 0.85
    assert torch.isfinite(random_logits(hf_model(path, torch.bfloat16))).all()


def test_gemma3_layers_and_scale(tiny_dir, hf_model):
    config = hf_model(tiny_dir("gemma3"), torch.float32).config
    assert config.layer_types == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    assert config.sliding_window == 4
    assert config.query_pre_attn_scalar != config.head_dim
    assert config.rope_parameters["full_attention"] == {
        "rope_type": "linear",
        "factor": 8.0,
        "rope_theta": 1e6,
    }
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0


def test_gemma3_hub_style_is_the_same_model(tiny_dir, hf_model):
    raw = json.loads((tiny_dir("gemma3_hub_style") / "config.json").read_text())
    assert "layer_types" not in raw and "rope_parameters" not in raw
    assert raw["sliding_window_pattern"] == 3 and raw["rope_scaling"]["rope_type"] == "linear"

    new = hf_model(tiny_dir("gemma3"), torch.float32)
    hub = hf_model(tiny_dir("gemma3_hub_style"), torch.float32)
    for key in ("layer_types", "sliding_window", "rope_parameters", "query_pre_attn_scalar"):
        assert getattr(hub.config, key) == getattr(new.config, key), key
    torch.testing.assert_close(random_logits(hub), random_logits(new), rtol=0, atol=0)


def test_gemma3_mm_keeps_text_weights_under_language_model(tiny_dir, hf_model):
    path = tiny_dir("gemma3_mm")
    names = header(path)
    prefixes = {n.split(".")[0] for n in names}
    assert prefixes == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in names
    assert not any(n.startswith("model.") or "lm_head" in n for n in names)  # tied, prefixed
    # The same text model as the text-only fixture, wrapped.
    text_config = hf_model(path, torch.float32).config.text_config
    assert text_config.layer_types == hf_model(tiny_dir("gemma3"), torch.float32).config.layer_types


@pytest.mark.parametrize(
    ("name", "kv_heads"), [("gemma3", 2), ("llama", 1), ("qwen2", 2), ("qwen3", 2)]
)
def test_kv_heads(name, kv_heads, tiny_dir):
    path = tiny_dir(name)
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == kv_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert header(path)["model.layers.0.self_attn.k_proj.weight"]["shape"] == [
        kv_heads * head_dim,
        config["hidden_size"],
    ]


def test_llama_untied_head_and_llama3_rope(tiny_dir, hf_model):
    path = tiny_dir("llama")
    assert "lm_head.weight" in header(path)
    model = hf_model(path, torch.float32)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.rope_parameters["rope_type"] == "llama3"


def test_qwen2_qkv_biases_and_tied_head(tiny_dir):
    names = header(tiny_dir("qwen2"))
    for proj in ("q", "k", "v"):
        assert f"model.layers.0.self_attn.{proj}_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names


def test_qwen3_head_dim_and_qk_norm(tiny_dir):
    names = header(tiny_dir("qwen3"))
    assert names["model.layers.0.self_attn.q_norm.weight"]["shape"] == [32]
    assert names["model.layers.0.self_attn.q_proj.weight"]["shape"] == [4 * 32, 64]
    assert "lm_head.weight" in names
