"""runtime.reference, one TensorRT layer kind at a time, against the TensorRT operator docs.

Each test builds a tiny strongly typed network with the real `tensorrt_rtx` API, runs it with
`run_network`, and compares with a formula written here from the operator's documentation,
mostly as explicit loops over indices on small shapes (never the executor's own helpers).
"""

from __future__ import annotations

import itertools
import math
import re

import ml_dtypes
import numpy as np
import pytest

from netdef.options import Profile
from runtime.reference import ExecutorError, run_network

trt = pytest.importorskip("tensorrt_rtx")

BF16 = np.dtype(ml_dtypes.bfloat16)
TRT_DTYPES = {
    np.dtype(np.float32): trt.float32,
    np.dtype(np.float16): trt.float16,
    BF16: trt.bfloat16,
    np.dtype(np.int32): trt.int32,
    np.dtype(np.int64): trt.int64,
    np.dtype(np.bool_): trt.bool,
}
NUMPY_DTYPES = {v: k for k, v in TRT_DTYPES.items()}
rng = np.random.default_rng(0)


# Network helpers ------------------------------------------------------------------------------
class Net:
    """A strongly typed network; bf16 constants are kept for the executor, others read back."""

    def __init__(self):
        self.builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.network = self.builder.create_network(flags)
        self.arrays: list[np.ndarray] = []  # TensorRT points into these: keep them alive
        self.constants: dict[str, np.ndarray] = {}

    def input(self, name, dtype, shape):
        return self.network.add_input(name, TRT_DTYPES[np.dtype(dtype)], tuple(shape))

    def const(self, array, name):
        array = np.ascontiguousarray(array)
        self.arrays.append(array)
        weights = trt.Weights(TRT_DTYPES[array.dtype], array.ctypes.data, array.size)
        layer = self.network.add_constant(array.shape, weights)
        layer.name = name
        if array.dtype == BF16:  # the bindings cannot hand bfloat16 weights back
            self.constants[name] = array
        return layer.get_output(0)

    def output(self, tensor, name="out"):
        tensor.name = name
        self.network.mark_output(tensor)

    def run(self, feeds, **kwargs):
        outputs = run_network(self.network, feeds, constants=self.constants, **kwargs)
        for i in range(self.network.num_outputs):  # TensorRT's own shape and type inference
            t = self.network.get_output(i)
            assert outputs[t.name].dtype == NUMPY_DTYPES[t.dtype], t.name
            if -1 not in tuple(t.shape):
                assert outputs[t.name].shape == tuple(t.shape), t.name
        return outputs


def run_one(build, *arrays):
    """Feed `arrays` as inputs x0, x1, ... (static shapes); `build(net, *tensors)` -> output."""
    net = Net()
    tensors = [net.input(f"x{i}", a.dtype, a.shape) for i, a in enumerate(arrays)]
    net.output(build(net, *tensors))
    return net.run({f"x{i}": a for i, a in enumerate(arrays)})["out"]


def floats(*shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, shape).astype(np.float32)


def broadcast_index(index, shape):
    """The element of an operand of `shape` that output `index` reads (size-1 dims repeat)."""
    return tuple(0 if n == 1 else i for i, n in zip(index, shape))


def broadcast_shape(*shapes):
    return tuple(max(dims) for dims in zip(*shapes))


# Elementwise, unary, activation -----------------------------------------------------------------
ARITHMETIC = {
    "SUM": lambda a, b: a + b,
    "PROD": lambda a, b: a * b,
    "MAX": max,
    "MIN": min,
    "SUB": lambda a, b: a - b,
    "DIV": lambda a, b: a / b,
    "POW": lambda a, b: a**b,
}


@pytest.mark.parametrize("op", list(ARITHMETIC))
def test_elementwise_float_broadcasts_size_one_dims(op):
    a, b = floats(2, 1, 3, low=0.5), floats(1, 4, 3, low=0.5)
    out = run_one(
        lambda net, x, y: net.network.add_elementwise(
            x, y, getattr(trt.ElementWiseOperation, op)
        ).get_output(0),
        a,
        b,
    )
    shape = broadcast_shape(a.shape, b.shape)
    expected = np.zeros(shape)
    for i in np.ndindex(shape):
        x, y = float(a[broadcast_index(i, a.shape)]), float(b[broadcast_index(i, b.shape)])
        expected[i] = ARITHMETIC[op](x, y)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("op", ["SUM", "PROD", "MAX", "MIN", "SUB"])
