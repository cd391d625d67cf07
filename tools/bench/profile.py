"""--profile: where an engine's decode step and prefill spend GPU time, kernel by kernel.

TensorRT-RTX compiles most of a network into a few fused regions, so TensorRT's per-layer
IProfiler names little; the kernels themselves are read through CUPTI, via torch.profiler
(torch is imported only here). Calls run plainly (no CUDA graph), each once untimed first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.readout import ARGMAX
from tools.bench import BenchError

TOP_KERNELS = 15


def kernel_profile(call: Any, repeats: int) -> dict[str, Any]:
    """Per kernel name: GPU us per call, launches per call, share of the call's kernel time."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        raise BenchError(f"--profile reads kernels through torch.profiler (CUPTI): {e}") from None
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if ev.device_type.name != "CUDA":
            continue
        us = (getattr(ev, "device_time_total", None) or ev.cuda_time_total) / repeats
        if us > 0:
            rows.append({"kernel": ev.key, "us": round(us, 2), "launches": ev.count / repeats})
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["share"] = round(r["us"] / total, 4) if total else 0.0
    return {
        "kernel_us": round(total, 1),
        "launches": sum(r["launches"] for r in rows),
        "kernels": rows,  # every kernel (the tables print the top TOP_KERNELS)
    }


def profile_engine(
    backend: Any, ids: np.ndarray, context: int, prompt_len: int, repeats: int = 5
) -> dict[str, Any]:
    """A batch-1 greedy decode step after `context` cached tokens, and a `prompt_len` prefill."""
    backend.reset(1)
    auto = backend.auto_graphs
    backend.auto_graphs = False  # kernels of plain calls
    try:
        pos = np.arange(prompt_len, dtype=np.int32)[None]
        prefill = kernel_profile(
            lambda: backend.forward(ids[:1, :prompt_len], pos, np.array([prompt_len - 1]), ARGMAX),
            repeats,
        )
        step = (ids[:1, context : context + 1], np.full((1, 1), context, np.int32))
        decode = kernel_profile(
            lambda: backend.forward(*step, np.zeros(1, np.int32), ARGMAX), repeats
        )
    finally:
        backend.auto_graphs = auto
    return {
        "decode": {"batch": 1, "context": context, **decode},
        "prefill": {"tokens": prompt_len, **prefill},
    }


def profile_tables(profile: dict[str, Any], format_table: Any) -> list[str]:
    parts = []
    for kind, title in (
        ("decode", f"decode step (batch 1, {profile['decode']['context']} cached tokens)"),
        ("prefill", f"prefill of {profile['prefill']['tokens']} tokens"),
    ):
        p = profile[kind]
        rows = [
            [r["kernel"][:80], r["us"], r["launches"], f"{100 * r['share']:.1f}%"]
            for r in p["kernels"][:TOP_KERNELS]
        ]
        parts.append(
            format_table(
                ["kernel", "us per call", "launches", "share"],
                rows,
                f"profile, {title}: {p['kernel_us']:.0f} us of kernels in {p['launches']:.0f} "
                f"launches (top {len(rows)} of {len(p['kernels'])} kernels)",
            )
        )
    return parts
