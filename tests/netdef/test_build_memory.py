"""What the network definition holds on to during an engine build (issue 17, item 11): it
reads a checkpoint's unquantized weights in place (no copy) and holds its own copy only of
fused q/k/v, of the MLP's weights (stored [in, out]) and of quantized ones, whose mapped
checkpoint pages it hands back; the transposed copies in a file-backed mapping when the
build gives it a folder (`spill`)."""

from __future__ import annotations

import numpy as np
import pytest

from netdef import NetworkOptions, build_network, load_tensorrt
from netdef.graph import stacked
from tests.fixtures.tiny import TINY_MODELS
from weights import Checkpoint

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("q_proj", "k_proj", "v_proj")  # the file: k, o, q, v (sorted by name)
MLP = ("gate_proj", "up_proj", "down_proj")  # stored [in, out]


class Recording(Checkpoint):
    """A checkpoint that notes what the network definition releases."""

    released: list[str]

    def release(self, name: str) -> None:
        self.released.append(name)
        super().release(name)


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("quant,max_batch", [("none", 1), ("none", 2), ("int8-wo", 2)])
def test_network_copies_only_fused_mlp_and_quantized_weights_and_releases_their_pages(
    family, quant, max_batch, tiny_dir
):
    ckpt = Recording.open(tiny_dir(family))
    ckpt.released = []
    cfg = ckpt.config
    options = NetworkOptions(max_batch=max_batch, max_seq_len=64, max_prefill=16, quant=quant)
    dn = build_network(ckpt, options, load_tensorrt())
    assert ckpt.tensor("layers.0.self_attn.o_proj.weight").dtype == np.dtype(dn.options.dtype)
    linear = {
        f"layers.{i}.{m}.{n}.weight": n in FUSED + MLP or quant != "none"
        for i in range(cfg.num_layers)
        for m, names in (("self_attn", LINEAR[:4]), ("mlp", LINEAR[4:]))
        for n in names
    }  # name -> whether the network holds its own copy
    if not cfg.tie_word_embeddings:
        linear["lm_head.weight"] = False  # the head stays unquantized unless quant_lm_head
    copies = sorted(name for name, copied in linear.items() if copied)
    assert sorted(ckpt.released) == copies  # each once; never the embedding table
    constants = list(dn.graph.constants.values())
    for name, copied in linear.items():  # a copy, or the checkpoint's own bytes
        source = ckpt.tensor(name)
        in_place = any(np.shares_memory(c, source) for c in constants)
        assert in_place != copied, name


def test_transposed_weights_spill_to_an_unlinked_file_with_the_same_values(tiny_dir, tmp_path):
    """With a `spill` folder the MLP's [in, out] copies are clean file-backed pages (which
    the kernel can take back under memory pressure), not anonymous memory; the file is
    unlinked at once, so nothing is left in the folder, even if the build is killed."""
    ckpt = Checkpoint.open(tiny_dir("llama"))
    options = NetworkOptions(max_batch=2, max_seq_len=64, max_prefill=16)
    spilled = build_network(ckpt, options, load_tensorrt(), spill=tmp_path).graph.constants
    in_memory = build_network(ckpt, options, load_tensorrt()).graph.constants
    mlp = [n for n in spilled if n.endswith(("gate_up_proj.weight", "down_proj.weight"))]
    assert len(mlp) == 2 * ckpt.config.num_layers
    for name in mlp:
        assert isinstance(spilled[name].base, np.memmap), name
        assert not isinstance(in_memory[name].base, np.memmap), name
        np.testing.assert_array_equal(spilled[name], in_memory[name])
    others = [n for n in spilled if n not in mlp]
    assert not any(isinstance(spilled[n].base, np.memmap) for n in others)
    assert list(tmp_path.iterdir()) == []


def test_stacked_is_a_view_only_of_parts_back_to_back_in_one_buffer():
    whole = np.arange(24, dtype=np.float32).reshape(6, 4)
    view = stacked([whole[:2], whole[2:5]])
    assert np.shares_memory(view, whole) and not view.flags.writeable
    assert np.array_equal(view, whole[:5])
    for parts in ([whole[:2], whole[3:]], [whole[2:4], whole[:2]], [whole[:2], whole[2:] + 0]):
        joined = stacked(parts)  # a gap, the wrong order, another buffer: copies
        assert not np.shares_memory(joined, whole)
        assert np.array_equal(joined, np.concatenate(parts))
