"""Engines on a real GPU against the CPU executor of the same network (`pytest -m gpu`).

Each test builds an artifact with `tools.build` for the GPU it runs on (TensorRT-RTX: the
device's compute capability as --target), loads it with `TensorRTBackend` and runs the same
calls through `CpuBackend` (the NumPy executor, float32 arithmetic rounded per layer as the
network states): a ragged batch of two prompts prefilled in chunks, then decode steps with
each row at its own position, comparing logits, next_token and the best-K outputs, with CUDA
graphs on and off. Two bf16 implementations round at different points (the tiny fixtures'
logits reach |14|, where one bf16 step is 0.0625), so logits agree within
`atol + rtol * max|logit|` (stated per model) and on average within a quarter of that, ids
wherever the executor's margin between neighbours exceeds twice the bound. Replays of CUDA
graphs equal plain execution exactly. Skipped without cuda-python and a GPU: that skip is not
coverage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netdef import NetworkOptions, build_network
from netdef.slots import prompt_chunks
from runtime.cpu import CpuBackend
from runtime.cuda_buffers import gpu_unavailable_reason
from runtime.readout import ARGMAX
from tests.fixtures.gpu import TOLERANCE, assert_close, build_for_device, run_all
from weights import Checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu() -> None:
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")


def calls(batch_lengths: list[int], prefill: int, steps: int, vocab: int, rings=()):
    """(ids, positions, last) of a ragged batch: prompts of the given lengths (longest
    first), right-padded, prefilled in chunks of `prefill` cut at the KV rings' ends, each
    call taking the rows still in their prompt (as runtime.generate does), then `steps`
    decode steps from each row's own end."""
    assert batch_lengths == sorted(batch_lengths, reverse=True)
    rng = np.random.default_rng(7)
    longest = max(batch_lengths)
    prompts = rng.integers(3, vocab, size=(len(batch_lengths), longest), dtype=np.int32)
    out = []
    for start, end in prompt_chunks(longest, prefill, rings):
        going = sum(n > start for n in batch_lengths)
        pos = np.tile(np.arange(start, end, dtype=np.int32), (going, 1))
        last = np.array([min(n, end) - 1 - start for n in batch_lengths[:going]], np.int32)
        out.append((prompts[:going, start:end], pos, last))
    ends = np.array(batch_lengths, np.int32)
    for step in range(steps):
        ids = rng.integers(3, vocab, size=(len(batch_lengths), 1), dtype=np.int32)
        out.append((ids, (ends + step)[:, None], np.zeros(len(batch_lengths), np.int32)))
    return out


def compare(
    artifact: Path, model_dir: Path, batch_lengths, prefill, steps, tolerance, then=None
) -> None:
    """`then`: the lengths of a second batch of prompts run after the first, from position 0
    on the same cache rows."""
    from netdef.artifact import read_metadata
    from runtime.tensorrt_backend import TensorRTBackend

    meta = read_metadata(artifact)
    opts = {k: v for k, v in meta["options"].items()}
    cpu = CpuBackend(build_network(Checkpoint.open(model_dir), NetworkOptions(**opts)))
    vocab = meta["config"]["vocab_size"]
    sequence = calls(batch_lengths, prefill, steps, vocab, cpu.rings)
    if then:
        sequence += calls(then, prefill, steps, vocab, cpu.rings)
    top_k = opts["sample_top_k"] > 0
    cpu.reset(len(batch_lengths))
    expected = run_all(cpu, sequence, top_k)
    by_graphs = {}
    for graphs in (False, True):
        with TensorRTBackend.load(artifact, cuda_graphs=graphs) as engine:
            engine.reset(len(batch_lengths))
            by_graphs[graphs] = run_all(engine, sequence, top_k)
            if graphs:  # every decode step after the first of its shape was a replay
                assert engine.graphs, "no decode step was captured"
        assert_close(by_graphs[graphs], expected, *tolerance)
    for a, b in zip(by_graphs[False], by_graphs[True]):  # replay == plain execution
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2", "qwen2_sliding", "qwen3"])
def test_tiny_engine_matches_the_executor(family, tmp_path):
    from tests.fixtures.tiny import tiny_model_dir

    model_dir = tiny_model_dir(family)
    # max_seq_len 24 > the window of 4, so sliding and global layers differ; the sliding
    # layers' rings of 4 + 4 - 1 = 7 slots wrap (prompts of 7 and 5, then 3 decode steps).
    artifact = build_for_device(
        model_dir, tmp_path / "a", max_batch=2, max_seq_len=24, max_prefill=4, sample_top_k=8
    )
    compare(artifact, model_dir, [7, 5], prefill=4, steps=6, tolerance=TOLERANCE["tiny"])
    # One sequence: its first chunk is a full one of max_prefill tokens (the chunk profile).
    compare(artifact, model_dir, [9], prefill=4, steps=2, tolerance=TOLERANCE["tiny"])


