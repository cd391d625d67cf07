"""Choosing the next token from logits: greedy, or sampling with the usual filters.

The order follows transformers' `generate`: repetition penalty, then temperature, top-k and
top-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty={self.repetition_penalty} must be > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

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
        values = logits[b, ids]
        logits[b, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best token always stays)."""
    logits = logits.copy()
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, -1:])
        probs /= probs.sum(axis=-1, keepdims=True)
        remove = np.cumsum(probs, axis=-1) <= 1 - top_p
        remove[:, -1] = False
        np.put_along_axis(logits, order, np.where(remove, -np.inf, sorted_logits), axis=-1)
    return logits


def next_tokens(
    logits: np.ndarray, params: SamplingParams, seen: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """int64 [B] next token ids from float32 logits [B, vocab]."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(axis=-1)
    logits = filter_top_k_top_p(logits / np.float32(params.temperature), params.top_k, params.top_p)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    probs = probs.astype(np.float64)
    return np.array([rng.choice(probs.shape[-1], p=p / p.sum()) for p in probs])
