"""Sliding-window layers keep a ring of window + max_prefill - 1 KV slots (netdef.slots).

Sequences several windows (and several rings) long, against transformers' full forward:
prompts prefilled together in chunks that end at the ring's end, padded rows whose padding
wraps, then decode steps where each row is at its own position, writing across the ring's
end again and again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netdef import NetworkOptions, build_network
from netdef.slots import call_end, prompt_chunks, ring_crossing, ring_length, rings
from runtime.cpu import CpuBackend
from runtime.readout import ALL_LOGITS
from runtime.tensorrt_backend import EngineLoadError, check_memory, validate_call
from tests.fixtures.parity import F32_TOL, assert_close, hf_logits, sequences
from weights import Checkpoint

WINDOW = 4  # the tiny Gemma-3's and qwen2_sliding's sliding window
PREFILL = 6  # -> rings of 4 + 6 - 1 = 9 slots


def ring_model(path, batch: int, max_seq_len: int = 40, all_logits: bool = True) -> CpuBackend:
    options = NetworkOptions(
        dtype="float32",
        max_batch=batch,
        max_seq_len=max_seq_len,
        max_prefill=PREFILL,
        all_logits=all_logits,
    )
    return CpuBackend(build_network(Checkpoint.open(path), options))


def ragged_logits(model: CpuBackend, seqs: list[list[int]], prompts: list[int]) -> np.ndarray:
    """[B, T_max, vocab]: the prompts (longest first) prefilled together, right-padded, in
    chunks from prompt_chunks, each call taking the rows whose prompts go on (as runtime.generate
    does), then every row decoding its own tokens at its own position; NaN past an end."""
    assert prompts == sorted(prompts, reverse=True)
    batch, t_max = len(seqs), max(map(len, seqs))
    ids = np.zeros((batch, t_max), np.int32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    out = np.full((batch, t_max, model.dn.config.vocab_size), np.nan, np.float32)
    model.reset(batch)
    for start, end in prompt_chunks(max(prompts), model.max_prefill, model.rings):
        going = sum(n > start for n in prompts)
        positions = np.tile(np.arange(start, end, dtype=np.int32), (going, 1))
        last = np.zeros(going, np.int32)
        logits = model.forward(ids[:going, start:end], positions, last, ALL_LOGITS)["logits"]
        for b, n in enumerate(prompts[:going]):
            out[b, start : min(end, n)] = logits[b, : max(0, min(end, n) - start)]
    pos = np.array(prompts)
    lengths = np.array([len(s) for s in seqs])
    while (pos < lengths).any():
        at = np.minimum(pos, lengths - 1)  # finished rows repeat their last token
        logits = model.forward(
            ids[np.arange(batch), at][:, None],
            at[:, None].astype(np.int32),
            np.zeros(batch),
            ALL_LOGITS,
        )["logits"]
        for b in np.flatnonzero(pos < lengths):
            out[b, pos[b]] = logits[b, 0]
        pos = pos + 1
    return out


def test_ring_lengths_and_call_ends():
    assert ring_length(None, 4096, 2048) == 4096  # global layers keep every position
    assert ring_length(512, 4096, 2048) == 2559
    assert ring_length(512, 2048, 2048) == 2048  # never more than the whole cache
    assert rings([4096, 2559, 2559, 4096], 4096) == (2559,)
    spans = list(prompt_chunks(20, 6, (9,)))
    assert spans == [(0, 6), (6, 9), (9, 15), (15, 18), (18, 20)]
    assert call_end(3, 100, 6, ()) == 9


@pytest.mark.parametrize("family", ["gemma3", "qwen2_sliding"])
def test_ring_matches_transformers_over_several_windows(family, tiny_dir, hf_model):
    path = tiny_dir(family)
    seqs = sequences(512, [34, 15, 27], seed=4)
    model = ring_model(path, batch=3)
    assert model.rings == (9,)  # 34 tokens wrap the ring of 9 slots three times
    assert {shape[1] for shape in model.dn.kv_cache_shapes} == {9, 40}
    ours = ragged_logits(model, seqs, prompts=[20, 15, 13])
    reference = hf_model(path, torch.float32)
    for b, seq in enumerate(seqs):
        ref = hf_logits(reference, seq)
        assert_close(ours[b, : len(seq)], ref, F32_TOL)
        np.testing.assert_array_equal(ours[b, : len(seq)].argmax(-1), ref.argmax(-1))


def test_full_chunks_overwrite_only_what_no_query_reads(tiny_dir, hf_model):
    """Chunks of max_prefill tokens that start anywhere in the ring: each overwrites the
    slots of positions its own first query no longer sees."""
    path = tiny_dir("gemma3")
    (seq,) = sequences(512, [31], seed=5)
    model = ring_model(path, batch=1)
    model.reset(1)
    ids = np.array([seq], np.int32)
    got, start = [], 0
    for size in (1, 6, 2, 6, 6, 4, 6):  # ring offsets 0, 1, 7 (cut at 9), ...
        end = call_end(start, min(start + size, 31), PREFILL, model.rings)
        positions = np.arange(start, end, dtype=np.int32)[None]
        out = model.forward(ids[:, start:end], positions, np.zeros(1, np.int32), ALL_LOGITS)
        got.append(out["logits"][0])
        start = end
    ours = np.concatenate(got)
    ref = hf_logits(hf_model(path, torch.float32), seq[: len(ours)])
    assert len(ours) >= 3 * 9
    assert_close(ours, ref, F32_TOL)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_a_call_across_the_ring_end_is_refused(tiny_dir):
    model = ring_model(tiny_dir("gemma3"), batch=2)
    model.reset(2)
    positions = np.array([[0, 1, 2], [7, 8, 9]], np.int32)
    expected = (
        "row 1's positions 7..9 cross the end of a sliding-window ring of 9 KV slots (at "
        "position 9); split the call there (netdef.slots.call_end)"
    )
    assert ring_crossing(positions, model.rings) == expected
    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((2, 3), np.int32), positions, np.zeros(2, np.int32), ALL_LOGITS)
    assert str(e.value) == expected
    with pytest.raises(ValueError) as e:
        validate_call(np.zeros((2, 3)), positions, np.zeros(2), 2, 6, 40, model.rings)
    assert str(e.value) == expected


def test_kv_memory_that_does_not_fit_is_refused_with_the_numbers():
    plan = {"past_kv_0": 6 << 30, "logits": 1 << 20}
    check_memory(plan, free=7 << 30, max_batch=4, max_seq_len=32768)
    with pytest.raises(EngineLoadError) as e:
        check_memory(plan, free=5 << 30, max_batch=4, max_seq_len=32768)
    assert str(e.value) == (
        "its buffers need 6.00 GiB, of which the KV caches are 6.00 GiB (4 x 1.50 GiB per "
        "sequence at max_seq_len 32768), but the GPU has 5.00 GiB free; rebuild it with a "
        "smaller --max-seq-len or --max-batch (python -m tools.build), or free GPU memory"
    )
    # decode-long's context is made on its first call: its memory is kept free at load
    check_memory(plan, free=7 << 30, max_batch=4, max_seq_len=32768, decode_long=512 << 20)
    with pytest.raises(EngineLoadError) as e:
        check_memory(plan, free=13 << 29, max_batch=4, max_seq_len=32768, decode_long=1 << 30)
    assert str(e.value) == (
        "its buffers and decode-long's context (1.00 GiB) need 7.00 GiB, of which the KV "
        "caches are 6.00 GiB (4 x 1.50 GiB per sequence at max_seq_len 32768), but the GPU "
        "has 6.50 GiB free; rebuild it with a smaller --max-seq-len or --max-batch, or with "
        "--no-decode-long (python -m tools.build), or free GPU memory"
    )


def test_generate_batched_over_rings_matches_transformers_greedy(tiny_dir, gemma3_270m_dir):
    """runtime.generate on prompts of different lengths (rows longest first, chunks cut at the
    ring's end), 24 greedy tokens each: the tokens transformers generates for each alone."""
    from transformers import AutoModelForCausalLM

    from runtime.generate import Generator
    from runtime.sampling import SamplingParams
    from runtime.tokenizer import Tokenizer

    path = tiny_dir("gemma3")
    prompts = sequences(512, [11, 23, 16], seed=6)
    model = ring_model(path, batch=3, max_seq_len=48, all_logits=False)
    tokenizer = Tokenizer.from_dir(gemma3_270m_dir)  # only decodes ids < 512 here
    run = Generator(model, tokenizer, eos_ids=[]).start(prompts, SamplingParams(max_new_tokens=24))
    list(run)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, completion in zip(prompts, run.completions):
        with torch.no_grad():
            full = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None
            )
        assert completion.token_ids == full[0, len(prompt) :].tolist()