def test_elementwise_int32(op):
    a = rng.integers(-50, 50, (3, 1)).astype(np.int32)
    b = rng.integers(-50, 50, (1, 4)).astype(np.int32)
    out = run_one(
        lambda net, x, y: net.network.add_elementwise(
            x, y, getattr(trt.ElementWiseOperation, op)
        ).get_output(0),
        a,
        b,
    )
    expected = [[ARITHMETIC[op](int(a[i, 0]), int(b[0, j])) for j in range(4)] for i in range(3)]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)


COMPARISONS = {
    "EQUAL": lambda a, b: a == b,
    "GREATER": lambda a, b: a > b,
    "LESS": lambda a, b: a < b,
}


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("op", list(COMPARISONS))
def test_comparison_gives_bool(op, dtype):
    a = np.array([[1, 2, 3, 4]], dtype=dtype)
    b = np.array([[3], [2]], dtype=dtype)
    out = run_one(
        lambda net, x, y: net.network.add_elementwise(
            x, y, getattr(trt.ElementWiseOperation, op)
        ).get_output(0),
        a,
        b,
    )
    expected = [[COMPARISONS[op](a[0, j], b[i, 0]) for j in range(4)] for i in range(2)]
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, expected)


LOGICAL = {"AND": lambda a, b: a and b, "OR": lambda a, b: a or b, "XOR": lambda a, b: a != b}


@pytest.mark.parametrize("op", list(LOGICAL))
def test_logical_on_bool(op):
    a = np.array([[True, True, False, False]])
    b = np.array([[True], [False]])
    out = run_one(
        lambda net, x, y: net.network.add_elementwise(
            x, y, getattr(trt.ElementWiseOperation, op)
        ).get_output(0),
        a,
        b,
    )
    expected = [[LOGICAL[op](bool(a[0, j]), bool(b[i, 0])) for j in range(4)] for i in range(2)]
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, expected)


UNARY = {
    "EXP": math.exp,
    "LOG": math.log,
    "SQRT": math.sqrt,
    "RECIP": lambda v: 1 / v,
    "ABS": abs,
    "NEG": lambda v: -v,
    "SIN": math.sin,
    "COS": math.cos,
    "FLOOR": math.floor,
    "CEIL": math.ceil,
}


@pytest.mark.parametrize("op", list(UNARY))
def test_unary(op):
    positive_only = op in ("LOG", "SQRT")
    x = floats(2, 5, low=0.25 if positive_only else -3.0, high=3.0)
    out = run_one(
        lambda net, t: net.network.add_unary(t, getattr(trt.UnaryOperation, op)).get_output(0), x
    )
    expected = [[UNARY[op](float(v)) for v in row] for row in x]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_unary_not_on_bool():
    x = np.array([[True, False, True]])
    out = run_one(lambda net, t: net.network.add_unary(t, trt.UnaryOperation.NOT).get_output(0), x)
    np.testing.assert_array_equal(out, [[False, True, False]])


