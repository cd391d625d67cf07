"""Choosing the next token from logits: greedy, or sampling with the usual filters.

The order follows transformers' `generate`: repetition penalty, then temperature, top-k and
top-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """A sampling parameter out of range; `field` names it, so a CLI can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**32, "must be in [0, 2**32)"),
        ]
        for field, ok, need in checks:
            if not ok:
                raise SamplingError(field, f"{field}={getattr(self, field)} {need}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: np.ndarray, seen: list[np.ndarray], penalty: float
) -> np.ndarray:
    """Tokens already in a sequence: positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b, tokens in enumerate(seen):
        ids = np.unique(tokens)
        logits[b, ids] = penalized(logits[b, ids], penalty)
    return logits


def penalized(values: np.ndarray, penalty: float) -> np.ndarray:
    return np.where(values > 0, values / penalty, values * penalty)


def candidates(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Ids of the tokens of one row that survive top-k, then top-p, ascending (never empty).

    The sets of transformers' TopK and TopP warpers (ties at the k-th value stay; the nucleus
    is the best tokens whose mass before them is under top_p), found without sorting the whole
    vocabulary: a step's sampling must cost far less than the engine's step (on a 262k
    vocabulary a full sort takes milliseconds)."""
    if top_k and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        ids = np.flatnonzero(logits >= kth)
        x = logits[ids]  # as TopP sees them: after top-k
    else:
        ids, x = None, logits
    if top_p >= 1.0:
        return np.arange(logits.size) if ids is None else ids
    peak = x.max()
    e = np.exp(x - peak)  # float32 exp: float64's is slow in NumPy
    total = e.sum(dtype=np.float64)
    # The tokens below this floor hold at most half of 1 - top_p of the mass all together, so
    # the nucleus (the best-first prefix that reaches top_p) lies among the others.
    near = np.flatnonzero(e >= 0.5 * (1.0 - top_p) * total / x.size)
    best = near[np.argsort(-x[near], kind="stable")]
    probs = np.exp((x[best] - peak).astype(np.float64)) / total
    mass = np.cumsum(probs)
    keep = best[mass - probs < top_p]
    return np.sort(keep if ids is None else ids[keep])


BLOCK = 4096


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability softmax(logits): one uniform number, inverse CDF.

    Over more than BLOCK entries the CDF is walked block by block: a running sum over a whole
    262k vocabulary is sequential and costs more than a millisecond."""
    weights = logits - logits.max()
    np.exp(weights, out=weights)
    if weights.size <= BLOCK:
        return _inverse_cdf(np.cumsum(weights, dtype=np.float64), rng.random())
    whole = weights.size // BLOCK * BLOCK
    sums = weights[:whole].reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
    if whole < weights.size:
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    u = rng.random()
    b = _inverse_cdf(cdf, u)
    block = np.cumsum(weights[b * BLOCK : (b + 1) * BLOCK], dtype=np.float64)
    block += cdf[b - 1] if b else 0.0
    return b * BLOCK + _inverse_cdf(block, u, cdf[-1])


def _inverse_cdf(cdf: np.ndarray, u: float, total: float | None = None) -> int:
    """The first index whose running sum exceeds u * total (total: the last sum if None)."""
    target = u * (cdf[-1] if total is None else total)
    return min(int(np.searchsorted(cdf, target, side="right")), cdf.size - 1)


def next_tokens(
    logits: np.ndarray, params: SamplingParams, seen: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """int64 [B] next token ids from float32 logits [B, vocab]."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(axis=-1)
    return np.array([pick(row, None, params, rng) for row in logits], np.int64)


def next_tokens_from_top(
    values: np.ndarray,
    ids: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    log_normalizer: np.ndarray | None = None,
    whole_logits: Callable[[], np.ndarray] | None = None,
    seen: list[np.ndarray] | None = None,
) -> np.ndarray:
    """int64 [B] next token ids from each sequence's best K logits [B, K] and their ids [B, K]
    (the engine's top_logits/top_ids): the same tokens as `next_tokens` on the whole logits,
    for the same seed. Rows the best K do not decide are sampled from `whole_logits()`.

    With 0 < top_k <= K the best K are enough, also under a repetition penalty > 1 (for
    `seen` tokens) as long as the k-th best penalized logit stays above the K-th logit, which
    bounds every token beyond them; greedy decoding under a penalty is the case k = 1.
    Top-p without a top-k needs each row's `log_normalizer` (log sum exp(logits /
    temperature) over the vocabulary) and the best K to hold top_p."""
    penalty, k = params.repetition_penalty, 1 if params.greedy else params.top_k
    tokens, whole = [], None
    for b in range(len(values)):
        row, token = values[b], None
        if penalty != 1.0:
            row = row.copy()
            hit = np.isin(ids[b], seen[b])
            row[hit] = penalized(row[hit], penalty)
            decided = np.partition(row, -k)[-k] > values[b, -1]
        else:
            decided = True
        if decided and params.greedy:  # argmax's first index: the lowest id among ties
            token = int(ids[b][row == row.max()].min())
        elif decided:
            lse = None if log_normalizer is None else float(log_normalizer[b])
            token = pick(row, ids[b], params, rng, lse)
        if token is None:
            whole = whole_logits() if whole is None else whole
            own = apply_repetition_penalty(whole[b : b + 1], seen[b : b + 1], penalty)[0]
            token = int(own.argmax()) if params.greedy else pick(own, None, params, rng)
        tokens.append(token)
    return np.array(tokens, np.int64)


def pick(
    logits: np.ndarray,
    ids: np.ndarray | None,
    params: SamplingParams,
    rng: np.random.Generator,
    log_normalizer: float | None = None,
) -> int | None:
    """One sampled token id from one row of logits (whose token ids are `ids`, or the
    positions). The survivors are drawn from in token-id order, so that a seed picks the same
    token from the whole vocabulary as from the engine's best K.

    Given the row's log_normalizer, `logits` are the best K, best first, and the filter is
    top-p alone: the nucleus is found among them, or None is returned when it reaches beyond."""
    x = logits / np.float32(params.temperature)
    if log_normalizer is None:
        keep = candidates(x, params.top_k, params.top_p)  # ascending: token-id order for logits
    else:
        probs = np.exp((x - np.float32(log_normalizer)).astype(np.float64))
        mass = np.cumsum(probs)
        if mass[-1] < params.top_p:
            return None
        keep = np.flatnonzero(mass - probs < params.top_p)
    if ids is None and keep.size == x.size:  # no filter: every position, already in order
        return draw(x, rng)
    if ids is not None:
        keep = keep[np.argsort(ids[keep])]
    tokens = keep if ids is None else ids[keep]
    return int(tokens[draw(x[keep], rng)])
