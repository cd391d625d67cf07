"""What the network definition holds on to during an engine build (issue 17, item 11): every
linear weight is copied (transposed, fused or quantized) and its mapped checkpoint pages are
handed back; the copies are byte-exact."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from netdef import NetworkOptions, build_network, load_tensorrt
from netdef.graph import TRANSPOSE_ROWS, transposed
from tests.fixtures.tiny import TINY_MODELS
from weights import Checkpoint

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("rows", [1, TRANSPOSE_ROWS - 1, TRANSPOSE_ROWS, 2 * TRANSPOSE_ROWS + 7])
def test_transposed_is_the_contiguous_transpose(rows, dtype):
    w = np.random.default_rng(rows).standard_normal((rows, 33)).astype(dtype)
    t = transposed(w)
    assert t.flags.c_contiguous and t.shape == (33, rows) and t.dtype == w.dtype
    assert t.tobytes() == np.ascontiguousarray(w.T).tobytes()
    assert not np.shares_memory(t, w)


class Recording(Checkpoint):
    """A checkpoint that notes what the network definition releases."""

    released: list[str]

    def release(self, name: str) -> None:
        self.released.append(name)
        super().release(name)


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("quant", ["none", "int8-wo"])
def test_network_releases_every_linear_weight_and_keeps_a_copy(family, quant, tiny_dir):
    ckpt = Recording.open(tiny_dir(family))
    ckpt.released = []
    cfg = ckpt.config
    dn = build_network(
        ckpt, NetworkOptions(max_seq_len=64, max_prefill=16, quant=quant), load_tensorrt()
    )
    expected = {
        f"layers.{i}.{m}.{n}.weight"
        for i in range(cfg.num_layers)
        for m, names in (("self_attn", LINEAR[:4]), ("mlp", LINEAR[4:]))
        for n in names
    }
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    assert sorted(ckpt.released) == sorted(expected)  # each once; never the embedding table
    for name in expected:  # the network reads its own copy, not the released pages
        source = ckpt.tensor(name)
        assert not any(np.shares_memory(c, source) for c in dn.graph.constants.values())
