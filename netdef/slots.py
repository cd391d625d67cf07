"""Which KV-cache slots a call's attention reads: the `kv_slots` and `window_slots` inputs.

A decode step after n cached tokens should read about n slots on global layers and at most
the window on sliding layers, not the whole `max_seq_len` cache. The network gathers the
slots these inputs name and masks them by position, so any superset of the visible slots
gives the same result; the runtime picks small ones:

- `kv_slots` int32 [L]: 0, 1, ..., L-1, read by every global layer. L is the batch's
  furthest position + 1 rounded up to a power of two (at least `MIN_SLOTS`), so a decode
  loop meets few distinct shapes: each is a CUDA graph, and TensorRT-RTX compiles kernels
  for each new shape.
- `window_slots` int32 [B, Lw]: per sequence, the slots its sliding-window layers read:
  the `window - 1` before its first new token and the new ones (negative before slot 0), or
  the global slots when those are fewer.
"""

from __future__ import annotations

import numpy as np

MIN_SLOTS = 256


def layer_windows(windows: list[int | None], max_seq_len: int) -> list[int | None]:
    """Each layer's sliding window as the network applies it: None (global) also where the
    window spans the whole cache."""
    return [w if w and w < max_seq_len else None for w in windows]


def attention_window(windows: list[int | None]) -> int | None:
    """The window `window_slots` covers (the largest of `layer_windows`), or None."""
    return max((w for w in windows if w), default=None)


def kv_length(need: int, max_seq_len: int) -> int:
    """The `kv_slots` length for a call whose furthest token sits in slot need - 1."""
    return min(max_seq_len, max(MIN_SLOTS, 1 << (max(need, 1) - 1).bit_length()))


def window_slots(positions: np.ndarray, length: int, window: int) -> np.ndarray:
    """int32 [B, Lw]: the slots the sliding layers of each row read, for a call with
    position_ids [B, S] whose `kv_slots` has `length` slots."""
    b, s = positions.shape
    if window + s - 1 < length:
        first = positions[:, :1] - (window - 1)
        return first + np.arange(window + s - 1, dtype=np.int32)
    return np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()


def slot_feeds(
    positions: np.ndarray, max_seq_len: int, window: int | None
) -> dict[str, np.ndarray]:
    """`kv_slots` (and `window_slots` for networks with sliding layers of `window`) for a call
    with int32 position_ids [B, S] (row b is p_b, p_b + 1, ...)."""
    length = kv_length(int(positions[:, -1].max()) + 1, max_seq_len)
    feeds = {"kv_slots": np.arange(length, dtype=np.int32)}
    if window is not None:
        feeds["window_slots"] = window_slots(positions, length, window)
    return feeds
