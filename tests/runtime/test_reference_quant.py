"""runtime.reference's Quantize and Dequantize layers against TensorRT's definitions.

From the Quantize/Dequantize operator pages and "Working with Quantized Types":
  quantize(x, s)   = roundHalfToEven(clip(x / s, -128, 127))   INT8
                   = roundHalfToEven(clip(x / s, -8, 7))       INT4
                   = castToFp8(clip(x / s, -448, 448))         FP8 E4M3, nearest value, ties to even
  dequantize(q, s) = q · s, in the output type (float32, float16 or bfloat16)
  s is a scalar (per tensor), 1-D along `axis` (per channel), or of the input's rank (per
  block: each scale covers input dims / scale dims, or `block_shape`, -1 meaning the whole
  dim). INT4 weights are packed two per byte, the first value in the low nibble.

Each test builds a small strongly typed network with the real `tensorrt_rtx` API, runs it
with `run_network`, and compares with explicit loops over elements written from those
definitions: Python's round() (half to even), a table of every FP8 E4M3 code decoded from
its bits, and bytes packed by hand. Power-of-two scales keep x / s exact in any precision.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from netdef.graph import trt_dtype
from runtime.reference import ExecutorError, run_network

trt = pytest.importorskip("tensorrt_rtx")

BF16 = np.dtype(ml_dtypes.bfloat16)
INT4 = np.dtype(ml_dtypes.int4)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FLOATS = [np.dtype(np.float32), np.dtype(np.float16), BF16]
rng = np.random.default_rng(0)


# Independent definitions -----------------------------------------------------------------------
def fp8_value(code: int) -> float:
    """The value of an FP8 E4M3 (fn) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
    infinities, S.1111.111 is NaN; exponent 0 is subnormal."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 15 and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


FP8_CODES = [c for c in range(256) if not math.isnan(fp8_value(c))]


def to_fp8(v: float) -> float:
    """castToFp8 after saturation: the nearest E4M3 value, a tie going to the even code."""
    v = max(-448.0, min(448.0, v))
    best = min(FP8_CODES, key=lambda c: (abs(fp8_value(c) - v), c & 1, c))
    return fp8_value(best)


def int_quantize(v: float, bits: int) -> int:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return round(max(lo, min(hi, v)))  # Python rounds half to even


def decoded(out: np.ndarray) -> np.ndarray:
    """An FP8 output decoded from its bytes, not through ml_dtypes' conversion."""
    return np.vectorize(fp8_value)(out.view(np.uint8)).astype(np.float64)


# Network helpers ---------------------------------------------------------------------------------
class Net:
    def __init__(self):
        self.builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.network = self.builder.create_network(flags)
        self.keep: list[np.ndarray] = []
        self.constants: dict[str, np.ndarray] = {}

    def input(self, x: np.ndarray):
        return self.network.add_input("x", trt_dtype(trt, x.dtype), x.shape)

    def const(self, array: np.ndarray, name: str, dtype: np.dtype | None = None, count=None):
        """A constant of `dtype` (default: the array's) backed by `array`'s bytes."""
        dtype = np.dtype(dtype or array.dtype)
        array = np.ascontiguousarray(array)
        self.keep.append(array)
        shape = array.shape if count is None else count
        weights = trt.Weights(trt_dtype(trt, dtype), array.ctypes.data, int(np.prod(shape)))
        layer = self.network.add_constant(shape, weights)
        layer.name = name
        self.constants[name] = array  # the bindings return only some types
        return layer.get_output(0)

    def run(self, layer, feeds):
        out = layer.get_output(0)
        out.name = "out"
        self.network.mark_output(out)
        return run_network(self.network, feeds, constants=self.constants)["out"]


def quantize_net(x, scale, to, axis=None, block_shape=None):
    net = Net()
    layer = net.network.add_quantize(net.input(x), net.const(scale, "scale"), trt_dtype(trt, to))
    if axis is not None:
        layer.axis = axis
    if block_shape is not None:
        layer.block_shape = block_shape
    out = net.run(layer, {"x": x})
    assert out.dtype == np.dtype(to) and out.shape == x.shape
    return out