ACTIVATIONS = {
    "RELU": lambda v: max(v, 0.0),
    "SIGMOID": lambda v: 1 / (1 + math.exp(-v)),
    "TANH": math.tanh,
    "GELU_TANH": lambda v: (
        0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    ),
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_activation(kind):
    x = floats(3, 4, low=-4.0, high=4.0)
    out = run_one(
        lambda net, t: net.network.add_activation(t, getattr(trt.ActivationType, kind)).get_output(
            0
        ),
        x,
    )
    expected = [[ACTIVATIONS[kind](float(v)) for v in row] for row in x]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


# Reductions, softmax, matmul ------------------------------------------------------------------
REDUCTIONS = {
    "SUM": sum,
    "PROD": math.prod,
    "MAX": max,
    "MIN": min,
    "AVG": lambda v: sum(v) / len(v),
}


@pytest.mark.parametrize("keep_dims", [True, False])
@pytest.mark.parametrize("op", list(REDUCTIONS))
def test_reduce_over_axes_bitmask(op, keep_dims):
    x = floats(2, 3, 4, low=0.5)
    axes = 0b101  # dims 0 and 2
    out = run_one(
        lambda net, t: net.network.add_reduce(
            t, getattr(trt.ReduceOperation, op), axes, keep_dims
        ).get_output(0),
        x,
    )
    values = [
        REDUCTIONS[op]([float(x[i, j, k]) for i in range(2) for k in range(4)]) for j in range(3)
    ]
    expected = np.array(values).reshape((1, 3, 1) if keep_dims else (3,))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_softmax_over_one_axis(axis):
    x = floats(2, 3, 4)
    out = run_one(lambda net, t: _softmax_layer(net, t, 1 << axis).get_output(0), x)
    expected = np.zeros(x.shape)
    for index in np.ndindex(x.shape):
        line = [(*index[:axis], m, *index[axis + 1 :]) for m in range(x.shape[axis])]
        total = sum(math.exp(float(x[i])) for i in line)
        expected[index] = math.exp(float(x[index])) / total
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("op", ["MAX", "MIN"])
@pytest.mark.parametrize("k", [1, 3])
def test_topk_values_and_indices_along_one_axis(op, k):
    """TopK: the k largest (MAX) / smallest (MIN) along the axis, in order, with their indices."""
    x = floats(2, 5, 4)
    x[0, 1, 2] = x[0, 3, 2]  # a tie: the lower index comes first
    net = Net()
    t = net.input("x0", np.float32, x.shape)
    layer = net.network.add_topk(t, getattr(trt.TopKOperation, op), k, 1 << 1)
    net.output(layer.get_output(0), "values")
    net.output(layer.get_output(1), "indices")
    out = net.run({"x0": x})
    for b, col in itertools.product(range(2), range(4)):
        column = [(float(x[b, i, col]), i) for i in range(5)]
        ranked = sorted(column, key=lambda vi: (-vi[0] if op == "MAX" else vi[0], vi[1]))[:k]
        assert out["values"][b, :, col].tolist() == [v for v, _ in ranked]
        assert out["indices"][b, :, col].tolist() == [i for _, i in ranked]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_topk_ties_at_the_top_keep_index_order(k):
    x = np.array([[1.0, 5.0, 5.0, 0.0, 5.0]], np.float32)
    for op, best in (("MAX", [1, 2, 4, 0, 3]), ("MIN", [3, 0, 1, 2, 4])):
        net = Net()
        layer = net.network.add_topk(
            net.input("x0", np.float32, x.shape), getattr(trt.TopKOperation, op), k, 1 << 1
        )
        net.output(layer.get_output(1), "indices")
        assert net.run({"x0": x})["indices"].tolist() == [best[:k]]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_ranks_nan_above_every_number(k):
    """A float16 overflow's NaN logits reach the sampling TopK: it still returns k entries,
    NaN ranked above +inf (first for MAX, last for MIN), NaNs in index order."""
    x = np.array([[1.0, np.nan, np.inf, 0.0, np.nan, -2.0]], np.float32)
    for op, best in (("MAX", [1, 4, 2, 0, 3, 5]), ("MIN", [5, 3, 0, 2, 1, 4])):
        net = Net()
        layer = net.network.add_topk(
            net.input("x0", np.float32, x.shape), getattr(trt.TopKOperation, op), k, 1 << 1
        )
        net.output(layer.get_output(0), "values")
        net.output(layer.get_output(1), "indices")
        out = net.run({"x0": x})
        assert out["indices"].tolist() == [best[:k]]
        np.testing.assert_array_equal(out["values"], x[:, best[:k]])


def _softmax_layer(net, t, axes):
    layer = net.network.add_softmax(t)
    layer.axes = axes
    return layer


def matmul_loops(a, b, transpose_a, transpose_b):
    """C[..., i, j] = sum_k A[..., i, k] B[..., k, j], batch dims broadcast, operands transposed."""
    a_batch, b_batch = a.shape[:-2], b.shape[:-2]
    m = a.shape[-1] if transpose_a else a.shape[-2]
    k_dim = a.shape[-2] if transpose_a else a.shape[-1]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = broadcast_shape(a_batch, b_batch)
    out = np.zeros((*batch, m, n))
    for bi in np.ndindex(batch):
        ab, bb = broadcast_index(bi, a_batch), broadcast_index(bi, b_batch)
        for i, j in itertools.product(range(m), range(n)):
            total = 0.0
            for k in range(k_dim):
                x = a[(*ab, k, i)] if transpose_a else a[(*ab, i, k)]
                y = b[(*bb, j, k)] if transpose_b else b[(*bb, k, j)]
                total += float(x) * float(y)
            out[(*bi, i, j)] = total
    return out


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("transpose_a", [False, True])
def test_matmul_transposes_and_broadcasts_batch(transpose_a, transpose_b):
    a = floats(2, 1, *((4, 3) if transpose_a else (3, 4)))
    b = floats(1, 3, *((5, 4) if transpose_b else (4, 5)))
    ops = [
        trt.MatrixOperation.TRANSPOSE if t else trt.MatrixOperation.NONE
        for t in (transpose_a, transpose_b)
    ]
    out = run_one(
        lambda net, x, y: net.network.add_matrix_multiply(x, ops[0], y, ops[1]).get_output(0), a, b
    )
    assert out.shape == (2, 3, 3, 5)
    np.testing.assert_allclose(
        out, matmul_loops(a, b, transpose_a, transpose_b), rtol=1e-5, atol=1e-6
    )


def test_matmul_with_float32_constant_read_back_from_bindings():
    x = floats(1, 2, 3)
    w = floats(1, 4, 3)  # HF layout [out, in]: x @ w.T
    net = Net()
    t = net.input("x", np.float32, x.shape)
    c = net.const(w, "w")
    none, transpose = trt.MatrixOperation.NONE, trt.MatrixOperation.TRANSPOSE
    net.output(net.network.add_matrix_multiply(t, none, c, transpose).get_output(0))
    assert net.constants == {}
    out = net.run({"x": x})["out"]
    np.testing.assert_allclose(out, matmul_loops(x, w, False, True), rtol=1e-5)


# bfloat16: compute in float32, round once -----------------------------------------------------
def bf16_grid(*shape):
    """bf16 values k/16, |k| <= 64: products and short sums are exact in float32."""
    return (rng.integers(-64, 65, shape) / 16).astype(BF16)


def test_bf16_matmul_rounds_the_float32_result_once():
    x = bf16_grid(1, 3, 16)
    w = bf16_grid(1, 5, 16)
    net = Net()
    t = net.input("x", BF16, x.shape)
    c = net.const(w, "w")
    none, transpose = trt.MatrixOperation.NONE, trt.MatrixOperation.TRANSPOSE
    net.output(net.network.add_matrix_multiply(t, none, c, transpose).get_output(0))
    assert list(net.constants) == ["w"]
    out = net.run({"x": x})["out"]
    exact = matmul_loops(x, w, False, True).astype(np.float32)  # exact: multiples of 1/256
    expected = exact.astype(BF16)
    assert out.dtype == BF16
    assert not np.array_equal(expected.astype(np.float32), exact)  # rounding really happens
    np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("op", ["SUM", "PROD", "DIV"])
def test_bf16_elementwise_rounds_the_float32_result_once(op):
    a = np.concatenate([[1.0, 1.0078125], rng.uniform(0.5, 2, 30)]).astype(BF16)
    b = np.concatenate([[2.0**-8, 2.0**-8], rng.uniform(0.5, 2, 30)]).astype(BF16)
    out = run_one(
        lambda net, x, y: net.network.add_elementwise(
            x, y, getattr(trt.ElementWiseOperation, op)
        ).get_output(0),
        a,
        b,
    )
    expected = ARITHMETIC[op](a.astype(np.float32), b.astype(np.float32)).astype(BF16)
    assert out.dtype == BF16
    np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))
    if op == "SUM":  # exact ties round to even: 1 + 2^-8 -> 1, (1 + 2^-7) + 2^-8 -> 1 + 2^-6
        assert out[:2].astype(np.float32).tolist() == [1.0, 1.015625]


