"""Which KV-cache slots a call's sliding-window layers read: the `window_slots` input.

A decode step should read at most the window on sliding layers, not the whole
`max_seq_len` cache. The network gathers the slots `window_slots` names and masks them by
position, so any superset of the visible slots gives the same result; the runtime picks
small ones: per sequence, the `window - 1` slots before its first new token and the new
ones (negative before slot 0), or, when the call's furthest position + 1 rounded up to a
power of two (at least `MIN_SLOTS`) is fewer, slots 0 .. that - 1. Global layers read the
whole cache (netdef.decoder.attend says why).
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


def window_slots(positions: np.ndarray, max_seq_len: int, window: int) -> np.ndarray:
    """int32 [B, Lw]: the slots the sliding layers of each row read, for a call with
    position_ids [B, S] (row b is p_b, p_b + 1, ...)."""
    b, s = positions.shape
    need = int(positions[:, -1].max()) + 1
    prefix = min(max_seq_len, max(MIN_SLOTS, 1 << (need - 1).bit_length()))
    if window + s - 1 < prefix:
        first = positions[:, :1] - (window - 1)
        return first + np.arange(window + s - 1, dtype=np.int32)
    return np.broadcast_to(np.arange(prefix, dtype=np.int32), (b, prefix)).copy()


def slot_feeds(
    positions: np.ndarray, max_seq_len: int, window: int | None
) -> dict[str, np.ndarray]:
    """`window_slots` for networks with sliding layers of `window` (else nothing)."""
    if window is None:
        return {}
    return {"window_slots": window_slots(positions, max_seq_len, window)}
