"""Choosing the next token from logits: greedy, or sampling with the usual filters.

The order follows transformers' `generate`: repetition penalty, then temperature, top-k and
top-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from weights.config import is_int

# Temperatures below this are greedy, as in vLLM (_SAMPLING_EPS): the logits over T leave
# float32 (1e-38 drew special tokens), and sampling them is argmax up to exact ties anyway.
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """A sampling parameter of the wrong type or out of range; `field` names it, so a CLI
    can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def is_number(value: object) -> bool:
    """A finite real number (NumPy's too), not a bool: inf or NaN would sample nonsense."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes: greedy by default (temperature 0), else sampled with
    transformers' filters; `seed` makes sampling reproducible. Checked on creation
    (`SamplingError` names the field)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW, made 0) means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not in the output (one str or a list: made a tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str | list):  # one string is one stop, not one per character
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
            object.__setattr__(self, "stop", stop)
        kinds = [
            ("max_new_tokens", is_int(self.max_new_tokens), "an integer"),
            ("temperature", is_number(self.temperature), "a finite number"),
            ("top_k", is_int(self.top_k), "an integer"),
            ("top_p", is_number(self.top_p), "a finite number"),
            ("repetition_penalty", is_number(self.repetition_penalty), "a finite number"),
            ("seed", self.seed is None or is_int(self.seed), "an integer or None"),
            (
                "stop",
                isinstance(self.stop, tuple) and all(isinstance(s, str) for s in self.stop),
                "a string or a tuple of strings",
            ),
        ]
        for field, ok, kind in kinds:
            if not ok:
                raise SamplingError(field, f"{field}={getattr(self, field)!r} must be {kind}.")
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**32, "must be in [0, 2**32)"),
            ("stop", all(self.stop), "must not hold an empty string (it would stop at once)"),
        ]
        for field, ok, need in checks:
            if not ok:
                raise SamplingError(field, f"{field}={getattr(self, field)} {need}.")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

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
    keep = near[nucleus(x[near], peak, total, top_p)]  # ascending, as near and ids are
    return keep if ids is None else ids[keep]


BLOCK = 4096


def nucleus(x: np.ndarray, peak: float, total: float, top_p: float) -> np.ndarray:
    """Which of x (a mask) make its best-first prefix whose mass before each is under top_p
    (each value's probability exp(x - peak) / total; ties in index order).

    A flat row keeps most of the vocabulary, and sorting it costs tens of milliseconds: over
    more than BLOCK values, they are binned by size (BLOCK bins over their range), whole bins
    are kept while the mass before them is under top_p, and only the bin where it reaches
    top_p is sorted."""
    probs = np.exp((x - peak).astype(np.float64)) / total
    keep = np.zeros(x.size, bool)
    if x.size <= BLOCK:
        best = np.argsort(-x, kind="stable")
        keep[best[np.cumsum(probs[best]) - probs[best] < top_p]] = True
        return keep
    span = float(peak) - float(x.min())
    scale = BLOCK / span if span > 0 else 0.0
    # float64 and monotone: a larger value never lands in a later bin
    bins = np.minimum(((peak - x.astype(np.float64)) * scale).astype(np.intp), BLOCK - 1)
    cum = np.cumsum(np.bincount(bins, weights=probs, minlength=BLOCK))
    b = min(int(np.searchsorted(cum, top_p, side="left")), BLOCK - 1)  # the first to reach it
    edge = np.flatnonzero(bins == b)
    edge = edge[np.argsort(-x[edge], kind="stable")]
    before = (cum[b - 1] if b else 0.0) + np.cumsum(probs[edge]) - probs[edge]
    np.less(bins, b, out=keep)
    keep[edge[before < top_p]] = True
    return keep


def draw(logits: np.ndarray, u: float) -> int:
    """The index softmax(logits) gives the uniform number u by inverse CDF.

    Over more than BLOCK entries the CDF is walked block by block: a running sum over a whole
    262k vocabulary is sequential and costs more than a millisecond."""
    weights = logits - logits.max()
    np.exp(weights, out=weights)
    if weights.size <= BLOCK:
        return _inverse_cdf(np.cumsum(weights, dtype=np.float64), u)
    whole = weights.size // BLOCK * BLOCK
    sums = weights[:whole].reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
    if whole < weights.size:
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    b = _inverse_cdf(cdf, u)
    block = np.cumsum(weights[b * BLOCK : (b + 1) * BLOCK], dtype=np.float64)
    block += cdf[b - 1] if b else 0.0
    return b * BLOCK + _inverse_cdf(block, u, cdf[-1])


def _inverse_cdf(cdf: np.ndarray, u: float, total: float | None = None) -> int:
    """The first index whose running sum exceeds u * total (total: the last sum if None)."""
    target = u * (cdf[-1] if total is None else total)
    return min(int(np.searchsorted(cdf, target, side="right")), cdf.size - 1)


def uniforms(params: SamplingParams, rng: np.random.Generator, n: int) -> np.ndarray | None:
    """The uniform numbers a step of n sequences draws from: one per sequence, in row order,
    whatever path then draws its token (none for greedy decoding)."""
    return None if params.greedy else rng.random(n)


def next_tokens(
    logits: np.ndarray, params: SamplingParams, seen: list[np.ndarray], u: np.ndarray | None
) -> np.ndarray:
    """int64 [B] next token ids from float32 logits [B, vocab], each row's by its uniform
    number in u [B] (`uniforms`)."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(axis=-1)
    return np.array([pick(row, params, ub) for row, ub in zip(logits, u)], np.int64)


def next_tokens_from_top(
    values: np.ndarray,
    ids: np.ndarray,
    params: SamplingParams,
    u: np.ndarray | None,
    log_normalizer: np.ndarray | None = None,
    whole_logits: Callable[[], np.ndarray] | None = None,
    seen: list[np.ndarray] | None = None,
) -> np.ndarray:
    """int64 [B] next token ids from each sequence's best K logits [B, K] and their ids [B, K]
    (the engine's top_logits/top_ids): the same tokens as `next_tokens` on the whole logits,
    for the same uniform numbers u. Rows the best K do not decide are sampled from
    `whole_logits()`.

    With 0 < top_k <= K the best K are enough, also under a repetition penalty > 1 (for
    `seen` tokens) as long as the k-th best penalized logit stays above the K-th logit, which
    bounds every token beyond them; greedy decoding under a penalty is the case k = 1.
    Top-p without a top-k needs each row's `log_normalizer` (log sum exp(logits /
    temperature) over the vocabulary) and the best K to hold top_p."""
    penalty, k = params.repetition_penalty, 1 if params.greedy else params.top_k
    rows, decided = values, np.ones(len(values), bool)
    if penalty != 1.0:  # penalized, then best first again (ties keep their order)
        rows = values.copy()
        for b, tokens_seen in enumerate(seen):
            hit = np.isin(ids[b], tokens_seen)
            rows[b, hit] = penalized(rows[b, hit], penalty)
        order = np.argsort(-rows, axis=1, kind="stable")
        at = np.arange(len(rows))[:, None]
        rows, ids = rows[at, order], ids[at, order]
        decided = rows[:, k - 1] > values[:, -1]
    if params.greedy:  # argmax's first index: the lowest id among ties
        best = rows == rows.max(axis=1, keepdims=True)
        tokens = np.where(best, ids, np.iinfo(ids.dtype).max).min(axis=1).astype(np.int64)
    else:
        tokens, held = sample_best_k(rows, ids, params, u, log_normalizer)
        decided &= held
    if not decided.all():
        whole = whole_logits()
        for b in np.flatnonzero(~decided):
            own = whole[b]
            if penalty != 1.0:
                own = apply_repetition_penalty(whole[b : b + 1], seen[b : b + 1], penalty)[0]
            tokens[b] = own.argmax() if params.greedy else pick(own, params, u[b])
    return tokens


def sample_best_k(
    values: np.ndarray,
    ids: np.ndarray,
    params: SamplingParams,
    u: np.ndarray,
    log_normalizer: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [B] tokens, bool [B] decided) drawn from each row's K logits `values` [B, K],
    best first (ties in any order), with ids [B, K], by the uniform numbers u [B]: the
    filters and the draw `pick` applies to a whole row (survivors drawn from in token-id
    order), for all rows in whole-array operations (docs/benchmarks.md: a step of 16
    sequences 3x faster than row by row, a single sequence 15-35 us slower).

    Without `log_normalizer`, top-k (k <= K) then top-p decide every row. With it (top-p
    alone), a row is decided when its best K hold top_p of the vocabulary's mass; then
    the nucleus is the best-first prefix of them whose mass before each is under top_p."""
    x = values / np.float32(params.temperature)
    below = x - x[:, :1]  # x[:, 0] is each row's best: `pick` weighs survivors by exp(below)
    weights = np.exp(below)
    k, top_p, keep = min(params.top_k or x.shape[1], x.shape[1]), params.top_p, None
    decided = np.ones(len(x), bool)
    if log_normalizer is not None:
        probs = np.exp((x - log_normalizer.astype(np.float32)[:, None]).astype(np.float64))
        mass = np.cumsum(probs, axis=1)
        keep, decided = mass - probs < top_p, mass[:, -1] >= top_p
    else:
        if k < x.shape[1]:
            keep = x >= x[:, k - 1 : k]  # top-k: ties at the k-th value stay
        if top_p < 1.0:  # top-p among those, over their mass alone (as `candidates`)
            e, n = weights, x.shape[1]
            if keep is not None:
                e, n = np.where(keep, weights, np.float32(0)), keep.sum(axis=1, keepdims=True)
            total = e.sum(axis=1, dtype=np.float64, keepdims=True)
            near = e >= 0.5 * (1.0 - top_p) * total / n  # `candidates`' floor
            probs = np.where(near, np.exp(below.astype(np.float64)) / total, 0.0)
            keep = near & (np.cumsum(probs, axis=1) - probs < top_p)
    rows = np.arange(len(x))[:, None]
    if keep is None:  # every one of the K survives
        order = np.argsort(ids, axis=1)  # token-id order
        cdf = np.cumsum(weights[rows, order], axis=1, dtype=np.float64)
        last = np.full(len(x), x.shape[1] - 1)
    else:
        order = np.argsort(np.where(keep, ids, np.iinfo(ids.dtype).max), axis=1)
        kept = keep[rows, order]
        cdf = np.cumsum(
            np.where(kept, weights[rows, order], np.float32(0)), axis=1, dtype=np.float64
        )
        last = kept.sum(axis=1) - 1
    target = u * cdf[rows[:, 0], last]
    index = np.minimum((cdf <= target[:, None]).sum(axis=1), last)
    return ids[rows[:, 0], order[rows[:, 0], index]].astype(np.int64), decided


def pick(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """The token a whole row of logits gives the uniform number u: the filters' survivors
    are drawn from in token-id order, so that u picks the same token from the whole
    vocabulary as from the engine's best K (`sample_best_k`)."""
    x = logits / np.float32(params.temperature)
    keep = candidates(x, params.top_k, params.top_p)  # ascending: token-id order
    if keep.size == x.size:  # no filter: every position, already in order
        return draw(x, u)
    return int(keep[draw(x[keep], u)])
