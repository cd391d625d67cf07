"""The TensorRT network of each family, executed by the reference executor, against transformers.

Sequences run prefill then decode through the KV cache, as a generate loop drives an engine,
and are longer than Gemma's sliding window (4 in the tiny fixture) so that local and global
layers really differ. transformers' full-sequence forward is the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netdef import NetworkOptions, build_network
from runtime.cpu import CpuBackend, sequence_logits
from runtime.readout import ALL_LOGITS, ARGMAX, TOP_K
from tests.fixtures.parity import BF16_TOL, F32_TOL, assert_close, hf_logits, sequences
from weights import Checkpoint

FAMILIES = ["gemma3", "gemma3_mm", "llama", "qwen2", "qwen3"]


def run(model_dir, seqs, prefill, dtype):
    ckpt = Checkpoint.open(model_dir)
    options = NetworkOptions(
        dtype=dtype,
        max_batch=len(seqs),
        max_seq_len=max(map(len, seqs)) + 3,
        max_prefill=prefill,
        all_logits=True,
    )
    return sequence_logits(CpuBackend(build_network(ckpt, options)), seqs, prefill)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_prefill_then_decode(family, tiny_dir, hf_model):
    path = tiny_dir(family)
    (seq,) = sequences(512, [20])
    ours = run(path, [seq], prefill=9, dtype="float32")[0]
    ref = hf_logits(hf_model(path, torch.float32), seq)
    assert_close(ours, ref, F32_TOL)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_batch_of_different_lengths(family, tiny_dir, hf_model):
    """Right-padded batch; one sequence ends inside the prefill call, others decode on."""
    path = tiny_dir(family)
    seqs = sequences(512, [17, 11, 5], seed=1)
    ours = run(path, seqs, prefill=8, dtype="float32")
    model = hf_model(path, torch.float32)
    for b, seq in enumerate(seqs):
        ref = hf_logits(model, seq)
        assert_close(ours[b, : len(seq)], ref, F32_TOL)
        np.testing.assert_array_equal(ours[b, : len(seq)].argmax(-1), ref.argmax(-1))
        assert np.isnan(ours[b, len(seq) :]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_prefill_then_decode(family, tiny_dir, hf_model):
    path = tiny_dir(family)
    seqs = sequences(512, [24, 19], seed=2)
    ours = run(path, seqs, prefill=10, dtype="bfloat16")
    model = hf_model(path, torch.bfloat16)
    for b, seq in enumerate(seqs):
        ref = hf_logits(model, seq)
        mine = ours[b, : len(seq)]
        assert_close(mine, ref, BF16_TOL)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > BF16_TOL * np.abs(ref).max()
        assert clear.mean() > 0.3, "the fixture should give many clear winners"
        np.testing.assert_array_equal(mine.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_last_token_logits_match_all_logits(tiny_dir):
    """The default network returns only last_token_index's logits; they equal that row of all_logits."""
    ckpt = Checkpoint.open(tiny_dir("gemma3"))
    seqs = sequences(512, [9, 6], seed=3)
    full = run(tiny_dir("gemma3"), seqs, prefill=9, dtype="float32")
    model = CpuBackend(
        build_network(ckpt, NetworkOptions(dtype="float32", max_batch=2, max_seq_len=16))
    )
    model.reset(2)
    ids = np.zeros((2, 9), np.int32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    last = model.forward(
        ids, np.tile(np.arange(9, dtype=np.int32), (2, 1)), np.array([8, 5], np.int32), ALL_LOGITS
    )["logits"]
    assert last.shape == (2, 512)
    model.reset(2)
    greedy = model.forward(
        ids, np.tile(np.arange(9, dtype=np.int32), (2, 1)), np.array([8, 5], np.int32), ARGMAX
    )["next_token"]
    np.testing.assert_array_equal(greedy, last.argmax(-1))  # the in-engine argmax (TopK)
    model.reset(2)
    out = model.forward(
        ids, np.tile(np.arange(9, dtype=np.int32), (2, 1)), np.array([8, 5], np.int32), TOP_K
    )
    values, top_ids = out["top_logits"], out["top_ids"]
    assert values.shape == top_ids.shape == (2, 64)
    np.testing.assert_array_equal(top_ids, np.argsort(-last, axis=-1, kind="stable")[:, :64])
    np.testing.assert_array_equal(values, np.take_along_axis(last, top_ids, axis=-1))
    # log_normalizer: log sum exp(logits * inv_temperature) per row, each row its own 1/T.
    model.reset(2)
    feeds = model.feeds(
        ids, np.tile(np.arange(9, dtype=np.int32), (2, 1)), np.array([8, 5], np.int32)
    )
    feeds["inv_temperature"] = np.array([1 / 0.6, 1 / 1.5], np.float32)
    lse = model.executor.run(feeds)["log_normalizer"]
    x = last.astype(np.float64) * feeds["inv_temperature"][:, None]
    expected = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    assert lse.dtype == np.float32 and lse.shape == (2,)
    np.testing.assert_allclose(lse, expected, rtol=1e-6)
    np.testing.assert_allclose(last[0], full[0, 8], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last[1], full[1, 5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_best_k_in_two_stages_over_a_padded_vocabulary(dtype, tmp_path):
    """A 5,000-token vocabulary is padded to two blocks of 4,096 (in the head's dtype, then
    cast): the engine's best 64 are exactly the 64 largest logits, in order, and the
    log-normalizer, summed per block, is that of the 5,000 logits (the padding adds
    nothing). In bfloat16, where logits tie, the values and the log-normalizer."""
    from tools.bench.random_model import random_config, write_random_checkpoint

    shapes = dict(
        layers=2, hidden=64, intermediate=128, vocab=5000, heads=4, kv_heads=2, head_dim=16
    )
    ckpt = Checkpoint.open(
        write_random_checkpoint(tmp_path, random_config("llama-3.2-1b", **shapes))
    )
    model = CpuBackend(
        build_network(ckpt, NetworkOptions(dtype=dtype, max_batch=2, max_seq_len=64))
    )
    model.reset(2)
    ids = np.random.default_rng(1).integers(3, 5000, (2, 7), dtype=np.int32)
    pos = np.tile(np.arange(7, dtype=np.int32), (2, 1))
    logits = model.forward(ids, pos, np.array([6, 4]), ALL_LOGITS)["logits"]
    top_ids, top_logits = model.last["top_ids"], model.last["top_logits"]
    np.testing.assert_array_equal(top_logits, -np.sort(-logits, axis=-1)[:, :64])
    np.testing.assert_array_equal(top_logits, np.take_along_axis(logits, top_ids, -1))
    if dtype == "float32":
        np.testing.assert_array_equal(top_ids, np.argsort(-logits, axis=-1, kind="stable")[:, :64])
    model.reset(2)
    feeds = model.feeds(ids, pos, np.array([6, 4], np.int32))
    feeds["inv_temperature"] = np.array([1 / 0.6, 1 / 1.5], np.float32)
    lse = model.executor.run(feeds)["log_normalizer"]
    x = logits.astype(np.float64) * feeds["inv_temperature"][:, None]
    expected = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(lse, expected, rtol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_next_token_drawn_in_the_network_is_the_hosts_draw(family, tiny_dir):
    """Rows with a uniform number get next_token drawn in the network, each by its own
    temperature, top-k and top-p: the token runtime.sampling.sample_best_k draws from the
    same call's best K by the same number (flat temperatures, so that many tokens come up
    and top-p cuts into them); a row without one gets the argmax."""
    from runtime.sampling import SamplingParams, sample_best_k

    model = CpuBackend(
        build_network(
            Checkpoint.open(tiny_dir(family)),
            NetworkOptions(dtype="float32", max_batch=5, max_seq_len=16),
        )
    )
    params = [
        SamplingParams(temperature=1.0, top_k=64, top_p=0.95),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
        SamplingParams(temperature=8.0, top_k=40),
        None,
        SamplingParams(temperature=20.0, top_k=64, top_p=0.5),
    ]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, (5, 6), dtype=np.int32)
    positions = np.tile(np.arange(6, dtype=np.int32), (5, 1))
    drawn = []
    for _ in range(60):
        u = rng.random(5)
        model.reset(5)
        draws = [None if p is None else (p, u[b]) for b, p in enumerate(params)]
        tokens = model.forward(ids, positions, np.full(5, 5, np.int32), ARGMAX, draws)
        out = model.last
        for b, p in enumerate(params):
            if p is None:
                want = out["logits"][b].argmax()
            else:
                best = out["top_logits"][b : b + 1], out["top_ids"][b : b + 1]
                want = sample_best_k(*best, p, np.array([np.float32(u[b])]))[0][0]
            assert tokens["next_token"][b] == want
        drawn.append(tokens["next_token"])
    distinct = [len(set(row)) for row in np.array(drawn).T]
    assert distinct[3] == 1 and min(distinct[2], distinct[4]) > 10
