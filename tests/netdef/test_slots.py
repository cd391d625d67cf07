"""netdef.slots: which cache slots a call's sliding layers read, and that the network's result
does not depend on them beyond the visible ones."""

from __future__ import annotations

import numpy as np

from netdef import NetworkOptions, build_network
from netdef.slots import attention_window, layer_windows, slot_feeds
from runtime.cpu import CpuBackend
from runtime.readout import ALL_LOGITS
from weights import Checkpoint


def test_layer_windows_treat_a_window_spanning_the_cache_as_global():
    assert layer_windows([4, None, 512, 8], 8) == [4, None, None, None]
    assert attention_window(layer_windows([4, None, 6], 8)) == 6
    assert attention_window([None, None]) is None


def test_slot_feeds_decode_and_prefill():
    pos = np.array([[9], [3]], np.int32)  # decode, rows at their own positions
    feeds = slot_feeds(pos, 4096, window=4, has_global=False)
    np.testing.assert_array_equal(feeds["window_positions"], [[6, 7, 8, 9], [0, 1, 2, 3]])
    feeds = slot_feeds(np.array([[1]], np.int32), 64, window=4, has_global=False)
    np.testing.assert_array_equal(feeds["window_positions"], [[-2, -1, 0, 1]])  # before slot 0
    prefill = np.tile(np.arange(300, 306, dtype=np.int32), (2, 1))
    feeds = slot_feeds(prefill, 4096, window=4, has_global=False)
    assert feeds["window_positions"].dtype == np.int32
    np.testing.assert_array_equal(feeds["window_positions"][0], np.arange(297, 306))
    # When slots 0 .. (furthest position + 1, rounded up to a power of two >= 256) are fewer
    # than window + S - 1, sliding layers read those.
    feeds = slot_feeds(np.arange(200, dtype=np.int32)[None], 4096, window=100, has_global=False)
    np.testing.assert_array_equal(feeds["window_positions"], np.arange(256)[None])
    feeds = slot_feeds(np.arange(8, dtype=np.int32)[None], 16, window=12, has_global=False)
    np.testing.assert_array_equal(feeds["window_positions"], np.arange(16)[None])  # max_seq_len
    assert slot_feeds(pos, 64, window=None, has_global=False) == {}
    # Global layers read positions 0 .. P-1: the furthest position + 1 rounded up to a power
    # of two, at least 256, at most max_seq_len.
    feeds = slot_feeds(pos, 4096, window=None, has_global=True)
    assert list(feeds) == ["global_positions"]
    np.testing.assert_array_equal(feeds["global_positions"], np.arange(256))
    far = np.array([[700], [3]], np.int32)
    np.testing.assert_array_equal(
        slot_feeds(far, 4096, 4, True)["global_positions"], np.arange(1024)
    )
    np.testing.assert_array_equal(slot_feeds(far, 800, 4, True)["global_positions"], np.arange(800))


def test_reading_more_slots_than_visible_changes_nothing(tiny_dir):
    """Sliding layers gather the slots they are given and mask them by position: the
    runtime's window gives the logits that a wider superset of it gives."""
    ckpt = Checkpoint.open(tiny_dir("gemma3"))
    options = NetworkOptions(dtype="float32", max_batch=2, max_seq_len=256, max_prefill=8)
    model = CpuBackend(build_network(ckpt, options))
    model.reset(2)
    ids = np.random.default_rng(3).integers(3, ckpt.config.vocab_size, (2, 9), dtype=np.int32)
    pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    model.forward(ids[:, :8], pos, np.array([7, 7]), ALL_LOGITS)
    step = (ids[:, 8:], np.full((2, 1), 8, np.int32), np.zeros(2, np.int32))
    runtime = model.feeds(*step)
    assert runtime["window_positions"].tolist() == [[5, 6, 7, 8]] * 2  # window 4
    logits = model.executor.run(runtime)["logits"]
    wider = dict(runtime, window_positions=np.tile(np.arange(-2, 9, dtype=np.int32), (2, 1)))
    # equal up to float32 summation order (softmax and matmul over other lengths)
    np.testing.assert_allclose(model.executor.run(wider)["logits"], logits, rtol=1e-5, atol=1e-5)


def test_default_max_prefill_bounds_the_attention_scores():
    """A prefill call materializes float32 scores [batch, heads, chunk, cache slots]."""
    from netdef.options import default_max_prefill
    from tools.bench.random_model import random_config
    from weights.config import parse_config

    gemma, llama = (parse_config(random_config(p)) for p in ("gemma-3-1b", "llama-3.2-1b"))
    assert default_max_prefill(gemma, 16, 4096) == 2048  # 4 windows of 512 (its KV rings)
    assert default_max_prefill(gemma, 16, 16384) == 1024  # 16 x 4 heads x 1024 x 16384 = 2^30
    assert default_max_prefill(llama, 16, 4096) == 512  # 32 heads
    assert default_max_prefill(llama, 1, 4096) == 4096
    assert default_max_prefill(llama, 1, 3000) == 3000
