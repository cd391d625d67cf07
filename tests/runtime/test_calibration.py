"""FP8 calibration: each linear layer's input amax over a text, and the executor's taps."""

from __future__ import annotations

import numpy as np
import pytest

from netdef import NetworkOptions, build_network, load_tensorrt
from runtime.calibration import activation_amax
from runtime.cpu import CpuBackend
from runtime.reference import Executor, ExecutorError
from tests.fixtures.tiny_quant import tiny_quant_dir
from weights import Checkpoint

trt = load_tensorrt("tensorrt_rtx")
rng = np.random.default_rng(0)


def test_calibration_amax_is_the_largest_linear_input_over_every_chunk():
    """Chunked prefill through the KV cache sees what one call over the whole text sees."""
    ckpt = Checkpoint.open(tiny_quant_dir("gemma3"))
    ids = rng.integers(0, 512, 40).tolist()
    chunked = activation_amax(ckpt, ids, "float32", chunk=7, trt=trt)
    whole = activation_amax(ckpt, ids, "float32", chunk=40, trt=trt)
    assert chunked.keys() == whole.keys()
    for layer in whole:
        assert chunked[layer] == pytest.approx(whole[layer], rel=1e-5)


def test_executor_returns_intermediate_tensors_by_name():
    ckpt = Checkpoint.open(tiny_quant_dir("llama"))
    dn = build_network(ckpt, NetworkOptions(dtype="float32", max_seq_len=8), trt)
    model = CpuBackend(dn)
    model.reset(1)
    feeds = model.feeds(
        np.array([[5, 6, 7]], np.int32), np.array([[0, 1, 2]], np.int32), np.array([2], np.int32)
    )
    tensor = dn.graph.linear_inputs["layers.0.qkv_proj"]
    out = Executor.for_network(dn).run(feeds, extra=[tensor])
    assert out[tensor].shape == (1, 3, 128) and "logits" in out
    with pytest.raises(ExecutorError, match="no tensor named 'nope'"):
        Executor.for_network(dn).run(feeds, extra=["nope"])