# Cast -----------------------------------------------------------------------------------------
CASTS = [
    (np.float32, BF16, floats(7)),
    (BF16, np.float32, floats(7).astype(BF16)),
    (np.float32, np.float16, floats(7)),
    (np.float16, np.float32, floats(7).astype(np.float16)),
    (BF16, np.float16, floats(7).astype(BF16)),
    (np.int32, np.int64, np.array([-3, 0, 7, 2**31 - 1], dtype=np.int32)),
    (np.int64, np.int32, np.array([-3, 0, 7, 2**20], dtype=np.int64)),
    (np.bool_, np.float32, np.array([True, False, True])),
    (np.bool_, np.int32, np.array([True, False, True])),
    (np.float32, np.bool_, np.array([0.0, -0.5, 2.0, 0.0], dtype=np.float32)),
    (np.int32, np.bool_, np.array([0, -1, 3], dtype=np.int32)),
]


@pytest.mark.parametrize(
    ("src", "dst", "x"),
    CASTS,
    ids=[f"{np.dtype(s).name}-{np.dtype(d).name}" for s, d, _ in CASTS],
)
def test_cast(src, dst, x):
    out = run_one(
        lambda net, t: net.network.add_cast(t, TRT_DTYPES[np.dtype(dst)]).get_output(0), x
    )
    assert out.dtype == np.dtype(dst)
    if np.dtype(dst) == np.bool_:
        expected = [v != 0 for v in x.tolist()]
    elif np.dtype(dst).kind in "iu":
        expected = [int(v) for v in x.tolist()]
    else:  # float targets: the source value rounded to nearest-even in the target type
        expected = np.array([float(v) for v in x.tolist()]).astype(dst)
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(expected, np.float64))


# Shape manipulation ---------------------------------------------------------------------------
def test_concatenation_along_axis():
    parts = [floats(2, n, 3) for n in (1, 2, 3)]
    net = Net()
    inputs = [net.input(f"x{i}", np.float32, p.shape) for i, p in enumerate(parts)]
    layer = net.network.add_concatenation(inputs)
    layer.axis = 1
    net.output(layer.get_output(0))
    out = net.run({f"x{i}": p for i, p in enumerate(parts)})["out"]
    rows = [[p[b, j] for p in parts for j in range(p.shape[1])] for b in range(2)]
    np.testing.assert_array_equal(out, np.array(rows))


