"""A NumPy executor of a TensorRT `INetworkDefinition`: the CPU backend and the numerics oracle.

It walks the very network netdef builds, layer by layer, and gives each layer the semantics
the TensorRT operator documentation states. Floating-point layers compute in float32 and
round once to the layer's output type (bfloat16 through `ml_dtypes`, round-to-nearest-even),
as GPU kernels that accumulate in float32 do. Matrix multiplies accumulate in float64 and
round to float32: their results then do not depend on BLAS blocking or on the layout a
weight is stored in (with float32 accumulation, storing weights [in, out] moved a few bf16
roundings and with them Gemma-3-270M's largest bf16 logit error by 40%). A layer type or mode it does not implement is an error,
never a silent approximation. Quantize and Dequantize follow TensorRT's explicit
quantization (netdef.quant holds the formulas): per-tensor, per-channel and block scales,
INT8, INT4 and FP8 E4M3; INT4 constants are read packed two per byte, as TensorRT reads them.
A Dequantize rounds its product to its output type, as the network states; a GEMM that
TensorRT fuses with it may keep that product in float32.

    from runtime.reference import run_network
    outputs = run_network(decoder_network, {"input_ids": ids, ...})   # name -> array
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from netdef.contract import TENSOR_DTYPES, dtype_name
from netdef.options import Profile
from netdef.quant import FP8, INT4, INT8, dequantize, quantize, unpack_int4
from netdef.tensorrt_module import load_tensorrt


class ExecutorError(RuntimeError):
    """The network or its feeds cannot be executed as given."""


def run_network(
    network: Any,
    feeds: Mapping[str, np.ndarray],
    profiles: list[Profile] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Execute `network` on `feeds` and return every network output by name.

    `network` is a `netdef.DecoderNetwork` (its profiles and weights are used) or a plain
    `INetworkDefinition`. The first profile whose shape ranges contain the feeds is chosen;
    feeds that fit none, or that contradict the declared shapes or types, are an error.
    KV-cache updates happen in place in the fed cache arrays, as on the GPU, where the
    present outputs alias the past inputs.
    """
    return Executor.for_network(network, profiles, constants).run(feeds)


def _topological(layers: list[Any]) -> list[Any]:
    """Layers in an order where each runs after the producers of its inputs.

    Definition order is not enough: an input may be attached after a layer is added
    (`set_input`, `IAttention.mask`)."""
    producer = {
        layer.get_output(i).name: n
        for n, layer in enumerate(layers)
        for i in range(layer.num_outputs)
    }
    order, state = [], [0] * len(layers)  # 0 new, 1 visiting, 2 done
    for root in range(len(layers)):
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if expanded:
                state[n] = 2
                order.append(layers[n])
                continue
            if state[n]:
                continue
            state[n] = 1
            stack.append((n, True))
            for i in range(layers[n].num_inputs):
                t = layers[n].get_input(i)
                dep = producer.get(t.name) if t is not None else None
                if dep is not None and state[dep] == 0:
                    stack.append((dep, False))
    return order


def numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of a TensorRT DataType (netdef.contract's table)."""
    if dtype_name(dtype) not in TENSOR_DTYPES:
        raise ExecutorError(f"tensor type {dtype} is not supported by the reference executor.")
    return TENSOR_DTYPES[dtype_name(dtype)]


def _f32(x: np.ndarray) -> np.ndarray:
    return (
        x.astype(np.float32, copy=False)
        if x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16
        else x
    )


def _best_k(key: np.ndarray, k: int, nan_first: bool) -> np.ndarray:
    """Indices of the k smallest entries of a 1-D `key`, ascending, ties in index order.
    NaN ranks before (`nan_first`) or after every number, NaNs in index order: a float16
    overflow's NaN logits then come out as values, as the engine's do, not as an error."""
    nan = np.isnan(key) if key.dtype.kind == "f" else None
    if nan is not None and nan.any():  # rare: sort the whole line
        return np.lexsort((np.where(nan, 0, key), ~nan if nan_first else nan))[:k]
    if k >= key.size:
        return np.argsort(key, kind="stable")
    kth = np.partition(key, k - 1)[k - 1]
    below = np.flatnonzero(key < kth)
    chosen = np.concatenate([below, np.flatnonzero(key == kth)[: k - below.size]])
    return chosen[np.lexsort((chosen, key[chosen]))]


def _address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


class Executor:
    """Prepared once per network (layer classes, constants in float32); `run` per call."""

    def __init__(
        self,
        network: Any,
        profiles: list[Profile] | None,
        constants: Mapping[str, np.ndarray] | None,
    ):
        # The module that made the network (its bindings live in <module>_bindings).
        self.trt = load_tensorrt(type(network).__module__.split(".")[0].removesuffix("_bindings"))
        self.network = network
        self.profiles = profiles or []
        layers = _topological([network.get_layer(i) for i in range(network.num_layers)])
        self.kinds = [
            layer.type for layer in layers
        ]  # before _typed: IActivationLayer.type shadows it
        self.layers = [self._typed(layer) for layer in layers]
        # Each layer's input names and output (name, type), read from the bindings once.
        self.wiring = [
            (
                [
                    t.name if (t := layer.get_input(i)) is not None else None
                    for i in range(layer.num_inputs)
                ],
                [
                    (out.name, numpy_dtype(out.dtype))
                    for out in map(layer.get_output, range(layer.num_outputs))
                ],
            )
            for layer in self.layers
        ]
        self.inputs = [network.get_input(i) for i in range(network.num_inputs)]
        self.outputs = [network.get_output(i) for i in range(network.num_outputs)]
        self.output_names = {t.name for t in self.outputs}
        self.constants = {
            layer.name: self._constant(layer, constants or {})
            for layer, kind in zip(self.layers, self.kinds)
            if kind == self.trt.LayerType.CONSTANT
        }
        # Matmul weights converted to float64 once, not on every call. Keyed by memory address,
        # so reshaped views of a constant (the tied LM head) find it too.
        self._weight_f64 = {
            _address(array): array.astype(np.float64).ravel()
            for array in self.constants.values()
            if array.ndim >= 2 and _is_float(array.dtype)
        }

    @classmethod
    def for_network(cls, network: Any, profiles=None, constants=None) -> Executor:
        if hasattr(network, "network"):  # a DecoderNetwork: reuse its prepared executor
            cached = getattr(network, "_executor", None)
            if cached is None:
                cached = cls(network.network, network.profiles, network.graph.constants)
                network._executor = cached
            return cached
        return cls(network, profiles, constants)

    # Preparation -------------------------------------------------------------------------------
    def _typed(self, layer: Any) -> Any:
        """Give the plain `ILayer` from get_layer() its concrete class, exposing its attributes."""
        T = self.trt.LayerType
        classes = {
            T.ACTIVATION: "IActivationLayer",
            T.CAST: "ICastLayer",
            T.CONCATENATION: "IConcatenationLayer",
            T.CONSTANT: "IConstantLayer",
            T.ELEMENTWISE: "IElementWiseLayer",
            T.GATHER: "IGatherLayer",
            T.IDENTITY: "IIdentityLayer",
            T.MATRIX_MULTIPLY: "IMatrixMultiplyLayer",
            T.REDUCE: "IReduceLayer",
            T.SHAPE: "IShapeLayer",
            T.SHUFFLE: "IShuffleLayer",
            T.SLICE: "ISliceLayer",
            T.UNARY: "IUnaryLayer",
            T.ROTARY_EMBEDDING: "IRotaryEmbeddingLayer",
            T.KV_CACHE_UPDATE: "IKVCacheUpdateLayer",
            T.ATTENTION_INPUT: "IAttentionInputLayer",
            T.ATTENTION_OUTPUT: "IAttentionOutputLayer",
            T.SOFTMAX: "ISoftMaxLayer",
            T.TOPK: "ITopKLayer",
            T.SELECT: "ISelectLayer",
            T.QUANTIZE: "IQuantizeLayer",
            T.DEQUANTIZE: "IDequantizeLayer",
        }
        if layer.type not in classes:
            raise ExecutorError(
                f"layer {layer.name!r} has type {layer.type.name}, which the reference executor does not implement."
            )
        layer.__class__ = getattr(self.trt, classes[layer.type])
        return layer

    def _constant(self, layer: Any, constants: Mapping[str, np.ndarray]) -> np.ndarray:
        out_dtype = numpy_dtype(layer.get_output(0).dtype)
        shape = tuple(layer.shape)
        if layer.name in constants:
            array = np.asarray(constants[layer.name])
        else:
            try:
                array = np.asarray(layer.weights)
                if array.dtype == object:  # what the bindings give for bfloat16 weights
                    raise TypeError(f"{out_dtype} weights come back as {array!r}")
            except (TypeError, AttributeError) as e:
                raise ExecutorError(
                    f"constant {layer.name!r} ({out_dtype}) cannot be read back from the bindings; "
                    "pass its array in `constants`."
                ) from e
        count = int(np.prod(shape))
        if out_dtype == INT4 and array.dtype == np.uint8 and array.size == (count + 1) // 2:
            array = unpack_int4(array, count)  # TensorRT's packing, two values per byte
        if array.dtype != out_dtype or array.size != count:
            raise ExecutorError(
                f"constant {layer.name!r}: array {array.dtype}{array.shape} does not match {out_dtype}{shape}."
            )
        return array.reshape(shape)

    # Feeds and profiles ------------------------------------------------------------------------
    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        for t in self.inputs:
            if t.name not in feeds:
                raise ExecutorError(f"input {t.name!r} was not fed.")
            x = feeds[t.name]
            want = numpy_dtype(t.dtype)
            if x.dtype != want:
                raise ExecutorError(f"input {t.name!r} must be {want}, got {x.dtype}.")
            declared = tuple(t.shape)
            if len(declared) != x.ndim or any(d not in (-1, n) for d, n in zip(declared, x.shape)):
                raise ExecutorError(
                    f"input {t.name!r} has shape {x.shape}; the network declares {declared}."
                )
        if not self.profiles:
            return
        for profile in self.profiles:
            if all(
                all(lo <= n <= hi for lo, n, hi in zip(ranges[0], feeds[name].shape, ranges[2]))
                for name, ranges in profile.shapes.items()
            ):
                return
        described = "; ".join(
            f"{p.name}: " + ", ".join(f"{n} {r[0]}..{r[2]}" for n, r in list(p.shapes.items())[:2])
            for p in self.profiles
        )
        shapes = ", ".join(f"{n} {feeds[n].shape}" for n in list(self.profiles[0].shapes)[:2])
        raise ExecutorError(f"the feeds ({shapes}) fit no optimization profile ({described}).")

    # Execution ---------------------------------------------------------------------------------
    def run(
        self, feeds: Mapping[str, np.ndarray], extra: Iterable[str] = ()
    ) -> dict[str, np.ndarray]:
        """Every network output by name, and the intermediate tensors named in `extra`."""
        self._check_feeds(feeds)
        env: dict[str, np.ndarray] = {t.name: feeds[t.name] for t in self.inputs}
        T = self.trt.LayerType
        handlers: dict[Any, Callable[[Any, list], list[np.ndarray]]] = {
            T.CONSTANT: lambda layer, _: [self.constants[layer.name]],
            T.ACTIVATION: self._activation,
            T.CAST: self._cast,
            T.IDENTITY: self._cast,
            T.CONCATENATION: self._concatenation,
            T.ELEMENTWISE: self._elementwise,
            T.GATHER: self._gather,
            T.MATRIX_MULTIPLY: self._matmul,
            T.REDUCE: self._reduce,
            T.SHAPE: self._shape,
            T.SHUFFLE: self._shuffle,
            T.SLICE: self._slice,
            T.UNARY: self._unary,
            T.SOFTMAX: self._softmax,
            T.SELECT: self._select,
            T.TOPK: self._topk,
            T.ROTARY_EMBEDDING: self._rotary,
            T.KV_CACHE_UPDATE: self._kv_cache_update,
            T.ATTENTION_INPUT: self._attention,
            T.ATTENTION_OUTPUT: self._attention_output,
            T.QUANTIZE: self._quantize,
            T.DEQUANTIZE: self._dequantize,
        }
        self._pending: dict[str, np.ndarray] = {}
        for layer, kind, (input_names, outs) in zip(self.layers, self.kinds, self.wiring):
            inputs = [None if name is None else env[name] for name in input_names]
            try:
                results = handlers[kind](layer, inputs)
            except ExecutorError:
                raise
            except Exception as e:
                raise ExecutorError(
                    f"layer {layer.name!r} ({kind.name}) failed: {e}; the reference executor "
                    "(runtime/reference.py) should run every layer it accepts: please report it."
                ) from e
            for (name, want), value in zip(outs, results):
                env[name] = value if value.dtype == want else value.astype(want)
        outputs = {t.name: env[t.name] for t in self.outputs}
        for name in extra:
            if name not in env:
                raise ExecutorError(f"the network has no tensor named {name!r}.")
            outputs[name] = env[name]
        return outputs

    def _as_f64(self, x: np.ndarray) -> np.ndarray:
        cached = self._weight_f64.get(_address(x)) if x.flags.c_contiguous else None
        if cached is not None and cached.size == x.size:
            return cached.reshape(x.shape)
        return x.astype(np.float64)

    def _out(self, layer: Any) -> np.dtype:
        return numpy_dtype(layer.get_output(0).dtype)

    # Layers (each follows the TensorRT operator page of the same name) --------------------------
    def _activation(self, layer, inputs):
        x = _f32(inputs[0])
        A = self.trt.ActivationType
        kinds = {
            A.RELU: lambda v: np.maximum(v, 0),
            A.SIGMOID: lambda v: 1 / (1 + np.exp(-v)),
            A.TANH: np.tanh,
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            A.GELU_TANH: lambda v: (
                0.5
                * v
                * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (v + np.float32(0.044715) * v**3)))
            ),
        }
        act = layer.type  # IActivationLayer.type is the activation kind
        if act not in kinds:
            raise ExecutorError(
                f"activation {act.name} in {layer.name!r} is not implemented by the reference executor."
            )
        return [kinds[act](x).astype(np.float32)]

    def _cast(self, layer, inputs):
        x, want = inputs[0], self._out(layer)
        if _is_float(x.dtype) and not _is_float(want) and want != np.bool_:
            raise ExecutorError(f"cast {layer.name!r} from float to {want} is not implemented.")
        return [x.astype(want)]

    def _concatenation(self, layer, inputs):
        return [np.concatenate(inputs, axis=layer.axis)]

    def _elementwise(self, layer, inputs):
        a, b = inputs
        if a.ndim != b.ndim:
            raise ExecutorError(
                f"elementwise {layer.name!r}: operands of rank {a.ndim} and {b.ndim} (TensorRT needs equal ranks)."
            )
        E = self.trt.ElementWiseOperation
        op = layer.op
        if op in (E.AND, E.OR, E.XOR):
            fn = {E.AND: np.logical_and, E.OR: np.logical_or, E.XOR: np.logical_xor}[op]
            return [fn(a, b)]
        if op in (E.EQUAL, E.GREATER, E.LESS):
            fn = {E.EQUAL: np.equal, E.GREATER: np.greater, E.LESS: np.less}[op]
            return [fn(_f32(a), _f32(b))]
        if _is_float(a.dtype):
            a, b = _f32(a), _f32(b)
        elif op in (E.DIV, E.POW):
            raise ExecutorError(
                f"integer {op.name} in {layer.name!r} is not implemented by the reference executor."
            )
        fns = {
            E.SUM: np.add,
            E.PROD: np.multiply,
            E.MAX: np.maximum,
            E.MIN: np.minimum,
            E.SUB: np.subtract,
            E.DIV: np.divide,
            E.POW: np.power,
            E.FLOOR_DIV: np.floor_divide,
        }
        return [fns[op](a, b)]

    def _gather(self, layer, inputs):
        data, indices = inputs
        if layer.mode != self.trt.GatherMode.DEFAULT:
            raise ExecutorError(
                f"gather {layer.name!r}: mode {layer.mode.name} is not implemented."
            )
        axis = layer.axis
        if indices.size and (indices.min() < 0 or indices.max() >= data.shape[axis]):
            raise ExecutorError(
                f"gather {layer.name!r}: index out of range [0, {data.shape[axis]}) "
                f"(min {indices.min()}, max {indices.max()})."
            )
        if layer.num_elementwise_dims == 0:
            return [np.take(data, indices, axis=axis)]
        # One leading elementwise dim: output[b, ...] gathers data[b] with indices[b].
        n = max(data.shape[0], indices.shape[0])
        parts = [
            np.take(
                data[b if data.shape[0] > 1 else 0],
                indices[b if indices.shape[0] > 1 else 0],
                axis=axis - 1,
            )
            for b in range(n)
        ]
        return [np.stack(parts)]

    def _matmul(self, layer, inputs):
        M = self.trt.MatrixOperation
        a, b = (self._as_f64(x) for x in inputs)
        ops = (layer.op0, layer.op1)
        if M.VECTOR in ops:
            raise ExecutorError(
                f"matrix multiply {layer.name!r}: VECTOR operands are not implemented."
            )
        if ops[0] == M.TRANSPOSE:
            a = np.swapaxes(a, -1, -2)
        if ops[1] == M.TRANSPOSE:
            b = np.swapaxes(b, -1, -2)
        return [np.matmul(a, b).astype(np.float32)]

    def _reduce(self, layer, inputs):
        x = _f32(inputs[0])
        axes = tuple(i for i in range(x.ndim) if layer.axes >> i & 1)
        R = self.trt.ReduceOperation
        fns = {R.SUM: np.sum, R.PROD: np.prod, R.MAX: np.max, R.MIN: np.min, R.AVG: np.mean}
        return [fns[layer.op](x, axis=axes, keepdims=layer.keep_dims)]

    def _shape(self, layer, inputs):
        return [np.array(inputs[0].shape, dtype=np.int64)]

    def _shuffle(self, layer, inputs):
        if len(inputs) > 1 and inputs[1] is not None:
            raise ExecutorError(
                f"shuffle {layer.name!r}: a dynamic reshape input is not implemented."
            )
        x = np.transpose(inputs[0], tuple(layer.first_transpose)[: inputs[0].ndim])
        dims = layer.reshape_dims
        if dims is not None and len(dims) >= 0 and layer.get_output(0) is not None:
            dims = tuple(dims)
            if layer.zero_is_placeholder:
                dims = tuple(x.shape[i] if d == 0 else d for i, d in enumerate(dims))
            x = x.reshape(dims)
        return [np.transpose(x, tuple(layer.second_transpose)[: x.ndim])]

    def _slice(self, layer, inputs):
        """STRICT_BOUNDS reads inside the input only; FILL reads the fill value (input 4,
        default 0) where an index falls outside it."""
        x = inputs[0]
        M = self.trt.SampleMode
        if layer.mode not in (M.STRICT_BOUNDS, M.FILL):
            raise ExecutorError(f"slice {layer.name!r}: mode {layer.mode.name} is not implemented.")
        if getattr(layer, "axes", None) is not None or (len(inputs) > 5 and inputs[5] is not None):
            # start/size/stride would then apply to those axes only (Slice operator page).
            raise ExecutorError(f"slice {layer.name!r}: explicit axes are not implemented.")
        start = (
            tuple(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else tuple(layer.start)
        )
        size = tuple(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else tuple(layer.shape)
        stride = (
            tuple(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else tuple(layer.stride)
        )
        index = []
        for d, (s0, n, st) in enumerate(zip(start, size, stride)):
            last = s0 + (n - 1) * st
            if (
                layer.mode == M.STRICT_BOUNDS
                and n > 0
                and not (0 <= s0 < x.shape[d] and 0 <= last < x.shape[d])
            ):
                raise ExecutorError(
                    f"slice {layer.name!r}: dim {d} reads [{s0}, {last}] of {x.shape[d]}."
                )
            index.append(np.arange(n) * st + s0)
        if layer.mode == M.STRICT_BOUNDS:
            return [x[np.ix_(*index)]]
        fill = inputs[4] if len(inputs) > 4 and inputs[4] is not None else np.zeros((), x.dtype)
        inside = np.ones([len(i) for i in index], bool)
        for d, (i, n) in enumerate(zip(index, x.shape)):
            inside &= ((i >= 0) & (i < n)).reshape([-1 if e == d else 1 for e in range(x.ndim)])
        clipped = [np.clip(i, 0, n - 1) for i, n in zip(index, x.shape)]
        return [np.where(inside, x[np.ix_(*clipped)], np.asarray(fill, x.dtype))]

    def _unary(self, layer, inputs):
        x = inputs[0]
        U = self.trt.UnaryOperation
        if layer.op == U.NOT:
            return [np.logical_not(x)]
        x = _f32(x)
        fns = {
            U.EXP: np.exp,
            U.LOG: np.log,
            U.SQRT: np.sqrt,
            U.RECIP: np.reciprocal,
            U.ABS: np.abs,
            U.NEG: np.negative,
            U.SIN: np.sin,
            U.COS: np.cos,
            U.FLOOR: np.floor,
            U.CEIL: np.ceil,
        }
        if layer.op not in fns:
            raise ExecutorError(
                f"unary {layer.op.name} in {layer.name!r} is not implemented by the reference executor."
            )
        return [fns[layer.op](x)]

    def _softmax(self, layer, inputs):
        x = _f32(inputs[0])
        axes = tuple(i for i in range(x.ndim) if layer.axes >> i & 1)
        e = np.exp(x - x.max(axis=axes, keepdims=True))
        return [e / e.sum(axis=axes, keepdims=True)]

    def _topk(self, layer, inputs):
        """The k largest (MAX) or smallest (MIN) values along one axis, sorted, with their
        int32 indices; equal values keep index order. NaN ranks above every number (first
        for MAX, last for MIN), as torch.topk and np.sort rank it: TensorRT's operator page
        does not say, and a NaN must still yield k values (`_best_k`)."""
        x = _f32(inputs[0])
        axes = [i for i in range(x.ndim) if layer.axes >> i & 1]
        if len(axes) != 1:
            raise ExecutorError(f"topk {layer.name!r}: exactly one reduction axis is supported.")
        axis, k = axes[0], layer.k
        largest = layer.op == self.trt.TopKOperation.MAX
        key = np.moveaxis(-x if largest else x, axis, -1)
        if k == 1 and not (key.dtype.kind == "f" and np.isnan(key).any()):
            index = key.argmin(axis=-1)[..., None]  # the first of equal values too
        else:  # the k best of each line without sorting all of it (a vocabulary is 262k wide)
            lines = key.reshape(-1, key.shape[-1])
            best = [_best_k(line, k, nan_first=largest) for line in lines]
            index = np.stack(best).reshape(*key.shape[:-1], k)
        index = np.moveaxis(index, -1, axis)
        return [np.take_along_axis(x, index, axis=axis), index.astype(np.int32)]

    def _select(self, layer, inputs):
        cond, a, b = inputs
        return [np.where(cond, a, b)]

    def _rotary(self, layer, inputs):
        # out = x * cos + rotate(x) * sin over pairs (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin).
        x, cos, sin = (_f32(v) for v in inputs[:3])
        positions = inputs[3] if len(inputs) > 3 else None
        if positions is not None:  # tables [max_pos + 1, d/2] indexed per token
            if positions.min() < 0 or positions.max() >= cos.shape[0]:
                raise ExecutorError(
                    f"rotary {layer.name!r}: position ids outside [0, {cos.shape[0]})."
                )
            cos, sin = cos[positions], sin[positions]  # [B, S, d/2]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads: [B, 1, S, d/2]
        rot = layer.rotary_embedding_dim or x.shape[-1]
        xr, rest = x[..., :rot], x[..., rot:]
        if layer.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
        else:
            x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
            out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return [np.concatenate([out, rest], axis=-1)]

    def _kv_cache_update(self, layer, inputs):
        cache, update, write_indices = inputs[:3]
        if layer.cache_mode != self.trt.KVCacheMode.LINEAR:
            raise ExecutorError(
                f"KV cache update {layer.name!r}: mode {layer.cache_mode.name} is not implemented."
            )
        form = getattr(layer, "update_form", None)  # with PACKED_NHD, update is [tokens, N, H]
        if form is not None and form != self.trt.AttentionIOForm.PADDED_BHND:
            raise ExecutorError(
                f"KV cache update {layer.name!r}: only the padded [B, N, S, H] update is implemented."
            )
        s = update.shape[2]
        for b, start in enumerate(write_indices.tolist()):
            if not 0 <= start <= cache.shape[2] - s:
                raise ExecutorError(
                    f"KV cache update {layer.name!r}: sequence {b} writes slots [{start}, {start + s}) "
                    f"beyond the cache length {cache.shape[2]}."
                )
            cache[b, :, start : start + s, :] = update[b]  # in place: the output aliases the input
        return [cache]

    def _attention(self, layer, inputs):
        """softmax(Q Kᵀ + mask) V with GQA; no scale (the network scales Q itself)."""
        attention = layer.attention
        if attention.key_value_lengths is not None or attention.query_lengths is not None:
            raise ExecutorError(f"attention {layer.name!r}: variable lengths are not implemented.")
        if attention.key_value_form != self.trt.AttentionIOForm.PADDED_BHND:
            raise ExecutorError(
                f"attention {layer.name!r}: only the padded [B, N, S, H] layout is implemented."
            )
        q, k, v = (_f32(x) for x in inputs[:3])
        mask = inputs[3] if len(inputs) > 3 else None  # the mask is the boundary layer's 4th input
        b, nq, sq, h = q.shape
        nkv, skv = k.shape[1], k.shape[2]
        if nq % nkv:
            raise ExecutorError(
                f"attention {layer.name!r}: {nq} query heads are not a multiple of {nkv} kv heads."
            )
        qg = q.reshape(b, nkv, nq // nkv, sq, h)
        scores = np.matmul(qg, np.swapaxes(k, -1, -2)[:, :, None])  # [B, Nkv, G, Sq, Skv]
        scores = scores.reshape(b, nq, sq, skv)
        C = self.trt.CausalMaskKind
        kind = attention.causal_kind
        if kind != C.NONE:
            i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
            visible = j <= i + (skv - sq) if kind == C.LOWER_RIGHT else j <= i
            scores = np.where(visible, scores, -np.inf)
        if mask is not None:
            scores = (
                np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f32(mask)
            )
        if attention.norm_op == self.trt.AttentionNormalizationOp.SOFTMAX:
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores = scores / scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores.reshape(b, nkv, nq // nkv, sq, skv), v[:, :, None])
        # The result belongs to the ATTENTION_OUTPUT boundary layer, which comes next.
        self._pending[attention.get_output(0).name] = out.reshape(b, nq, sq, h)
        return [np.empty(0, dtype=self._out(layer))] * layer.num_outputs

    def _attention_output(self, layer, inputs):
        return [self._pending.pop(layer.get_output(0).name)]

    def _quantize(self, layer, inputs):
        """clamp(round(x / scale)) into INT8, INT4 or FP8 (Quantize operator page)."""
        x, want = inputs[0], self._out(layer)
        if not _is_float(x.dtype) or want not in (INT8, INT4, FP8):
            raise ExecutorError(f"quantize {layer.name!r}: {x.dtype} to {want} is not a Quantize.")
        return [quantize(x, self._scale(layer, inputs, x.shape), want)]

    def _dequantize(self, layer, inputs):
        """q · scale, rounded once to the output type (Dequantize operator page)."""
        q, want = inputs[0], self._out(layer)
        if q.dtype not in (INT8, INT4, FP8) or not _is_float(want):
            raise ExecutorError(
                f"dequantize {layer.name!r}: {q.dtype} to {want} is not a Dequantize."
            )
        return [dequantize(q, self._scale(layer, inputs, q.shape), want)]

    def _scale(self, layer, inputs, shape: tuple[int, ...]) -> np.ndarray:
        """The scale input broadcast to `shape`: a scalar (or one value) per tensor, a 1-D scale
        along `axis` per channel, or a scale of the input's rank per block, where each block
        is `block_shape` (-1: the whole dimension), else the input's dims over the scale's."""
        scale = _f32(inputs[1])
        zero_point = inputs[2] if len(inputs) > 2 else None
        if zero_point is not None and np.any(zero_point.astype(np.float32) != 0):
            raise ExecutorError(
                f"{layer.name!r}: TensorRT quantization is symmetric (zero point 0)."
            )
        if np.any(scale <= 0):
            raise ExecutorError(f"{layer.name!r}: scales must be strictly positive.")
        if scale.size == 1 and scale.ndim <= 1:
            return scale.reshape(())
        if scale.ndim == 1:
            axis = layer.axis
            if not 0 <= axis < len(shape) or shape[axis] != scale.size:
                raise ExecutorError(
                    f"{layer.name!r}: per-channel scale of {scale.size} does not match axis "
                    f"{axis} of shape {shape}."
                )
            return scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
        if scale.ndim != len(shape):
            raise ExecutorError(
                f"{layer.name!r}: a scale of shape {scale.shape} fits no quantization of {shape}."
            )
        try:
            block = [n if b == -1 else b for b, n in zip(layer.block_shape, shape)]
        except RuntimeError:  # no block shape set: one block per scale element
            block = [n // max(s, 1) for n, s in zip(shape, scale.shape)]
        if any(b < 1 or n % b or n // b != s for n, b, s in zip(shape, block, scale.shape)):
            raise ExecutorError(
                f"{layer.name!r}: block scale {scale.shape} does not tile shape {shape}."
            )
        for d, b in enumerate(block):
            scale = np.repeat(scale, b, axis=d)
        return scale
