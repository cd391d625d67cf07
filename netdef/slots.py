"""Which KV-cache slots hold which positions, and which positions a call's sliding layers read.

Global layers keep `max_seq_len` slots, position p in slot p. A sliding-window layer keeps a
ring of `ring_length` slots, position p in slot p mod ring: a call of S tokens from position p
writes p .. p+S-1 before its queries read, and its first query still needs p-window+1 .. p, so
the ring holds window + max_prefill - 1 slots (mlx-lm's RotatingKVCache likewise grows to
max_size + S - 1 during a prefill). Its writes are contiguous (TensorRT's KVCacheUpdate), so
no row of a call may cross a ring's end: `call_end` (and `prompt_chunks`) split prompts there
and `ring_crossing` refuses other calls.

A decode step after n cached tokens should read O(n) slots on global layers and at most the
window on sliding layers, not the whole cache. Sliding layers gather the positions the
`window_positions` input names (from slot position mod ring), global layers read slots
0 .. Lg-1 as a slice (`global_positions` is 0 .. Lg-1), and both mask them by position, so
any superset of the visible positions gives the same result; the runtime picks small ones:
global layers read positions 0 .. P-1, P the call's furthest position + 1 rounded up to a
power of two (at least `MIN_SLOTS`); sliding layers, per sequence, the `window - 1`
positions before its first new token and the new ones (negative before position 0), or
0 .. P-1 when that is fewer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .contract import GLOBAL_POSITIONS, WINDOW_POSITIONS

MIN_SLOTS = 256


def layer_windows(windows: list[int | None], max_seq_len: int) -> list[int | None]:
    """Each layer's sliding window as the network applies it: None (global) also where the
    window spans the whole cache."""
    return [w if w and w < max_seq_len else None for w in windows]


def attention_window(windows: list[int | None]) -> int | None:
    """The window `window_positions` covers (the largest of `layer_windows`), or None."""
    return max((w for w in windows if w), default=None)


def ring_length(window: int | None, max_seq_len: int, max_prefill: int) -> int:
    """KV slots of a layer: max_seq_len for a global one, window + max_prefill - 1 (at most
    max_seq_len) for a sliding one."""
    return max_seq_len if window is None else min(max_seq_len, window + max_prefill - 1)


def rings(cache_slots: Iterable[int], max_seq_len: int) -> tuple[int, ...]:
    """The distinct ring lengths among a network's per-layer cache slots (shorter than the
    whole cache: a ring of max_seq_len slots never wraps)."""
    return tuple(sorted({n for n in cache_slots if n < max_seq_len}))


def call_end(start: int, stop: int, max_prefill: int, ring_lengths: Iterable[int]) -> int:
    """Where the prompt chunk from position `start` ends (exclusive, at most `stop`): at most
    max_prefill tokens, and never across the end of a ring."""
    end = min(stop, start + max_prefill)
    for n in ring_lengths:
        end = min(end, (start // n + 1) * n)
    return end


def prompt_chunks(
    stop: int, max_prefill: int, ring_lengths: Iterable[int]
) -> Iterator[tuple[int, int]]:
    """(start, end) of each prompt chunk from position 0 to `stop`, cut by `call_end`."""
    start = 0
    while start < stop:
        end = call_end(start, stop, max_prefill, ring_lengths)
        yield start, end
        start = end


def ring_crossing(positions: np.ndarray, ring_lengths: Iterable[int]) -> str | None:
    """Why a call with position_ids [B, S] cannot run (a row crosses a ring's end), or None."""
    s = positions.shape[1]
    first = positions[:, 0].tolist()  # Python ints: a decode step's rows cost less than NumPy
    for n in ring_lengths:
        for b, p in enumerate(first):
            if p % n + s <= n:
                continue
            return (
                f"row {b}'s positions {p}..{p + s - 1} cross the end of a sliding-window ring "
                f"of {n} KV slots (at position {(p // n + 1) * n}); split the call there "
                "(netdef.slots.call_end)"
            )
    return None


def prefix_length(positions: np.ndarray, max_seq_len: int) -> int:
    """How many positions from 0 a call reads at most: its furthest position + 1, rounded up
    to a power of two (at least MIN_SLOTS, at most max_seq_len), so few shapes recur."""
    need = max(positions[:, -1].tolist()) + 1
    return min(max_seq_len, max(MIN_SLOTS, 1 << (need - 1).bit_length()))


def window_positions(positions: np.ndarray, max_seq_len: int, window: int) -> np.ndarray:
    """int32 [B, Lw]: the positions the sliding layers of each row read, for a call with
    position_ids [B, S] (row b is p_b, p_b + 1, ...)."""
    b, s = positions.shape
    prefix = prefix_length(positions, max_seq_len)
    if window + s - 1 < prefix:
        return positions[:, :1] + np.arange(1 - window, s, dtype=np.int32)
    return np.broadcast_to(np.arange(prefix, dtype=np.int32), (b, prefix)).copy()


def slot_feeds(
    positions: np.ndarray, max_seq_len: int, window: int | None, has_global: bool
) -> dict[str, np.ndarray]:
    """The position inputs of a call: `window_positions` for networks with sliding layers of
    `window`, `global_positions` (0 .. prefix_length - 1) for networks with global layers."""
    feeds = {}
    if window is not None:
        feeds[WINDOW_POSITIONS] = window_positions(positions, max_seq_len, window)
    if has_global:
        feeds[GLOBAL_POSITIONS] = np.arange(prefix_length(positions, max_seq_len), dtype=np.int32)
    return feeds