def test_shape_of_a_dynamic_input_is_int64():
    net = Net()
    x = net.input("x", np.float32, (-1, 3, -1))
    net.output(net.network.add_shape(x).get_output(0))
    out = net.run({"x": floats(2, 3, 5)})["out"]
    assert out.dtype == np.int64
    assert out.tolist() == [2, 3, 5]


def test_shuffle_transposes_reshapes_transposes():
    x = floats(2, 3, 4)

    def build(net, t):
        layer = net.network.add_shuffle(t)
        layer.first_transpose = (1, 0, 2)  # [3, 2, 4]
        layer.reshape_dims = (0, -1)  # 0 copies dim 0 (3), -1 is inferred (8)
        layer.second_transpose = (1, 0)  # [8, 3]
        return layer.get_output(0)

    out = run_one(build, x)
    first = [[[x[j, i, k] for k in range(4)] for j in range(2)] for i in range(3)]  # [3, 2, 4]
    reshaped = [[first[i][m // 4][m % 4] for m in range(8)] for i in range(3)]  # [3, 8]
    expected = [[reshaped[i][m] for i in range(3)] for m in range(8)]  # [8, 3]
    np.testing.assert_array_equal(out, np.array(expected))


def test_shuffle_reshape_only_keeps_row_major_order():
    x = floats(2, 6)

    def build(net, t):
        layer = net.network.add_shuffle(t)
        layer.reshape_dims = (3, 1, 4)
        return layer.get_output(0)

    out = run_one(build, x)
    flat = [x[i, j] for i in range(2) for j in range(6)]
    expected = [[[flat[a * 4 + c] for c in range(4)]] for a in range(3)]
    np.testing.assert_array_equal(out, np.array(expected))


def test_slice_start_shape_stride():
    x = floats(4, 7)
    out = run_one(lambda net, t: net.network.add_slice(t, (1, 0), (2, 3), (2, 3)).get_output(0), x)
    expected = [[x[1 + 2 * i, 0 + 3 * j] for j in range(3)] for i in range(2)]
    np.testing.assert_array_equal(out, np.array(expected))


def test_slice_out_of_bounds_is_an_error():
    with pytest.raises(ExecutorError, match="slice"):
        run_one(
            lambda net, t: net.network.add_slice(t, (0, 5), (2, 2), (1, 1)).get_output(0),
            floats(2, 6),
        )


def test_slice_fill_mode_pads_with_the_fill_value():
    """FILL reads the fill value (input 4) where an index falls outside the input."""
    x = floats(2, 5)

    def build(net, t):
        layer = net.network.add_slice(t, (0, -1), (3, 8), (1, 1))
        layer.mode = trt.SampleMode.FILL
        layer.set_input(4, net.const(np.array(-7.5, np.float32), "fill"))
        return layer.get_output(0)

    expected = np.full((3, 8), -7.5, np.float32)
    expected[:2, 1:6] = x
    np.testing.assert_array_equal(run_one(build, x), expected)


def test_slice_fill_mode_defaults_to_zero():
    x = floats(3)

    def build(net, t):
        layer = net.network.add_slice(t, (1,), (4,), (1,))
        layer.mode = trt.SampleMode.FILL
        return layer.get_output(0)

    np.testing.assert_array_equal(run_one(build, x), [x[1], x[2], 0.0, 0.0])


def test_slice_with_explicit_axes_is_refused():
    """With axes set, start/size/stride apply to those axes only; not implemented, so an error."""

    def build(net, t):
        layer = net.network.add_slice(t, (1,), (2,), (1,))
        layer.axes = (2,)
        return layer.get_output(0)

    with pytest.raises(ExecutorError, match="explicit axes are not implemented"):
        run_one(build, floats(4, 3, 4))


def test_slice_with_dynamic_size_from_shape_and_concatenation():
    """Columns [2, 5) of every row; the leading size comes from the input's runtime shape.

    The size input is attached with set_input after the slice is defined."""
    net = Net()
    x = net.input("x", np.float32, (-1, -1, 8))
    layer = net.network.add_slice(x, (0, 0, 2), (1, 1, 1), (1, 1, 1))
    shape = net.network.add_shape(x).get_output(0)
    lead = net.network.add_slice(shape, (0,), (2,), (1,)).get_output(0)
    width = net.const(np.array([3], dtype=np.int64), "width")
    size = net.network.add_concatenation([lead, width]).get_output(0)
    layer.set_input(2, size)
    net.output(layer.get_output(0))
    for b, s in [(1, 1), (2, 3)]:
        data = floats(b, s, 8)
        out = net.run({"x": data})["out"]
        expected = [[[data[i, j, 2 + k] for k in range(3)] for j in range(s)] for i in range(b)]
        np.testing.assert_array_equal(out, np.array(expected).reshape(b, s, 3))


# Gather ---------------------------------------------------------------------------------------
def test_gather_axis0_with_2d_indices():
    data = floats(5, 3)
    indices = np.array([[4, 0], [2, 2]], dtype=np.int32)
    out = run_one(lambda net, d, i: net.network.add_gather(d, i, 0).get_output(0), data, indices)
    expected = [[[data[indices[a, b], c] for c in range(3)] for b in range(2)] for a in range(2)]
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, np.array(expected))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_gather_middle_axis(index_dtype):
    data = floats(2, 4, 3)
    indices = np.array([3, 1, 3], dtype=index_dtype)
    out = run_one(lambda net, d, i: net.network.add_gather(d, i, 1).get_output(0), data, indices)
    # output shape [a0, i0, a2]
    expected = [[[data[a, indices[t], c] for c in range(3)] for t in range(3)] for a in range(2)]
    np.testing.assert_array_equal(out, np.array(expected))


def test_gather_with_one_elementwise_dim():
    data = floats(2, 4, 3)
    indices = np.array([[0, 3, 3], [1, 2, 0]], dtype=np.int32)

    def build(net, d, i):
        layer = net.network.add_gather(d, i, 1)
        layer.num_elementwise_dims = 1
        return layer.get_output(0)

    out = run_one(build, data, indices)
    # output shape [a0, i1, a2]: row b gathers from data[b] with indices[b]
    expected = [[[data[b, indices[b, t], c] for c in range(3)] for t in range(3)] for b in range(2)]
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, np.array(expected))


def test_gather_one_index_per_sequence():
    """The decoder's last-token pick: data [B, S, D], indices [B], axis 1, one elementwise dim."""
    data = floats(3, 4, 2)
    indices = np.array([3, 0, 2], dtype=np.int32)

    def build(net, d, i):
        layer = net.network.add_gather(d, i, 1)
        layer.num_elementwise_dims = 1
        return layer.get_output(0)

    out = run_one(build, data, indices)
    expected = [[data[b, indices[b], c] for c in range(2)] for b in range(3)]
    np.testing.assert_array_equal(out, np.array(expected))


def test_gather_index_out_of_range_is_an_error():
    data, indices = floats(5, 3), np.array([1, 5], dtype=np.int32)
    with pytest.raises(ExecutorError, match="out of range"):
        run_one(lambda net, d, i: net.network.add_gather(d, i, 0).get_output(0), data, indices)


def test_select_broadcasts_condition():
    cond = np.array([[True], [False]])
    a, b = floats(2, 3), floats(2, 3)
    out = run_one(lambda net, c, x, y: net.network.add_select(c, x, y).get_output(0), cond, a, b)
    expected = [[a[i, j] if cond[i, 0] else b[i, j] for j in range(3)] for i in range(2)]
    np.testing.assert_array_equal(out, np.array(expected))


# KV cache update ------------------------------------------------------------------------------
def kv_cache_network(index_dtype):
    net = Net()
    cache = net.input("cache", np.float32, (-1, 2, 6, 3))  # static sequence length 6
    update = net.input("update", np.float32, (-1, 2, -1, 3))
    write = net.input("write", index_dtype, (-1,))
    layer = net.network.add_kv_cache_update(cache, update, write, trt.KVCacheMode.LINEAR)
    net.output(layer.get_output(0), "present")
    return net


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_kv_cache_update_writes_in_place(index_dtype):
    net = kv_cache_network(index_dtype)
    cache = floats(2, 2, 6, 3)
    before = cache.copy()
    update = floats(2, 2, 2, 3)
    write = np.array([1, 4], dtype=index_dtype)
    out = net.run({"cache": cache, "update": update, "write": write})["present"]
    expected = before.copy()
    for i, n, s, h in np.ndindex(update.shape):
        expected[i, n, write[i] + s, h] = update[i, n, s, h]
    np.testing.assert_array_equal(out, expected)
    assert np.shares_memory(out, cache)  # the output is the cache itself
    np.testing.assert_array_equal(cache, expected)


def test_kv_cache_update_beyond_the_cache_is_an_error():
    net = kv_cache_network(np.int32)
    feeds = {
        "cache": floats(1, 2, 6, 3),
        "update": floats(1, 2, 2, 3),
        "write": np.array([5], dtype=np.int32),  # slots 5 and 6 of a 6-slot cache
    }
    with pytest.raises(ExecutorError, match="beyond the cache length 6"):
        net.run(feeds)


def test_kv_cache_packed_update_is_refused():
    net = Net()
    cache = net.input("cache", np.float32, (2, 2, 6, 3))
    update = net.input("update", np.float32, (3, 2, 3))  # [tokens, N, H]
    write = net.input("write", np.int32, (2,))
    layer = net.network.add_kv_cache_update(cache, update, write, trt.KVCacheMode.LINEAR)
    layer.update_form = trt.AttentionIOForm.PACKED_NHD
    layer.update_lengths = net.input("lengths", np.int32, (3,))
    net.output(layer.get_output(0), "present")
    feeds = {
        "cache": floats(2, 2, 6, 3),
        "update": floats(3, 2, 3),
        "write": np.array([0, 2], dtype=np.int32),
        "lengths": np.array([0, 1, 3], dtype=np.int32),
    }
    with pytest.raises(ExecutorError, match="only the padded"):
        net.run(feeds)


# Rotary embedding -----------------------------------------------------------------------------
def rotary_loops(x, cos, sin, positions, interleaved, rot_dim):
    """Each pair (a, b) of the first rot_dim elements -> (a cos - b sin, b cos + a sin)."""
    batch, heads, seq, head_dim = x.shape
    rot = rot_dim or head_dim
    out = x.astype(np.float64)
    for b, n, s in itertools.product(range(batch), range(heads), range(seq)):
        row = positions[b, s] if positions is not None else None
        for i in range(rot // 2):
            c = cos[row, i] if row is not None else cos[b, s, i]
            sn = sin[row, i] if row is not None else sin[b, s, i]
            ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
            first, second = float(x[b, n, s, ia]), float(x[b, n, s, ib])
            out[b, n, s, ia] = first * c - second * sn
            out[b, n, s, ib] = second * c + first * sn
    return out


@pytest.mark.parametrize("rot_dim", [0, 4])
@pytest.mark.parametrize("with_positions", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding(interleaved, with_positions, rot_dim):
    batch, heads, seq, head_dim = 2, 3, 4, 8
    half = (rot_dim or head_dim) // 2
    x = floats(batch, heads, seq, head_dim)
    angles = rng.uniform(-3, 3, (10, half) if with_positions else (batch, seq, half))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = np.array([[0, 1, 2, 3], [5, 6, 7, 9]], dtype=np.int64) if with_positions else None

    net = Net()
    t = net.input("x", np.float32, x.shape)
    layer = net.network.add_rotary_embedding(
        t, net.const(cos, "cos"), net.const(sin, "sin"), interleaved, rot_dim
    )
    feeds = {"x": x}
    if with_positions:
        layer.set_input(3, net.input("positions", np.int64, positions.shape))
        feeds["positions"] = positions
    net.output(layer.get_output(0))
    out = net.run(feeds)["out"]
    expected = rotary_loops(x, cos, sin, positions, interleaved, rot_dim)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if rot_dim:  # the tail beyond rotaryEmbeddingDim passes through untouched
        np.testing.assert_array_equal(out[..., rot_dim:], x[..., rot_dim:])


# Attention ------------------------------------------------------------------------------------
def attention_loops(q, k, v, mask=None, causal=None, softmax=True):
    """softmax(Q Kᵀ (+ mask)) V per query head, no scale; query head n reads kv head n // group."""
    batch, nq, sq, head_dim = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    group = nq // nkv
    out = np.zeros(q.shape)
    for b, n, i in itertools.product(range(batch), range(nq), range(sq)):
        kv = n // group
        weights = []
        for j in range(skv):
            score = sum(float(q[b, n, i, h]) * float(k[b, kv, j, h]) for h in range(head_dim))
            visible = True
            if causal == "LOWER_RIGHT":
                visible = j <= i + (skv - sq)
            elif causal == "UPPER_LEFT":
                visible = j <= i
            if mask is not None:
                m = mask[(*broadcast_index((b, n), mask.shape[:2]), i, j)]
                if mask.dtype == np.bool_:
                    visible = visible and bool(m)
                else:
                    score += float(m)
            weights.append(score if visible else None)
        if softmax:
            top = max(w for w in weights if w is not None)
            exps = [math.exp(w - top) if w is not None else 0.0 for w in weights]
            weights = [e / sum(exps) for e in exps]
        for j, w in enumerate(weights):
            out[b, n, i] += w * v[b, kv, j].astype(np.float64)
    return out


def run_attention(q, k, v, mask=None, causal="NONE", norm="SOFTMAX"):
    net = Net()
    tensors = [net.input(name, a.dtype, a.shape) for name, a in zip("qkv", (q, k, v))]
    attn = net.network.add_attention_v2(
        *tensors,
        getattr(trt.AttentionNormalizationOp, norm),
        getattr(trt.CausalMaskKind, causal),
    )
    feeds = dict(zip("qkv", (q, k, v)))
    if mask is not None:
        attn.mask = net.input("mask", mask.dtype, mask.shape)
        feeds["mask"] = mask
    net.output(attn.get_output(0))
    return net.run(feeds)["out"]


def qkv(batch=2, nq=4, nkv=2, sq=3, skv=5, head_dim=4):
    return (
        floats(batch, nq, sq, head_dim),
        floats(batch, nkv, skv, head_dim),
        floats(batch, nkv, skv, head_dim),
    )


@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_attention_gqa_without_mask_applies_no_scale(nkv):
    q, k, v = qkv(nkv=nkv)
    out = run_attention(q, k, v)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, attention_loops(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(1, 1, 3, 5), (2, 1, 3, 5), (2, 4, 3, 5)])
def test_attention_bool_mask_true_may_attend(mask_shape):
    q, k, v = qkv()
    mask = rng.random(mask_shape) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    out = run_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, attention_loops(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)


def test_attention_float_mask_is_added():
    q, k, v = qkv()
    mask = floats(1, 4, 3, 5, low=-3.0, high=1.0)
    out = run_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, attention_loops(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", ["LOWER_RIGHT", "UPPER_LEFT"])
def test_attention_causal(causal):
    q, k, v = qkv(sq=3, skv=5)
    out = run_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, attention_loops(q, k, v, causal=causal), rtol=1e-5, atol=1e-6)


def test_attention_legacy_causal_flag_is_upper_left():
    q, k, v = qkv(sq=3, skv=5)
    net = Net()
    tensors = [net.input(name, a.dtype, a.shape) for name, a in zip("qkv", (q, k, v))]
    attn = net.network.add_attention(*tensors, trt.AttentionNormalizationOp.SOFTMAX, True)
    net.output(attn.get_output(0))
    out = net.run(dict(zip("qkv", (q, k, v))))["out"]
    expected = attention_loops(q, k, v, causal="UPPER_LEFT")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_attention_without_normalization_is_plain_qk_v():
    q, k, v = qkv()
    out = run_attention(q, k, v, norm="NONE")
    np.testing.assert_allclose(out, attention_loops(q, k, v, softmax=False), rtol=1e-5, atol=1e-5)


# Executor errors ------------------------------------------------------------------------------
def relu_network():
    net = Net()
    x = net.input("x", np.float32, (-1, 3))
    net.output(net.network.add_activation(x, trt.ActivationType.RELU).get_output(0))
    return net


def test_missing_feed():
    with pytest.raises(ExecutorError, match=re.escape("input 'x' was not fed.")):
        relu_network().run({})


def test_wrong_feed_dtype():
    with pytest.raises(ExecutorError, match=re.escape("input 'x' must be float32, got float64.")):
        relu_network().run({"x": np.zeros((2, 3))})


def test_wrong_static_dimension():
    message = "input 'x' has shape (2, 4); the network declares (-1, 3)."
    with pytest.raises(ExecutorError, match=re.escape(message)):
        relu_network().run({"x": np.zeros((2, 4), dtype=np.float32)})


def test_feeds_must_fit_an_optimization_profile():
    net = relu_network()
    profiles = [Profile("small", {"x": ((1, 3), (2, 3), (4, 3))})]
    out = net.run({"x": -np.ones((4, 3), dtype=np.float32)}, profiles=profiles)["out"]
    assert out.tolist() == [[0.0] * 3] * 4
    message = "the feeds (x (5, 3)) fit no optimization profile (small: x (1, 3)..(4, 3))."
    with pytest.raises(ExecutorError, match=re.escape(message)):
        net.run({"x": np.zeros((5, 3), dtype=np.float32)}, profiles=profiles)


def test_bf16_constant_needs_its_array():
    net = Net()
    net.output(net.const(np.ones((2, 2), dtype=BF16), "w"))
    net.constants.clear()
    message = "constant 'w' (bfloat16) cannot be read back from the bindings; pass its array in `constants`."
    with pytest.raises(ExecutorError, match=re.escape(message)):
        net.run({})


@pytest.mark.parametrize("kind", ["PADDING", "NON_ZERO"])
def test_unsupported_layer_is_named(kind):
    net = Net()
    x = net.input("x", np.float32, (2, 4))
    if kind == "PADDING":
        layer = net.network.add_padding_nd(x, (0, 1), (0, 1))
    else:
        layer = net.network.add_non_zero(x)
    layer.name = "odd"
    net.output(layer.get_output(0))
    message = f"layer 'odd' has type {kind}, which the reference executor does not implement."
    with pytest.raises(ExecutorError, match=re.escape(message)):
        net.run({"x": floats(2, 4)})
