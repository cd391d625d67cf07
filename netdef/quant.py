"""Quantization math (NumPy), exactly as TensorRT's explicit quantization defines it.

TensorRT quantizes symmetrically ("Working with Quantized Types", Quantize and Dequantize
operator pages): q = roundHalfToEven(clip(x / s, -128, 127)) for INT8, the same with
[-8, 7] for INT4, q = castToFp8(clip(x / s, -448, 448)) (nearest FP8 E4M3 value, ties to
even) for FP8, and x = q · s back. Scales are strictly positive and the zero point is 0.

The modes quantize the weights of every linear layer once, here, at network definition;
the network stores them quantized and dequantizes them in front of the matmul:

    int8-wo   INT8 weights, one scale per output channel (weight-only)
    int4-wo   INT4 weights, one scale per block of 128 inputs of an output channel (64 or 32
              where 128 does not divide every quantized weight's input size)
    fp8       FP8 E4M3 weights and activations, one scale per tensor; activation scales
              come from a calibration pass (runtime.calibration): amax / 448, over
              CALIBRATION_TEXT unless another text is given
    from-gguf nothing is quantized here: a GGUF file's weights whose block format TensorRT
              expresses exactly keep it, as INT8 in blocks of 32 or 16 with float32 scales
              (weights.gguf_quant says which formats); the others stay unquantized

The network reader (runtime.reference) uses `quantize`, `dequantize` and `unpack_int4`
too, so weights quantized here and Quantize layers executed there agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

MODES = ("none", "int8-wo", "int4-wo", "fp8", "from-gguf")
# Public-domain sample text (Pride and Prejudice, chapters 1-2) for fp8 calibration.
CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
# Inputs per INT4 scale, best first: a model takes the largest that divides the input size of
# every weight it quantizes (a hidden size of 576 takes 64). Larger blocks store fewer scales.
INT4_BLOCKS = (128, 64, 32)
# Targets without FP8 matmuls: TensorRT-RTX runs FP8 GEMMs on compute capability 8.9+.
NO_FP8_TARGETS = ("sm75", "sm80", "sm86")

INT8 = np.dtype(np.int8)
INT4 = np.dtype(ml_dtypes.int4)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
RANGE = {INT8: (-128, 127), INT4: (-8, 7), FP8: (-448.0, 448.0)}
# The value a group's amax maps to: symmetric, so INT8 and INT4 leave -128 / -8 unused.
QMAX = {INT8: 127.0, INT4: 7.0, FP8: 448.0}
WEIGHT_TYPE = {"int8-wo": INT8, "int4-wo": INT4, "fp8": FP8}


def quantize(x: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """TensorRT's Quantize: x / scale in float32, saturated to `dtype`'s range, then rounded
    half to even (INT8, INT4) or to the nearest FP8 E4M3 value, ties to even. `scale`
    broadcasts against `x`."""
    lo, hi = RANGE[np.dtype(dtype)]
    y = np.clip(np.asarray(x, np.float32) / np.asarray(scale, np.float32), lo, hi)
    return y.astype(dtype) if np.dtype(dtype) == FP8 else np.rint(y).astype(dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """TensorRT's Dequantize: q · scale in float32, rounded once to `dtype`."""
    return (q.astype(np.float32) * np.asarray(scale, np.float32)).astype(dtype)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """INT4 values two per byte, the first in the low nibble: how TensorRT reads 4-bit weights.

    An odd count leaves the last byte's high nibble zero."""
    nibbles = values.astype(np.int8).ravel().view(np.uint8) & 0xF
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` INT4 values of `pack_int4` bytes (sign-extended nibbles)."""
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).ravel()[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(INT4)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out, in] as the network stores it: `values` (INT8, INT4 or FP8, same shape)
    and the `scale` its Dequantize layer multiplies by, in the model dtype: shape [] (fp8),
    [out] (int8-wo, per channel) or [out, in / block] (int4-wo, per block)."""

    values: np.ndarray
    scale: np.ndarray

    def dequantized(self) -> np.ndarray:
        """The weight the network computes with (Dequantize's output, in the scale's dtype)."""
        return dequantize(
            self.values, expand_scale(self.scale, self.values.shape), self.scale.dtype
        )


def expand_scale(scale: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The scale of every element of a [out, in] weight (broadcastable to `shape`)."""
    if scale.ndim == 1:
        return scale[:, None]
    if scale.ndim == 2:
        return np.repeat(scale, shape[1] // scale.shape[1], axis=1)
    return scale


def int4_block(inputs: list[int]) -> int | None:
    """The largest of INT4_BLOCKS that divides every input size, or None."""
    return next((b for b in INT4_BLOCKS if all(n % b == 0 for n in inputs)), None)


def quantize_weight(weight: np.ndarray, mode: str, block: int = INT4_BLOCKS[0]) -> QuantizedWeight:
    """Quantize a [out, in] weight for `mode`; scales are amax / qmax in the weight's dtype
    (int4-wo: over blocks of `block` inputs).

    The scale is rounded to the model dtype before quantizing, so the network dequantizes
    with exactly the scale the values were computed with."""
    dtype = WEIGHT_TYPE[mode]
    w = np.asarray(weight, np.float32)
    out, inp = w.shape
    if mode == "int8-wo":
        amax = np.abs(w).max(axis=1)
    elif mode == "int4-wo":
        amax = np.abs(w.reshape(out, inp // block, block)).max(axis=2)
    else:
        amax = np.abs(w).max()
    scale = scale_for(amax, QMAX[dtype], weight.dtype)
    return QuantizedWeight(quantize(w, expand_scale(scale, w.shape), dtype), scale)


def activation_scale(amax: float, dtype: np.dtype) -> np.ndarray:
    """The per-tensor FP8 scale of a calibrated activation, amax / 448, as a [] array."""
    return scale_for(np.asarray(amax, np.float32), QMAX[FP8], dtype)


def scale_for(amax: np.ndarray, qmax: float, dtype: np.dtype) -> np.ndarray:
    """amax / qmax rounded to `dtype`; groups that are all zero (or whose scale underflows)
    get 1, since TensorRT needs strictly positive scales and any scale maps them to 0."""
    scale = (np.asarray(amax, np.float32) / np.float32(qmax)).astype(dtype)
    return np.where(scale > 0, scale, np.ones_like(scale))