# Quantize ----------------------------------------------------------------------------------------
# x / 0.5: exact ties (0.5, 1.5, 2.5, -0.5, -2.5) and values past both ends of INT8.
TIES = [0.25, 0.75, 1.25, -0.25, -1.25, 3.0, 63.3, -63.7, 70.0, -80.0, 0.0, 0.1]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_quantize_int8_per_tensor_rounds_half_to_even_and_saturates(dtype):
    x = np.array(TIES, np.float32).astype(dtype).reshape(3, 4)
    out = quantize_net(x, np.array(0.5, dtype), np.int8)
    expected = [[int_quantize(float(v) / 0.5, 8) for v in row] for row in x]
    np.testing.assert_array_equal(out, expected)
    assert out.ravel()[:5].tolist() == [0, 2, 2, 0, -2]  # ties to even
    assert out.ravel()[8:10].tolist() == [127, -128]  # saturated


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_int8_per_channel_along_axis(axis):
    x = rng.uniform(-3, 3, (3, 4)).astype(np.float32)
    scale = np.array([0.5, 0.25, 2.0, 0.125][: x.shape[axis]], np.float32)
    out = quantize_net(x, scale, np.int8, axis=axis)
    expected = [
        [int_quantize(float(x[i, j]) / float(scale[i if axis == 0 else j]), 8) for j in range(4)]
        for i in range(3)
    ]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("scale_shape", "block_shape", "block"),
    [
        ((2, 2), None, (1, 4)),  # blocks of 4 along the last dim, inferred from the shapes
        ((1, 8), None, (2, 1)),  # blocks of 2 along the second to last dim
        ((2, 2), (1, 4), (1, 4)),  # the same, stated
        ((1, 2), (-1, 4), (2, 4)),  # -1: the whole dim
    ],
)
def test_quantize_int4_block_scales(scale_shape, block_shape, block):
    x = rng.uniform(-2, 2, (2, 8)).astype(np.float32)
    scale = rng.choice([0.125, 0.25, 0.5], scale_shape).astype(np.float32)
    out = quantize_net(x, scale, INT4, block_shape=block_shape)
    expected = [
        [
            int_quantize(float(x[i, j]) / float(scale[i // block[0], j // block[1]]), 4)
            for j in range(8)
        ]
        for i in range(2)
    ]
    np.testing.assert_array_equal(out.astype(np.int8), expected)
    assert out.astype(np.int8).min() == -8 or out.astype(np.int8).max() == 7  # some saturate


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_quantize_fp8_per_tensor_nearest_ties_to_even_and_saturates(dtype):
    values = [
        1.0625,  # halfway between 1 and 1.125: ties to 1 (even mantissa)
        1.1875,  # halfway between 1.125 and 1.25: ties to 1.25
        -1.0625,
        300.0,  # between 288 and 320: nearest 288
        500.0,  # saturates to 448
        -1000.0,  # saturates to -448
        2.0**-10,  # halfway between 0 and the smallest subnormal 2^-9: ties to 0
        3 * 2.0**-10,  # halfway between 2^-9 and 2^-8: ties to 2^-8
        0.3,
        -7.7,
        0.0,
        100.0,
    ]
    x = (np.array(values, np.float32) * 2).astype(dtype).reshape(3, 4)  # scale 2: exact division
    out = quantize_net(x, np.array(2.0, dtype), FP8)
    expected = [[to_fp8(float(v) / 2) for v in row] for row in x]
    np.testing.assert_array_equal(decoded(out), expected)
    if dtype == np.float32:
        assert decoded(out).ravel()[:8].tolist() == [
            1.0, 1.25, -1.0, 288.0, 448.0, -448.0, 0.0, 2.0**-8,
        ]  # fmt: skip


def test_quantize_fp8_random_values_match_the_code_table():
    x = (rng.standard_normal((4, 16)) * 100).astype(np.float32)
    out = quantize_net(x, np.array(0.25, np.float32), FP8)
    np.testing.assert_array_equal(decoded(out), [[to_fp8(float(v) / 0.25) for v in r] for r in x])


# Dequantize --------------------------------------------------------------------------------------
def dequantize_net(q_tensor, net, scale, to, axis=None):
    layer = net.network.add_dequantize(q_tensor, net.const(scale, "scale"), trt_dtype(trt, to))
    if axis is not None:
        layer.axis = axis
    return layer


@pytest.mark.parametrize("to", FLOATS, ids=str)
def test_dequantize_int8_per_channel_rounds_once_to_the_output_type(to):
    q = np.array([[127, -128, 3, 0], [-77, 55, 1, -1]], np.int8)
    scale = np.array([1.0078125, 0.0390625], to)  # both exact in bf16, f16 and f32
    net = Net()
    out = net.run(dequantize_net(net.input(q), net, scale, to, axis=0), {"x": q})
    exact = np.array([[float(q[i, j]) * float(scale[i]) for j in range(4)] for i in range(2)])
    assert out.dtype == to
    np.testing.assert_array_equal(out.astype(np.float64), exact.astype(to).astype(np.float64))
    if to == BF16:  # 127 · 1.0078125 = 127.9921875 needs 14 bits: bf16 rounds it to 128
        assert float(out[0, 0]) == 128.0 != exact[0, 0]


@pytest.mark.parametrize("to", FLOATS, ids=str)
def test_dequantize_packed_int4_constant_with_block_scales(to):
    values = rng.integers(-8, 8, (2, 8))
    flat = [int(v) & 0xF for v in values.ravel()]
    packed = np.array([flat[k] | flat[k + 1] << 4 for k in range(0, 16, 2)], np.uint8)
    scale = np.array([[0.5, 0.25], [2.0, 0.125]], to)  # blocks of 4 along the last dim
    net = Net()
    q = net.const(packed, "q", INT4, count=(2, 8))
    out = net.run(dequantize_net(q, net, scale, to, axis=1), {})
    expected = [[int(values[i, j]) * float(scale[i, j // 4]) for j in range(8)] for i in range(2)]
    assert out.dtype == to
    np.testing.assert_array_equal(out.astype(np.float64), expected)


@pytest.mark.parametrize("to", FLOATS, ids=str)
def test_dequantize_fp8_constant_per_tensor(to):
    codes = rng.choice(FP8_CODES, (3, 5)).astype(np.uint8)
    net = Net()
    q = net.const(codes.view(FP8), "q")
    out = net.run(dequantize_net(q, net, np.array(0.5, to), to), {})
    expected = np.array([[fp8_value(int(c)) * 0.5 for c in row] for row in codes])
    assert out.dtype == to
    np.testing.assert_array_equal(out.astype(np.float64), expected.astype(to).astype(np.float64))


def test_quantize_then_dequantize_is_fake_quantization():
    x = rng.uniform(-4, 4, (2, 6)).astype(BF16)
    net = Net()
    scale = net.const(np.array(0.0625, BF16), "scale")
    q = net.network.add_quantize(net.input(x), scale, trt.int8)
    dq = net.network.add_dequantize(q.get_output(0), scale, trt.bfloat16)
    out = net.run(dq, {"x": x})
    expected = [[int_quantize(float(v) / 0.0625, 8) * 0.0625 for v in row] for row in x]
    np.testing.assert_array_equal(out.astype(np.float64), expected)


# Refusals ----------------------------------------------------------------------------------------
def test_nonzero_zero_point_is_refused():
    x = np.ones((2, 2), np.float32)
    net = Net()
    layer = net.network.add_quantize(
        net.input(x), net.const(np.array(0.5, np.float32), "s"), trt.int8
    )
    layer.set_input(2, net.const(np.array(1, np.int8), "zero_point"))
    with pytest.raises(ExecutorError, match="symmetric"):
        net.run(layer, {"x": x})


def test_scale_that_fits_no_granularity_is_refused():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ExecutorError, match="does not match axis"):
        quantize_net(x, np.full(3, 0.5, np.float32), np.int8, axis=1)
    with pytest.raises(ExecutorError, match="does not tile"):
        quantize_net(x, np.full((2, 3), 0.5, np.float32), INT4)