@pytest.mark.parametrize("quant", ["int8-wo", "int4-wo"])
def test_weight_only_quantized_engine_matches_the_executor(quant, tmp_path):
    """INT8 / INT4 weights (blocks of 64 inputs in the tiny model) dequantized on the GPU as
    the executor dequantizes them, the untied LM head too."""
    from tests.fixtures.tiny import tiny_model_dir

    model_dir = tiny_model_dir("llama")
    artifact = build_for_device(
        model_dir,
        tmp_path / "a",
        max_batch=2,
        max_seq_len=24,
        max_prefill=4,
        sample_top_k=8,
        quant=quant,
        quant_lm_head=True,
    )
    compare(artifact, model_dir, [7, 5], prefill=4, steps=6, tolerance=TOLERANCE["tiny"])


def test_padded_two_stage_best_k_matches_the_executor(tmp_path):
    """A 5,000-token vocabulary: the best K come from two TopK blocks, the second padded."""
    from tools.bench.random_model import random_config, write_random_checkpoint

    shapes = dict(
        layers=2, hidden=64, intermediate=128, vocab=5000, heads=4, kv_heads=2, head_dim=16
    )
    model_dir = write_random_checkpoint(tmp_path / "m", random_config("llama-3.2-1b", **shapes))
    artifact = build_for_device(model_dir, tmp_path / "a", max_batch=2, max_seq_len=64)
    compare(artifact, model_dir, [7, 5], prefill=8, steps=3, tolerance=TOLERANCE["tiny"])


def test_long_decode_profile_matches_the_executor(tmp_path):
    """With decode_long, steps past global_opt positions run in the decode-long profile, in
    a context of its own under TensorRT-RTX: prompts of 254 and 250 tokens, then 8 steps
    whose global layers read 256 and then 512 positions (decode, then decode-long), then a
    short batch again. That context is made on decode-long's first call, also where no
    prefill came before (the prefill context then holds decode-long's profile)."""
    from runtime.tensorrt_backend import TensorRTBackend
    from tools.bench.random_model import random_config, write_random_checkpoint

    shapes = dict(
        layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, head_dim=16
    )
    model_dir = write_random_checkpoint(tmp_path / "m", random_config("llama-3.2-1b", **shapes))
    artifact = build_for_device(
        model_dir,
        tmp_path / "a",
        max_batch=2,
        max_seq_len=1024,
        max_prefill=64,
        global_opt=256,
        decode_long=True,
    )
    compare(artifact, model_dir, [254, 250], 64, 8, TOLERANCE["tiny"], then=[7, 5])
    with TensorRTBackend.load(artifact) as engine:
        assert engine.profile_names == ["decode", "decode-long", "prefill", "chunk"]
        engine.reset(1)
        made = []  # whether decode-long's context exists after each step
        for position, profile in ((255, "decode"), (256, "decode-long"), (3, "decode")):
            engine.forward(
                np.ones((1, 1), np.int32), np.full((1, 1), position, np.int32), [0], ARGMAX
            )
            assert engine.last_profile == profile
            made.append(len(engine.contexts) == 3 and engine.contexts[1] is not None)
        if len(engine.contexts) == 3:  # TensorRT-RTX: decode, decode-long, prefill
            assert made == [False, True, True]


