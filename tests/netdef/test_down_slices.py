"""down_proj's rows go to one of two forms (netdef.graph `matmul_in_slices`): a prompt call
of 2 .. DOWN_SLICED_ROWS tokens (netdef.options) multiplies in DOWN_SLICES slices of the
inputs and sums, every other call (a decode step, a longer chunk) takes the one matmul. Both
forms compute x @ W^T of the checkpoint's weight."""

from __future__ import annotations

import numpy as np
import pytest

import netdef.decoder
from netdef import NetworkOptions, build_network
from runtime.cpu import CpuBackend
from weights import Checkpoint

LAYER = 1
MOST = 8  # DOWN_SLICED_ROWS for these tests: the tiny models' context is 256 positions


@pytest.fixture
def model(tiny_dir, monkeypatch) -> CpuBackend:
    monkeypatch.setattr(netdef.decoder, "DOWN_SLICED_ROWS", MOST)
    options = NetworkOptions(dtype="float32", max_batch=2, max_seq_len=64, max_prefill=16)
    return CpuBackend(build_network(Checkpoint.open(tiny_dir("llama")), options))


def down_proj(model: CpuBackend, tokens: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """((rows the one matmul gets, rows the slices get), down_proj's input, its output) of
    one call of `tokens` tokens per sequence from position 0, layer LAYER."""
    net = model.dn.network
    names = [net.get_layer(j).name for j in range(net.num_layers)]
    p = f"layers.{LAYER}.down_proj"
    layers = {n: net.get_layer(j) for j, n in enumerate(names) if n.startswith(p)}
    x = layers[f"{p}.whole_rows"].get_input(0).name
    wanted = [
        x,
        *(layers[f"{p}.{n}"].get_output(0).name for n in ("whole_rows", "sliced_rows", "rows")),
    ]
    model.reset(2)
    ids = (np.arange(2 * tokens, dtype=np.int32) % 97).reshape(2, tokens)
    positions = np.tile(np.arange(tokens, dtype=np.int32), (2, 1))
    feeds = model.feeds(ids, positions, np.full(2, tokens - 1, np.int32))
    out = model.executor.run(feeds, extra=wanted)
    rows = (out[wanted[1]].shape[1], out[wanted[2]].shape[1])
    return rows, out[x], out[wanted[3]]


@pytest.mark.parametrize(
    "tokens, rows",
    [(1, (1, 0)), (5, (0, 5)), (MOST, (0, MOST)), (MOST + 1, (MOST + 1, 0)), (16, (16, 0))],
)
def test_prompt_rows_up_to_the_limit_take_the_slices(model, tiny_dir, tokens, rows):
    routed, x, y = down_proj(model, tokens)
    assert routed == rows
    w = Checkpoint.open(tiny_dir("llama")).tensor(f"layers.{LAYER}.mlp.down_proj.weight")
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
