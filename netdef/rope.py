"""Cos/sin tables for TensorRT's RotaryEmbedding layer, one per RoPE variant.

The layer indexes `[max_position, head_dim / 2]` tables with position ids and rotates
the two halves of each head (GPT-NeoX pairing, `interleaved=False`), as HF Llama,
Qwen and Gemma do. Frequencies follow transformers' `modeling_rope_utils`.
"""

from __future__ import annotations

import math

import numpy as np

from weights.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] in float32, scaled as the config says."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    freq = (1.0 / (rope.theta**exponents)).astype(np.float32)
    if rope.scaling == "linear":
        return (freq / np.float32(rope.factor)).astype(np.float32)
    if rope.scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return freq


def cos_sin_tables(
    rope: RopeConfig, head_dim: int, max_positions: int
) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos and sin tables of shape [max_positions, head_dim / 2]."""
    positions = np.arange(max_positions, dtype=np.float32)
    angles = np.outer(positions, inv_freq(rope, head_dim)).astype(np.float32)
    return np.cos(angles), np.sin(angles)
