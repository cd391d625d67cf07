"""The roofline: bytes a decode step must read, and measured latency as a multiple of the time
those bytes take at the device's memory bandwidth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from netdef.options import DTYPE_BYTES, kv_slot_bytes
from netdef.slots import prefix_length
from tools.bench.timing import Plan


def weight_read_bytes(config: Any, dtype: str, batch: int) -> int:
    """Weight bytes one decode step reads: every matrix once, norm scales (float32 where the
    family keeps them so), and of an untied embedding table only the looked-up rows (a tied
    table is read whole by the LM head)."""
    item = DTYPE_BYTES[dtype]
    total = 0
    for name, shape in config.tensor_shapes().items():
        n = math.prod(shape)
        if name == "embed_tokens.weight" and not config.tie_word_embeddings:
            n = batch * config.hidden_size
        size = 4 if name.endswith("norm.weight") and config.norm_weight_in_float32 else item
        total += n * size
    return total


def kv_read_bytes(config: Any, dtype: str, batch: int, attended: int) -> int:
    """KV-cache bytes one decode step must read when its token attends to `attended` slots
    (fewer on sliding-window layers)."""
    slots = sum(
        min(attended, layer.sliding_window) if layer.sliding_window else attended
        for layer in config.layers
    )
    return batch * slots * kv_slot_bytes(config, dtype)


def decode_read_bytes(
    config: Any, dtype: str, batch: int, attended: int, cache_len: int | None = None
) -> dict[str, int]:
    """Weights + KV bytes of one decode step. `kv_as_built` is what this project's engines
    read (netdef.slots): global layers the positions up to `attended` rounded up to a power
    of two (at least MIN_SLOTS, at most `cache_len`), sliding layers at most their window."""
    w = weight_read_bytes(config, dtype, batch)
    kv = kv_read_bytes(config, dtype, batch, attended)
    out = {"weights": w, "kv": kv, "total": w + kv}
    if cache_len:
        prefix = prefix_length(np.array([[attended - 1]]), cache_len)
        slots = sum(
            min(layer.sliding_window, prefix) if layer.sliding_window else prefix
            for layer in config.layers
        )
        out["kv_as_built"] = batch * slots * kv_slot_bytes(config, dtype)
    return out


def floor_ms(nbytes: float, gbs: float) -> float:
    """Milliseconds to move `nbytes` at `gbs` GB/s (10^9 bytes per second)."""
    return nbytes / (gbs * 1e9) * 1e3


def roofline_rows(
    config: Any,
    dtype: str,
    plan: Plan,
    bandwidth_gbs: float,
    measured: dict[str, dict[int, float]],
    cache_len: int | None = None,
) -> list[dict[str, Any]]:
    """One row per decode batch: bytes, floor, and each measured series' median ms as a
    multiple of the floor."""
    rows = []
    for b in plan.batches:
        nbytes = decode_read_bytes(config, dtype, b, plan.attended, cache_len)
        row: dict[str, Any] = {
            "batch": b,
            "attended_slots": plan.attended,
            "bytes": nbytes,
            "floor_ms": floor_ms(nbytes["total"], bandwidth_gbs),
        }
        if "kv_as_built" in nbytes:
            row["floor_as_built_ms"] = floor_ms(
                nbytes["weights"] + nbytes["kv_as_built"], bandwidth_gbs
            )
        for name, by_batch in measured.items():
            if b in by_batch:
                row[name] = {"median_ms": by_batch[b], "x_floor": by_batch[b] / row["floor_ms"]}
        rows.append(row)
    return rows
