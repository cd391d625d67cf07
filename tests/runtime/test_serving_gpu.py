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
from runtime.sampling import SamplingParams, candidates, pick
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


# (first word, length, seed) of each prompt: "w54 w55 w56", ... Six prompts for four rows,
# three of them longer than max_prefill; the seed is what a sampled request of it takes.
# Chosen so that every token of each request, alone on the bfloat16 executor, holds under any
# change of every logit by less than MARGIN / 2 (`draw_margin`; the test checks it): with the
# tiny model's near-ties (0.0625 apart, one bfloat16 step), batch-size-dependent GPU kernels
# flipped a token between a request served in a batch and the same request alone.
PROMPTS = [(54, 3, 0), (13, 9, 1), (19, 1, 0), (39, 6, 56), (19, 11, 0), (91, 5, 47)]
MARGIN = 0.375


def draw_margin(model: CpuBackend, ids: list[int], params: SamplingParams) -> float:
    """Twice the largest change of every logit that leaves each token `params` draws after
    ids alone unchanged: greedy, the best logit's lead over the second; top-k sampling, the
    k-th best's lead over the next (the survivors stay) and, at each boundary of their CDF in
    token-id order (`pick`), T times its distance in log-odds from the step's uniform number
    (logits below a boundary up by d and the others down move its log-odds by 2d / T)."""
    model.reset(1)
    for start, end in prompt_chunks(len(ids), model.max_prefill, model.rings):
        pos = np.arange(start, end, dtype=np.int32)[None]
        out = model.forward(
            np.array([ids[start:end]], np.int32), pos, [end - start - 1], ALL_LOGITS
        )
    rng, t, k = np.random.default_rng(params.seed), params.temperature, params.top_k or 1
    margin = np.inf
    for step in range(params.max_new_tokens):
        logits = out[LOGITS][0]
        ranked = np.sort(logits)[::-1]
        margin = min(margin, ranked[k - 1] - ranked[k])
        token = int(np.argmax(logits))
        if not params.greedy:
            u = rng.random()
            x = logits[candidates(logits / np.float32(t), k, 1.0)].astype(np.float64) / t
            weights = np.exp(x - x.max())
            cdf = np.cumsum(weights / weights.sum())[:-1]
            log_odds = np.log(cdf) - np.log1p(-cdf)
            margin = min(margin, t * np.min(np.abs(np.log(u) - np.log1p(-u) - log_odds)))
            token = pick(logits, params, u)
        pos = np.array([[len(ids) + step]], np.int32)
        out = model.forward(np.array([[token]], np.int32), pos, [0], ALL_LOGITS)
    return float(margin)


@pytest.mark.parametrize("sampled", [True, False])
def test_the_scheduler_on_tensorrt_equals_each_request_alone(tmp_path, sampled):
    """Greedy and seeded top-k requests (or greedy ones only, whose decode steps run one
    ahead, chained on the device) through `Engine` on the GPU give the tokens each gets
    alone through `Generator` on the same engine (PROMPTS says why these prompts)."""
    from runtime.generate import Generator
    from runtime.serving import Engine
    from runtime.tensorrt_backend import TensorRTBackend
    from runtime.tokenizer import Tokenizer
    from tests.fixtures.tiny import tiny_model_dir

    model_dir = with_tokenizer(tiny_model_dir("llama"), tmp_path / "m")
    options = dict(max_batch=4, max_seq_len=64, max_prefill=4, sample_top_k=8)
    executor = CpuBackend(build_network(Checkpoint.open(model_dir), NetworkOptions(**options)))
    ids = [list(range(first, first + n)) for first, n, _ in PROMPTS]
    params = [
        SamplingParams(max_new_tokens=12)
        if i % 2 == 0 or not sampled
        else SamplingParams(max_new_tokens=10, temperature=1.0, top_k=2, seed=seed)
        for i, (_, _, seed) in enumerate(PROMPTS)
    ]
    assert min(draw_margin(executor, p, q) for p, q in zip(ids, params)) >= MARGIN
    artifact = build_for_device(model_dir, tmp_path / "a", **options)
    tokenizer = Tokenizer.from_dir(artifact)
    prompts = [" ".join(f"w{i}" for i in p) for p in ids]
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