def test_default_artifact_loads(tmp_path):
    """The default --max-batch 1 engine pins the batch dim, which the engine reports static."""
    from runtime.tensorrt_backend import TensorRTBackend
    from tests.fixtures.tiny import tiny_model_dir

    artifact = build_for_device(tiny_model_dir("llama"), tmp_path / "a")
    with TensorRTBackend.load(artifact) as engine:
        engine.reset(1)
        ids = np.array([[5, 6, 7]], np.int32)
        out = engine.forward(ids, np.arange(3, dtype=np.int32)[None], np.array([2]), ARGMAX)
        assert out["next_token"].shape == (1,)


def test_compiled_kernels_are_kept_for_the_next_load(tmp_path, monkeypatch, capsys):
    """TensorRT-RTX's JIT cache: the first load of an artifact starts from nothing (and
    tools.generate says so) and, on close, writes what it compiled (the context's kernels and
    each call shape's); the next load reads that file back and computes the same logits."""
    from netdef.artifact import check_intact
    from runtime.readout import ALL_LOGITS
    from runtime.tensorrt_backend import TensorRTBackend
    from tests.fixtures.tiny import tiny_model_dir
    from tools.generate import open_backend

    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    artifact = build_for_device(tiny_model_dir("gemma3"), tmp_path / "a", max_batch=2)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    positions = np.tile(np.arange(4, dtype=np.int32), (2, 1))
    runs = []
    for first in (True, False):
        if first:  # as tools.generate and tools.serve open it
            engine = open_backend(artifact, check_intact(artifact), "tensorrt", None, None)
        else:
            engine = TensorRTBackend.load(artifact)
        with engine:
            if engine.jit_cache is None:
                pytest.skip(f"{engine.__class__.__name__} has no JIT cache on this TensorRT")
            path, loaded = engine.jit_cache.path, engine.jit_cache.loaded
            engine.reset(2)
            prefill = engine.forward(ids, positions, np.full(2, 3, np.int32), ALL_LOGITS)
            step = engine.forward(
                ids[:, :1], np.full((2, 1), 4, np.int32), np.zeros(2, np.int32), ALL_LOGITS
            )
        runs.append((loaded, path.stat().st_size, prefill["logits"], step["logits"]))
    (first_loaded, first_size, *first), (second_loaded, _, *second) = runs
    assert path.parent == tmp_path / "cache" / "jit"
    assert capsys.readouterr().err.count("they are kept in") == 1  # the first load's note
    assert first_loaded == 0 and first_size > 0
    assert second_loaded == first_size
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_gemma3_1b_shaped_engine_matches_the_executor(tmp_path):
    from tools.bench.random_model import random_config, write_random_checkpoint

    model_dir = write_random_checkpoint(tmp_path / "g1b", random_config("gemma-3-1b"))
    artifact = build_for_device(
        model_dir, tmp_path / "a", max_batch=2, max_seq_len=1024, max_prefill=512
    )
    # Prompts of 530 and 520 tokens: past the 512-token window of the sliding layers.
    compare(
        artifact, model_dir, [530, 520], prefill=512, steps=3, tolerance=TOLERANCE["gemma-3-1b"]
    )


