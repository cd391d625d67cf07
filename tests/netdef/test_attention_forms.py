"""Each call's query rows go to one of the two attention forms (netdef.decoder `attend`): a
decode step's row to the float32 matmuls, a prefill's rows to TensorRT's fused attention, and
the other form gets none. That the two forms compute the same attention is what the parity
tests check (prefill, then decode, against transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from netdef import NetworkOptions, build_network
from runtime.cpu import CpuBackend
from weights import Checkpoint


def rows_of_each_form(model: CpuBackend, ids: np.ndarray, positions: np.ndarray) -> dict:
    """{layer i: (query rows the matmul form keeps, query rows the fused form gets)}."""
    net = model.dn.network
    layers = {net.get_layer(j).name: net.get_layer(j) for j in range(net.num_layers)}
    wanted = {
        (i, form): layers[f"layers.{i}.attn.{form}"].get_output(0).name
        for i in range(model.dn.config.num_layers)
        for form in ("step_rows", "prompt_query")
    }
    feeds = model.feeds(ids, positions, np.full(len(ids), ids.shape[1] - 1, np.int32))
    out = model.executor.run(feeds, extra=wanted.values())
    return {
        i: (out[wanted[i, "step_rows"]].shape[2], out[wanted[i, "prompt_query"]].shape[2])
        for i in range(model.dn.config.num_layers)
    }


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_a_step_takes_the_matmuls_and_a_prefill_the_fused_attention(family, tiny_dir):
    dn = build_network(
        Checkpoint.open(tiny_dir(family)),
        NetworkOptions(dtype="float32", max_batch=2, max_seq_len=16, max_prefill=5),
    )
    model = CpuBackend(dn)
    model.reset(2)
    prompt = np.arange(10, dtype=np.int32).reshape(2, 5)
    prefill = rows_of_each_form(model, prompt, np.tile(np.arange(5, dtype=np.int32), (2, 1)))
    step = rows_of_each_form(model, prompt[:, :1], np.full((2, 1), 5, np.int32))
    layers = range(dn.config.num_layers)
    assert prefill == {i: (0, 5) for i in layers}
    assert step == {i: (1, 0) for i in layers}
