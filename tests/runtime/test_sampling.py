"""Sampling filters against transformers' logits processors, and the draw itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime.sampling import (
    BLOCK,
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
    candidates,
    draw,
    next_tokens,
    next_tokens_from_top,
    uniforms,
)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, (3, 200)).astype(np.float32)


def kept(warped: torch.Tensor) -> list[list[int]]:
    """Per row, the ids a transformers warper left finite."""
    return [sorted(np.flatnonzero(np.isfinite(row)).tolist()) for row in warped.numpy()]


def ours(logits: np.ndarray, top_k: int, top_p: float) -> list[list[int]]:
    return [sorted(candidates(row, top_k, top_p).tolist()) for row in logits]


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(logits, top_k):
    ref = TopKLogitsWarper(top_k)(None, torch.from_numpy(logits))
    assert ours(logits, top_k, 1.0) == kept(ref)


def test_top_k_keeps_ties_at_the_kth_value_as_transformers_does():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]], np.float32)
    assert ours(logits, 2, 1.0) == kept(TopKLogitsWarper(2)(None, torch.from_numpy(logits)))
    assert ours(logits, 2, 1.0) == [[0, 2, 3]]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(logits, top_p):
    ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits))
    assert ours(logits, 0, top_p) == kept(ref)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.95), (0, 0.5), (64, 0.95), (2000, 0.9)])
def test_a_262k_vocabulary_matches_transformers(top_k, top_p):
    """Flat logits, so the nucleus holds tens of thousands of tokens: `nucleus` bins them
    and sorts only the bin where the mass reaches top_p."""
    logits = np.random.default_rng(1).normal(0, 1, (2, 262144)).astype(np.float32)
    x = torch.from_numpy(logits)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    ref = kept(TopPLogitsWarper(top_p)(None, x))
    got = ours(logits, top_k, top_p)
    assert [len(r) for r in got] == [len(r) for r in ref]
    assert got == ref
    if not top_k:
        assert min(len(r) for r in got) > BLOCK
    for row in logits:  # ascending, as the docstring says, without the sort `ours` adds
        ids = candidates(row, top_k, top_p)
        assert np.all(np.diff(ids) > 0)


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_a_262k_vocabulary_with_ties_keeps_the_lower_ids_of_the_last_value(top_p):
    """Logits on a grid of quarters: the nucleus ends inside a run of equal values, of which
    it keeps the lowest ids, as a stable best-first sort of the whole vocabulary does."""
    logits = np.round(np.random.default_rng(2).normal(0, 1, 262144) * 4).astype(np.float32) / 4
    best = np.argsort(-logits, kind="stable")
    probs = np.exp((logits[best] - logits.max()).astype(np.float64))
    probs /= np.exp(logits - logits.max()).sum(dtype=np.float64)
    want = np.sort(best[np.cumsum(probs) - probs < top_p])
    last = logits[want].min()
    assert 0 < np.count_nonzero(logits[want] == last) < np.count_nonzero(logits == last)
    assert np.array_equal(candidates(logits, 0, top_p), want)


def test_repetition_penalty_matches_transformers(logits):
    seen = [np.array([1, 5, 5, 7]), np.array([0]), np.array([199, 3])]
    ids = torch.tensor([[1, 5, 5, 7], [0, 0, 0, 0], [199, 3, 3, 3]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 1.3), ref, rtol=1e-6)


def test_temperature_then_filters_matches_transformers(logits):
    x = torch.from_numpy(logits)
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        x = proc(None, x)
    assert ours(logits / np.float32(0.7), 20, 0.8) == kept(x)


def test_sampling_draws_only_from_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.7)  # keeps 0.5 and 0.3, renormalized
    rng = np.random.default_rng(2)
    draws = [
        next_tokens(logits, params, [np.array([], int)], uniforms(params, rng, 1))[0]
        for _ in range(4000)
    ]
    np.testing.assert_allclose(
        np.bincount(draws, minlength=4) / 4000, [0.625, 0.375, 0, 0], atol=0.03
    )


def test_greedy_is_argmax(logits):
    np.testing.assert_array_equal(
        next_tokens(logits, SamplingParams(), [np.array([], int)] * 3, None), logits.argmax(-1)
    )


@pytest.mark.parametrize("temperature", [1e-300, 1e-38, 9.9e-6])
def test_a_temperature_too_small_for_float32_is_greedy(logits, temperature):
    """1e-300 and 1e-38 drew special tokens through the server: logits / T left float32."""
    params = SamplingParams(temperature=temperature, top_k=5, seed=3)
    assert params.greedy and params.temperature == 0.0
    np.testing.assert_array_equal(
        next_tokens(logits, params, [np.array([], int)] * 3, None), logits.argmax(-1)
    )
    assert not SamplingParams(temperature=1e-5).greedy


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-9]], np.float32))
    params = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [
            int(next_tokens(logits, params, [np.array([], int)], uniforms(params, rng, 1))[0])
            for _ in range(50)
        ]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    rng = np.random.default_rng(1)
    counts = np.bincount(
        [
            next_tokens(logits, params, [np.array([], int)], uniforms(params, rng, 1))[0]
            for _ in range(4000)
        ],
        minlength=4,
    )
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.2, 0.0], atol=0.03)


def test_top_k_one_is_greedy_even_when_sampling(logits):
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.5, top_k=1)
    np.testing.assert_array_equal(
        next_tokens(logits, params, [np.array([], int)] * 3, uniforms(params, rng, 3)),
        logits.argmax(-1),
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1."),
        ({"temperature": -1}, "temperature=-1 must be >= 0 (0 is greedy)."),
        ({"top_p": 0}, "top_p=0 must be in (0, 1]."),
        ({"top_k": -2}, "top_k=-2 must be >= 0 (0 disables it)."),
        ({"repetition_penalty": 0}, "repetition_penalty=0 must be > 0."),
        (
            {"stop": ("\n", "")},
            "stop=('\\n', '') must not hold an empty string (it would stop at once).",
        ),
        # Wrong types are named too, not a TypeError from a comparison or a crash mid-run.
        ({"max_new_tokens": "5"}, "max_new_tokens='5' must be an integer."),
        ({"max_new_tokens": 1.5}, "max_new_tokens=1.5 must be an integer."),
        ({"max_new_tokens": True}, "max_new_tokens=True must be an integer."),
        ({"temperature": None}, "temperature=None must be a finite number."),
        ({"temperature": float("inf")}, "temperature=inf must be a finite number."),
        ({"repetition_penalty": float("nan")}, "repetition_penalty=nan must be a finite number."),
        ({"top_k": 2.5}, "top_k=2.5 must be an integer."),
        ({"top_p": "0.9"}, "top_p='0.9' must be a finite number."),
        ({"seed": 1.5}, "seed=1.5 must be an integer or None."),
        ({"stop": None}, "stop=None must be a string or a tuple of strings."),
        ({"stop": ("a", 1)}, "stop=('a', 1) must be a string or a tuple of strings."),
    ],
)
def test_bad_params(kwargs, message):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message
    assert err.value.field == next(iter(kwargs))


def test_one_stop_string_is_one_stop_and_a_list_is_a_tuple():
    """A str was taken as a sequence of one-character stops ("abc" stopped at any "a");
    a list left the frozen params unhashable."""
    assert SamplingParams(stop="abc").stop == ("abc",)
    params = SamplingParams(stop=["\n", "END"])
    assert params.stop == ("\n", "END")
    assert hash(params) == hash(SamplingParams(stop=("\n", "END")))
    assert SamplingParams(max_new_tokens=np.int64(3), top_p=np.float32(0.5)).max_new_tokens == 3


def test_draw_over_a_vocabulary_of_several_blocks():
    """The CDF walk goes block by block: tokens on both sides of block edges, and in the short
    last block, are drawn as often as their probability says, and no other token is."""
    x = np.full(2 * BLOCK + 1000, -40, np.float32)
    chosen = [5, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK + 999]
    x[chosen] = [0.0, 1.0, 0.5, 0.0, 1.0]
    p = np.exp(x[chosen]) / np.exp(x[chosen]).sum()
    rng = np.random.default_rng(3)
    counts = np.bincount([draw(x, u) for u in rng.random(20000)], minlength=x.size)
    assert counts.sum() == counts[chosen].sum()
    np.testing.assert_allclose(counts[chosen] / 20000, p, atol=0.015)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_best_k_under_a_repetition_penalty_falls_back_when_they_cannot_decide(temperature):
    """Best 3 of 8 logits. Row 0: its best token is repeated but stays above the 3rd logit, so
    the best 3 decide. Row 1: all three are repeated and fall below the 3rd logit, so the 4th
    token, which only the whole row shows, may be among the best."""
    logits = np.array(
        [[9.0, 1.0, 8.0, 0.5, 7.0, 0.2, 0.1, 0.0], [6.0, 5.5, 5.1, 4.9, 0.0, 0.0, 0.0, 0.0]],
        np.float32,
    )
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :3].astype(np.int32)
    values = np.take_along_axis(logits, ids, axis=1)
    seen = [np.array([0]), np.array([0, 1, 2])]
    params = SamplingParams(
        temperature=temperature, top_k=0 if temperature == 0 else 2, repetition_penalty=1.2, seed=0
    )
    asked = []

    def whole() -> np.ndarray:
        asked.append(1)
        return logits

    for seed in range(20):
        u = uniforms(params, np.random.default_rng(seed), 2)
        got = next_tokens_from_top(values, ids, params, u, None, whole, seen)
        want = next_tokens(logits, params, seen, u)
        np.testing.assert_array_equal(got, want)
    assert len(asked) == 20  # row 1 each time, row 0 never
    if temperature == 0:
        np.testing.assert_array_equal(want, [2, 0])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=64, top_p=0.95),  # Gemma-3's
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),  # Qwen's
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.6, top_p=0.9),  # Llama 3's: with the log-normalizer
    ],
)
def test_a_batch_sampled_from_its_best_k_draws_the_whole_logits_tokens(params):
    """16 sequences at once from their best 64 logits (ties among the best included; one
    row so flat that top-p alone reaches past its best 64, drawn from its whole logits):
    for 30 seeds, the tokens row-by-row sampling of the whole logits draws."""
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 2.5, (16, 3000)).astype(np.float32)
    best = np.argsort(-logits, axis=1)
    logits[2, best[2, 1]] = logits[2, best[2, 0]]  # a tie for the best token
    logits[7, best[7, 5:9]] = logits[7, best[7, 5]]  # four tied in the nucleus
    logits[9] *= 0.05  # flat: its nucleus holds hundreds of tokens
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :64].astype(np.int32)
    values = np.take_along_axis(logits, ids, axis=1)
    lse = None
    if params.top_k == 0:
        x = logits.astype(np.float64) / params.temperature
        peak = x.max(axis=1, keepdims=True)
        lse = (peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))).astype(np.float32)
    asked = []

    def whole() -> np.ndarray:
        asked.append(1)
        return logits

    none: list[np.ndarray] = [np.array([], int)] * 16
    for seed in range(30):
        u = uniforms(params, np.random.default_rng(seed), 16)
        got = next_tokens_from_top(values, ids, params, u, lse, whole)
        want = next_tokens(logits, params, none, u)
        np.testing.assert_array_equal(got, want)
    assert len(asked) == (30 if params.top_k == 0 else 0)  # the flat row, under top-p alone
