"""Continuous batching on a real GPU (`pytest -m gpu`): `TensorRTBackend.row(k)` against the
CPU executor, and the scheduler on the engine against each request run alone.

Row calls bind each past_*/present_* tensor at row k of its cache; the decode steps around
them run on the caches' first rows with CUDA graphs, so the sequence below interleaves both
(graphs captured before a row call are replayed after it) and compares every call's outputs
with the executor's within tests/fixtures/gpu.py's tolerances. Skipped without cuda-python and a
GPU: that skip is not coverage.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

from netdef import NetworkOptions, build_network
from netdef.contract import LOGITS
from netdef.slots import prompt_chunks
from runtime.cpu import CpuBackend
from runtime.cuda_buffers import gpu_unavailable_reason
from runtime.readout import ALL_LOGITS
from tests.fixtures.gpu import TOLERANCE, assert_close, build_for_device, run_all
from tests.tools.cli import with_tokenizer
from weights import Checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu() -> None:
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")


def row_sequence(vocab: int, ring_lengths: tuple[int, ...]):
    """(row or None, ids, positions, last): prompts prefilled alone on rows 2, 0, then 1 in
    chunks of 4 cut at ring ends, with three-row decode steps between (a row not decoding
    feeds its next slot)."""
    rng = np.random.default_rng(3)
    prompts = {
        2: rng.integers(3, vocab, 7),
        0: rng.integers(3, vocab, 5),
        1: rng.integers(3, vocab, 6),
    }
    seq, ends = [], {}

    def prefill(row):
        p = prompts[row]
        for start, end in prompt_chunks(len(p), 4, ring_lengths):
            pos = np.arange(start, end, dtype=np.int32)[None]
            seq.append((row, p[None, start:end].astype(np.int32), pos, np.array([end - start - 1])))
        ends[row] = len(p)

    def decode(steps):
        for _ in range(steps):
            ids = rng.integers(3, vocab, (3, 1)).astype(np.int32)
            pos = np.array([[ends.get(k, 0)] for k in range(3)], np.int32)
            seq.append((None, ids, pos, np.zeros(3, np.int32)))
            for k in ends:
                ends[k] += 1

    prefill(2)
    prefill(0)
    decode(4)
    prefill(1)
    decode(4)
    return seq


def run_rows(model, sequence):
    results = []
    for row, ids, pos, last in sequence:
        with model.row(row) if row is not None else nullcontext():
            results += run_all(model, [(ids, pos, last)], top_k=True)
    return results


def test_row_calls_match_the_executor(tmp_path):
    from netdef.artifact import open_artifact
    from runtime.tensorrt_backend import TensorRTBackend
    from tests.fixtures.tiny import tiny_model_dir

    model_dir = tiny_model_dir("gemma3")
    artifact = build_for_device(
        model_dir, tmp_path / "a", max_batch=3, max_seq_len=24, max_prefill=4, sample_top_k=8
    )
    meta = open_artifact(artifact)
    cpu = CpuBackend(build_network(Checkpoint.open(model_dir), NetworkOptions(**meta.options)))
    sequence = row_sequence(cpu.dn.config.vocab_size, cpu.rings)
    cpu.reset(3)
    expected = run_rows(cpu, sequence)
    with TensorRTBackend.load(artifact) as engine:
        engine.reset(3)
        got = run_rows(engine, sequence)
        assert engine.graphs, "no decode step was captured"
        assert all(key[0] == 3 for key in engine.graphs)  # row calls captured nothing
    assert_close(got, expected, *TOLERANCE["tiny"])


# (first word, length) of each prompt: "w54 w55 w56", ... Six prompts for four rows, three of
# them longer than max_prefill. Chosen so that every greedy step of each, alone on the bfloat16
# executor, has its best logit at least MARGIN above the second (the test checks it): with
# the tiny model's near-ties (0.0625 apart, one bfloat16 step), batch-size-dependent GPU
# kernels flipped a token between a request served in a batch and the same request alone.
PROMPTS = [(54, 3), (75, 9), (19, 1), (12, 6), (19, 11), (59, 5)]
MARGIN = 0.375


def greedy_margin(model: CpuBackend, ids: list[int], steps: int) -> float:
    """The smallest gap between the best two logits over `steps` greedy tokens after ids."""
    model.reset(1)
    for start, end in prompt_chunks(len(ids), model.max_prefill, model.rings):
        pos = np.arange(start, end, dtype=np.int32)[None]
        out = model.forward(
            np.array([ids[start:end]], np.int32), pos, [end - start - 1], ALL_LOGITS
        )
    margin = np.inf
    for step in range(steps):
        second, best = np.sort(out[LOGITS][0])[-2:]
        margin = min(margin, best - second)
        token = np.array([[np.argmax(out[LOGITS][0])]], np.int32)
        pos = np.array([[len(ids) + step]], np.int32)
        out = model.forward(token, pos, [0], ALL_LOGITS)
    return float(margin)


@pytest.mark.parametrize("sampled", [True, False])
def test_the_scheduler_on_tensorrt_equals_each_request_alone(tmp_path, sampled):
    """Greedy and seeded top-k requests (or greedy ones only, whose decode steps run one
    ahead, chained on the device) through `Engine` on the GPU give the tokens each gets
    alone through `Generator` on the same engine (PROMPTS says why these prompts)."""
    from runtime.generate import Generator
    from runtime.sampling import SamplingParams
    from runtime.serving import Engine
    from runtime.tensorrt_backend import TensorRTBackend
    from runtime.tokenizer import Tokenizer
    from tests.fixtures.tiny import tiny_model_dir

    model_dir = with_tokenizer(tiny_model_dir("llama"), tmp_path / "m")
    options = dict(max_batch=4, max_seq_len=64, max_prefill=4, sample_top_k=8)
    executor = CpuBackend(build_network(Checkpoint.open(model_dir), NetworkOptions(**options)))
    ids = [list(range(first, first + n)) for first, n in PROMPTS]
    assert min(greedy_margin(executor, p, 12) for p in ids) >= MARGIN
    artifact = build_for_device(model_dir, tmp_path / "a", **options)
    tokenizer = Tokenizer.from_dir(artifact)
    prompts = [" ".join(f"w{i}" for i in p) for p in ids]
    params = [
        SamplingParams(max_new_tokens=12)
        if i % 2 == 0 or not sampled
        else SamplingParams(max_new_tokens=10, temperature=0.8, top_k=5, seed=i)
        for i in range(len(prompts))
    ]
    with TensorRTBackend.load(artifact) as backend:
        engine = Engine(backend, tokenizer)
        requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
        texts = ["".join(r) for r in requests]
        engine.shutdown()
        assert backend.graphs, "no decode step was captured"
        assert sampled or backend.chained, "no greedy step was chained"
        gen = Generator(backend, tokenizer)
        for prompt, q, r, text in zip(prompts, params, requests, texts):
            run = gen.start([prompt], q)
            assert "".join(d.text for d in run) == text
            assert run.completions[0].token_ids == r.completion.token_ids
