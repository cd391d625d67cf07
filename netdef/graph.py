"""A thin, typed layer over `INetworkDefinition` for the handful of operations a decoder needs.

Networks are strongly typed, so every helper states its dtype. Weights handed to TensorRT
must outlive the build, so `Graph.constants` keeps each array it passes in, by layer name;
the reference executor reads constants from there too, because TensorRT's Python bindings
cannot hand bfloat16, FP8 or INT4 weights back as arrays.

Quantization happens in one place, `linear` (and `weight`, for the tied LM head's table):
quantized weights are constants dequantized in front of the matmul (explicit quantization),
and under fp8 the activations pass through a Quantize/Dequantize pair too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .contract import TENSOR_DTYPES, dtype_name, trt_dtype
from .options import OptionsError
from .quant import INT4, INT4_BLOCKS, QuantizedWeight, activation_scale, pack_int4, quantize_weight


class Graph:
    """Builds layers on `network`; names each layer after the module it belongs to.

    `quant` is a `netdef.quant` mode for the linear layers (int4-wo in blocks of
    `int4_block` inputs); fp8 needs `act_amax`, the calibrated input amax of each linear layer
    by name. `linear_inputs` records the tensor
    that feeds each linear layer (by layer name), for calibration. Weights the network
    transposes are written to a file in `spill` where given (`transposed`).
    """

    def __init__(
        self,
        trt: ModuleType,
        network: Any,
        quant: str = "none",
        act_amax: Mapping[str, float] | None = None,
        int4_block: int | None = None,
        spill: Path | None = None,
    ):
        self.trt = trt
        self.network = network
        self.quant = quant
        self.spill = spill
        self.int4_block = int4_block or INT4_BLOCKS[0]
        self.act_amax = act_amax or {}
        self.constants: dict[str, np.ndarray] = {}
        self.linear_inputs: dict[str, str] = {}
        self.kept: list[str] = []  # linear layers built from already quantized weights (from-gguf)
        self.scope = ""

    def named(self, layer: Any, name: str) -> Any:
        layer.name = f"{self.scope}{name}" if self.scope else name
        return layer

    # Leaves ---------------------------------------------------------------------------------
    def constant(self, array: np.ndarray, name: str) -> Any:
        """A constant tensor backed by `array` without a copy (it must stay contiguous).

        INT4 arrays are handed over packed two per byte, as TensorRT reads them."""
        array = np.require(array, requirements="C")  # keeps 0-d scalars 0-d
        data = pack_int4(array) if array.dtype == INT4 else array
        weights = self.trt.Weights(trt_dtype(self.trt, array.dtype), data.ctypes.data, array.size)
        layer = self.named(self.network.add_constant(array.shape, weights), name)
        self.constants[layer.name] = data
        return layer.get_output(0)

    def rewired(
        self,
        add: Callable[[Any], Any],
        x: Any,
        stand_in: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        index: int = 0,
    ) -> Any:
        """The layer `add(t)` makes, added with a small constant t (shape `stand_in`, x's
        dtype) as input `index` and then pointed at x. Adding some layers makes TensorRT-RTX
        1.7 walk the whole graph above their input: add_kv_cache_update, add_softmax and
        add_gather on a KV cache took up to 75 ms per call near the Gemma-3-1B shape's last
        layer, 2.6 s of its 3.6 s network definition. Rewired, the layer is the same and its
        addition costs nothing; the builder drops the unused constant. x's shape must not be
        asked for here: that walks the graph too."""
        layer = add(self.constant(np.zeros(stand_in, dtype), f"{name}.stand_in"))
        layer.set_input(index, x)
        return self.named(layer, name)

    def scalar(self, value: float, dtype: np.dtype, rank: int, name: str) -> Any:
        """A broadcastable [1]*rank constant."""
        return self.constant(np.full((1,) * rank, value, dtype=dtype), name)

    # Elementwise ----------------------------------------------------------------------------
    def elementwise(self, a: Any, b: Any, op: str, name: str) -> Any:
        layer = self.network.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op))
        return self.named(layer, name).get_output(0)

    def add(self, a: Any, b: Any, name: str) -> Any:
        return self.elementwise(a, b, "SUM", name)

    def mul(self, a: Any, b: Any, name: str) -> Any:
        return self.elementwise(a, b, "PROD", name)

    def unary(self, x: Any, op: str, name: str) -> Any:
        return self.named(
            self.network.add_unary(x, getattr(self.trt.UnaryOperation, op)), name
        ).get_output(0)

    def activation(self, x: Any, kind: str, name: str) -> Any:
        layer = self.network.add_activation(x, getattr(self.trt.ActivationType, kind))
        return self.named(layer, name).get_output(0)

    def cast(self, x: Any, dtype: np.dtype, name: str) -> Any:
        target = trt_dtype(self.trt, dtype)
        if x.dtype == target:
            return x
        return self.named(self.network.add_cast(x, target), name).get_output(0)

    def reduce_last(self, x: Any, op: str, name: str) -> Any:
        """AVG, MAX, SUM... over the last dimension, kept as size 1."""
        axes = 1 << (len(x.shape) - 1)
        layer = self.network.add_reduce(x, getattr(self.trt.ReduceOperation, op), axes, True)
        return self.named(layer, name).get_output(0)

    # Shapes ---------------------------------------------------------------------------------
    def shuffle(
        self,
        x: Any,
        name: str,
        reshape: tuple[int, ...] | None = None,
        transpose: tuple[int, ...] | None = None,
    ) -> Any:
        """Reshape (0 copies that dim, -1 infers), then transpose."""
        layer = self.network.add_shuffle(x)
        if reshape is not None:
            layer.reshape_dims = reshape
        if transpose is not None:
            layer.second_transpose = transpose
        return self.named(layer, name).get_output(0)

    def split_groups(self, x: Any, counts: list[int], width: int, name: str) -> list[Any]:
        """x [..., sum(counts) * width] as consecutive [..., count, width] groups (heads).

        Gathers along a new axis rather than slicing the last one: the TensorRT-RTX builder
        stores a matmul's weights once per optimization profile when slices of its output
        follow it, and once in all when gathers do."""
        rank = len(x.shape)
        groups = self.shuffle(x, f"{name}.groups", reshape=(0,) * (rank - 1) + (sum(counts), width))
        outputs, start = [], 0
        for i, count in enumerate(counts):
            index = self.constant(
                np.arange(start, start + count, dtype=np.int32), f"{name}.{i}.index"
            )
            layer = self.network.add_gather(groups, index, rank - 1)
            outputs.append(self.named(layer, f"{name}.{i}").get_output(0))
            start += count
        return outputs

    def dim(self, x: Any, axis: int, name: str) -> Any:
        """x.shape[axis] as an int64 [1] shape tensor."""
        return self._entry(self._shape(x, name), axis, name)

    def sizes_with(self, x: Any, axis: int, size: Any, name: str) -> Any:
        """x's shape as an int64 [rank] shape tensor with dim `axis` replaced by `size` (an
        int64 [1] shape tensor): the sizes of a slice whose other dims may be dynamic."""
        shape = self._shape(x, name)
        parts = [
            size if i == axis else self._entry(shape, i, f"{name}.dim{i}")
            for i in range(len(x.shape))
        ]
        return self.concat(parts, 0, f"{name}.sizes")

    def _shape(self, x: Any, name: str) -> Any:
        return self.named(self.network.add_shape(x), f"{name}.shape").get_output(0)

    def _entry(self, shape: Any, i: int, name: str) -> Any:
        return self.named(self.network.add_slice(shape, (i,), (1,), (1,)), name).get_output(0)

    def span(self, x: Any, axis: int, start: Any, size: Any, name: str) -> Any:
        """x[..., start : start + size, ...] along `axis`, where `start` (or a Python int) and
        `size` are int64 [1] shape tensors, so the span may be empty."""
        rank = len(x.shape)
        if isinstance(start, int):
            start = self.constant(np.array([start], np.int64), f"{name}.start")
        zero = [self.constant(np.zeros(1, np.int64), f"{name}.zero")]
        starts = zero * axis + [start] + zero * (rank - axis - 1)
        layer = self.network.add_slice(x, (0,) * rank, (1,) * rank, (1,) * rank)
        layer.set_input(1, self.concat(starts, 0, f"{name}.starts"))
        layer.set_input(2, self.sizes_with(x, axis, size, name))
        return self.named(layer, name).get_output(0)

    def concat(self, parts: list[Any], axis: int, name: str) -> Any:
        layer = self.network.add_concatenation(parts)
        layer.axis = axis
        return self.named(layer, name).get_output(0)

    # Linear algebra -------------------------------------------------------------------------
    def linear(
        self,
        x: Any,
        weight: np.ndarray,
        bias: np.ndarray | None,
        name: str,
        quantize: bool = True,
        kept: QuantizedWeight | None = None,
        in_out: bool = False,
    ) -> Any:
        """x @ weight.T (+ bias) with `weight` in HF layout [out, in].

        The weight is quantized as the graph's mode says unless `quantize` is False; under
        from-gguf it is `kept` (the GGUF file's own blocks) where given, else unquantized.
        With `in_out` an unquantized weight is stored transposed, [in, out] (a copy), and read
        as is; quantized ones keep their own layout (`weight`)."""
        rank = len(x.shape)
        self.linear_inputs[f"{self.scope}{name}"] = x.name
        quantized = quantize and self.quant not in ("none", "from-gguf")
        in_out = in_out and not quantized and kept is None
        if in_out:
            weight = self.transposed(weight)
        w = self.weight(weight, name, quantized, lead=rank - 2, kept=kept)
        if quantized and self.quant == "fp8":
            x = self.fp8_activation(x, name)
        none, transpose = self.trt.MatrixOperation.NONE, self.trt.MatrixOperation.TRANSPOSE
        layer = self.network.add_matrix_multiply(x, none, w, none if in_out else transpose)
        y = self.named(layer, name).get_output(0)
        if bias is not None:
            b = self.constant(bias.reshape((1,) * (rank - 1) + bias.shape), f"{name}.bias")
            y = self.add(y, b, f"{name}.add_bias")
        return y

    def weight(
        self,
        weight: np.ndarray,
        name: str,
        quantize: bool,
        lead: int = 0,
        kept: QuantizedWeight | None = None,
    ) -> Any:
        """The tensor a matmul or a lookup reads for `weight` (after `lead` leading 1s) as
        given, so an unquantized weight is read in place: the checkpoint's [out, in], which
        a TRANSPOSE matmul reads, or a copy the caller made ([in, out], `linear`'s `in_out`).
        With `quantize` and a mode set, the quantized constant goes through a Dequantize layer
        (per output channel, per block of inputs or per tensor, as the mode says; the weight
        is [out, in] then); `kept` is a weight already quantized (from-gguf), dequantized to
        `weight`'s dtype the same way."""
        if kept is None and not (quantize and self.quant != "none"):
            return self.constant(weight.reshape((1,) * lead + weight.shape), f"{name}.weight")
        q = kept if kept is not None else quantize_weight(weight, self.quant, self.int4_block)
        if kept is not None:
            self.kept.append(f"{self.scope}{name}")
        shape = (1,) * lead + q.values.shape
        values = self.constant(np.ascontiguousarray(q.values).reshape(shape), f"{name}.weight")
        blocks = q.scale.ndim == 2  # block scales [out, in / block] have the weight's rank
        scale = q.scale.reshape((1,) * lead + q.scale.shape) if blocks else q.scale
        scale = self.constant(np.ascontiguousarray(scale), f"{name}.weight_scale")
        layer = self.network.add_dequantize(values, scale, trt_dtype(self.trt, weight.dtype))
        if q.scale.ndim:  # the blocked input axis, or the output-channel axis
            layer.axis = len(shape) - 1 if blocks else len(shape) - 2
        return self.named(layer, f"{name}.dequantize").get_output(0)

    def transposed(self, weight: np.ndarray) -> np.ndarray:
        """weight.T, C-contiguous. With `spill`, written to a file there (unlinked at once)
        and mapped back: its pages are then clean and file-backed, which the kernel takes
        back when memory is short, as it does the checkpoint's. Held in anonymous memory
        instead, the MLP's copies (1.16 GiB of the Gemma-3-1B shape's 1.86) made its
        --max-batch 16 build exceed a cap of 1.6x the checkpoint, which it meets with them
        spilled (docs/benchmarks.md, 2026-12-06)."""
        if self.spill is None:
            return np.ascontiguousarray(weight.T)
        with tempfile.TemporaryFile(dir=self.spill) as file:
            os.posix_fallocate(file.fileno(), 0, weight.nbytes)  # a full disk: OSError, not SIGBUS
            copy = np.memmap(file, weight.dtype, "r+", shape=weight.T.shape)
        copy[...] = weight.T  # the mapping outlives the file object
        copy.flush()  # written back: clean pages
        return copy

    def pad_last(self, x: Any, size: int, value: float, name: str) -> Any:
        """x [B, n] padded with `value` to [B, size] (a FILL slice; B may be dynamic)."""
        width = self.constant(np.array([size], np.int64), f"{name}.width")
        layer = self.network.add_slice(x, (0, 0), (1, size), (1, 1))
        layer.set_input(2, self.sizes_with(x, 1, width, name))
        layer.mode = self.trt.SampleMode.FILL
        fill = np.array(value, TENSOR_DTYPES[dtype_name(x.dtype)])  # in x's dtype
        layer.set_input(4, self.constant(fill, f"{name}.value"))
        return self.named(layer, name).get_output(0)

    def fp8_activation(self, x: Any, name: str) -> Any:
        """x through FP8 and back with its calibrated per-tensor scale (amax / 448)."""
        key = f"{self.scope}{name}"
        if key not in self.act_amax:
            raise OptionsError(f"fp8: no calibrated activation range for linear layer {key!r}.")
        dtype = TENSOR_DTYPES[dtype_name(x.dtype)]
        scale = self.constant(activation_scale(self.act_amax[key], dtype), f"{name}.input_scale")
        q = self.named(self.network.add_quantize(x, scale, self.trt.fp8), f"{name}.quantize_input")
        dq = self.network.add_dequantize(q.get_output(0), scale, x.dtype)
        return self.named(dq, f"{name}.dequantize_input").get_output(0)


def stacked(parts: list[np.ndarray]) -> np.ndarray:
    """`parts` ([rows_i, ...] each) stacked along their first axis: a read-only view where they
    already lie back to back in one buffer, else a copy. A checkpoint's gate_proj and up_proj
    usually do (safetensors stores tensors sorted by name, without gaps), so the fused gate/up
    weight is transposed or quantized straight from the mapping, without a concatenated copy
    first (0.83 GB for the Gemma-3-1B shape, one layer at a time)."""
    first, at = parts[0], parts[0].ctypes.data
    for p in parts:
        if not (
            p.flags.c_contiguous
            and p.dtype == first.dtype
            and p.shape[1:] == first.shape[1:]
            and p.ctypes.data == at
            and _root(p) is _root(first)  # one mapping: the view keeps all of it alive
        ):
            return np.concatenate(parts)
        at += p.nbytes
    rows = sum(p.shape[0] for p in parts)
    return np.lib.stride_tricks.as_strided(
        first, (rows, *first.shape[1:]), first.strides, writeable=False
    )


def _root(a: np.ndarray) -> object:
    """The object owning `a`'s memory (the mmap of a checkpoint tensor's file)."""
    owner: object = a
    while True:
        if isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        elif isinstance(owner, memoryview):
            owner = owner.obj
        else:
            return owner