def test_chained_greedy_steps_equal_host_fed_steps(tmp_path):
    """Greedy steps fed the previous call's next_token on the device, one call ahead of the
    host (runtime.generate's greedy loop), give exactly the tokens of steps fed from the host."""
    from netdef.contract import NEXT_TOKEN
    from runtime.tensorrt_backend import TensorRTBackend
    from tests.fixtures.tiny import tiny_model_dir

    artifact = build_for_device(
        tiny_model_dir("gemma3"), tmp_path / "a", max_batch=2, max_seq_len=24, max_prefill=4
    )
    prompt = np.array([[5, 9, 13, 17], [21, 25, 29, 33]], np.int32)
    zeros = np.zeros(2, np.int32)

    def at(p: int) -> np.ndarray:
        return np.full((2, 1), p, np.int32)

    runs = {}
    for chained in (False, True):
        with TensorRTBackend.load(artifact) as engine:
            engine.reset(2)
            positions = np.tile(np.arange(4, dtype=np.int32), (2, 1))
            tokens = engine.forward(prompt, positions, np.full(2, 3, np.int32), ARGMAX)
            got = [tokens[NEXT_TOKEN]]
            if chained:
                engine.submit(got[0][:, None], at(4), zeros, ARGMAX)
                for step in range(1, 12):  # past the sliding layers' rings of 7 slots
                    engine.submit(None, at(4 + step), zeros, ARGMAX)
                    got.append(engine.collect()[NEXT_TOKEN])
                got.append(engine.collect()[NEXT_TOKEN])
                assert sorted(key[3] for key in engine.chained) == [0, 1]
            else:
                for step in range(12):
                    out = engine.forward(got[-1][:, None], at(4 + step), zeros, ARGMAX)
                    got.append(out[NEXT_TOKEN])
            runs[chained] = np.stack(got)
    np.testing.assert_array_equal(runs[True], runs[False])


def test_tokens_drawn_in_the_engine_are_the_hosts_draws(tmp_path):
    """Sampled steps drawn in the engine (next_token by each row's uniform number, top-k and
    top-p), chained one call ahead with CUDA graphs: each step's token is the one the host
    draws from that call's own best K (runtime.sampling.sample_best_k) by the same number,
    per row with its own parameters; a row without a draw takes the argmax."""
    from netdef.contract import NEXT_TOKEN, TOP_IDS, TOP_LOGITS
    from runtime.readout import Readout
    from runtime.sampling import SamplingParams, sample_best_k
    from runtime.tensorrt_backend import TensorRTBackend
    from tests.fixtures.tiny import tiny_model_dir

    artifact = build_for_device(
        tiny_model_dir("gemma3"), tmp_path / "a", max_batch=4, max_seq_len=64, max_prefill=4
    )
    params = [
        SamplingParams(temperature=1.0, top_k=64, top_p=0.95),  # Gemma-3's
        SamplingParams(temperature=8.0, top_k=40),  # flat: many tokens drawn
        None,  # the argmax
        SamplingParams(temperature=20.0, top_k=64, top_p=0.5),
    ]
    both = Readout("drawn", (NEXT_TOKEN, TOP_LOGITS, TOP_IDS))
    rng = np.random.default_rng(11)
    zeros = np.zeros(4, np.int32)

    def draws() -> list:
        return [None if p is None else (p, float(rng.random())) for p in params]

    with TensorRTBackend.load(artifact) as engine:
        engine.reset(4)
        prompt = np.arange(16, dtype=np.int32).reshape(4, 4) + 5
        positions = np.tile(np.arange(4, dtype=np.int32), (4, 1))
        staged = [draws()]
        out = engine.forward(prompt, positions, np.full(4, 3, np.int32), both, staged[0])
        results = [out]
        staged.append(draws())
        engine.submit(
            out[NEXT_TOKEN][:, None], np.full((4, 1), 4, np.int32), zeros, both, staged[-1]
        )
        for step in range(1, 40):  # chained: fed the previous next_token on the device
            staged.append(draws())
            engine.submit(None, np.full((4, 1), 4 + step, np.int32), zeros, both, staged[-1])
            results.append(engine.collect())
        results.append(engine.collect())
        assert engine.chained  # the chained steps were captured and replayed
    seen = set()
    for out, row_draws in zip(results, staged):
        for b, draw in enumerate(row_draws):
            values, ids = out[TOP_LOGITS][b : b + 1], out[TOP_IDS][b : b + 1]
            if draw is None:
                want = ids[0, 0]
            else:
                p, u = draw
                want = sample_best_k(values, ids, p, np.array([np.float32(u)]))[0][0]
            assert out[NEXT_TOKEN][b] == want
            seen.add((b, int(want)))
    assert len({t for b, t in seen if b == 1}) > 10  # really drawn
