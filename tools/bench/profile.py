"""--profile: where an engine's decode step and prefill spend GPU time, kernel by kernel.

TensorRT-RTX compiles most of a network into a few fused regions, so TensorRT's per-layer
IProfiler names little; the kernels themselves are read through CUPTI, via torch.profiler
(torch is imported only here). Calls run plainly (no CUDA graph), each once untimed first;
a decode step also as the CUDA graph replay that tools.bench times, for the time its
kernels leave the GPU idle: an engine whose second decode context slowed steps by 0.17 ms
had the same kernels of the same durations (docs/benchmarks.md, twentieth session).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from runtime.readout import ARGMAX
from tools.bench import BenchError
from tools.bench.timing import fill_cache

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
    launched = [  # (start us, name, us) of every kernel and copy, for the last call's order
        (ev.time_range.start, ev.name, ev.time_range.elapsed_us())
        for ev in prof.events()
        if ev.device_type.name == "CUDA"
    ]
    last = last_call(launched, repeats)
    span, idle = timeline(last)
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
        "sequence": [{"kernel": name, "us": round(us, 2)} for _, name, us in last],
        "span_us": span,  # the last call: first start to last end on the GPU
        "idle_us": idle,  # ... less the time some kernel or copy ran
    }


def last_call(
    launched: list[tuple[float, str, float]], repeats: int
) -> list[tuple[float, str, float]]:
    """The (start us, name, us) of the last of `repeats` identical calls, in launch order."""
    per_call = len(launched) // repeats
    return sorted(launched)[-per_call:] if per_call else []


def timeline(call: list[tuple[float, str, float]]) -> tuple[float, float]:
    """A call's span (us from its first start to its last end; `call` in launch order) and
    the part of it no kernel or copy ran in (they may overlap on aux streams)."""
    busy, end = 0.0, None
    for start, _, us in call:
        if end is None or start >= end:
            busy, end = busy + us, start + us
        elif start + us > end:
            busy, end = busy + start + us - end, start + us
    span = end - call[0][0] if call else 0.0
    return round(span, 1), round(span - busy, 1)


def after_last_matmul(sequence: list[dict[str, Any]]) -> tuple[int, float]:
    """Launches and us after a call's last matmul kernel: in a decode step, what the LM
    head's logits go through (the sampling outputs, issue 18 item 4). Fused attention
    kernels (`*_mha_*`) are not matmuls here."""
    names = [k["kernel"].lower() for k in sequence]
    matmuls = [i for i, n in enumerate(names) if ("matmul" in n or "gemm" in n) and "mha" not in n]
    tail = sequence[matmuls[-1] + 1 :] if matmuls else []
    return len(tail), sum(k["us"] for k in tail)


def profile_engine(
    backend: Any,
    ids: np.ndarray,
    context: int,
    prompt_len: int,
    batches: Sequence[int] = (1,),
    repeats: int = 5,
) -> dict[str, Any]:
    """A greedy decode step after `context` cached tokens at batch 1 and at the largest of
    `batches` (its matmuls take other kernels than batch 1's), and a `prompt_len` prefill."""
    auto = backend.auto_graphs
    backend.auto_graphs = False  # kernels of plain calls
    try:
        backend.reset(1)
        pos = np.arange(prompt_len, dtype=np.int32)[None]
        prefill = kernel_profile(
            lambda: backend.forward(ids[:1, :prompt_len], pos, np.array([prompt_len - 1]), ARGMAX),
            repeats,
        )
        decode = []
        for b in sorted({1, max(batches)}):
            backend.reset(b)
            fill_cache(backend, ids, b, context)
            step = partial(
                backend.forward,
                ids[:b, context : context + 1],
                np.full((b, 1), context, np.int32),
                np.zeros(b, np.int32),
                ARGMAX,
            )
            plain = kernel_profile(step, repeats)
            backend.auto_graphs = True  # captured on the first (untimed) call, then replayed
            graphed = kernel_profile(step, repeats)
            backend.auto_graphs = False
            graph = {k: graphed[k] for k in ("kernel_us", "launches", "span_us", "idle_us")}
            decode.append({"batch": b, "context": context, **plain, "graph": graph})
    finally:
        backend.auto_graphs = auto
    return {"decode": decode, "prefill": {"tokens": prompt_len, **prefill}}


def profile_tables(profile: dict[str, Any], format_table: Any) -> list[str]:
    """One table per profiled call: each decode batch, then the prefill."""
    parts = []
    calls = [
        (p, f"decode step (batch {p['batch']}, {p['context']} cached tokens)")
        for p in profile["decode"]
    ]
    calls.append((profile["prefill"], f"prefill of {profile['prefill']['tokens']} tokens"))
    for p, title in calls:
        rows = [
            [r["kernel"][:80], r["us"], r["launches"], f"{100 * r['share']:.1f}%"]
            for r in p["kernels"][:TOP_KERNELS]
        ]
        table = format_table(
            ["kernel", "us per call", "launches", "share"],
            rows,
            f"profile, {title}: {p['kernel_us']:.0f} us of kernels in {p['launches']:.0f} "
            f"launches (top {len(rows)} of {len(p['kernels'])} kernels)",
        )
        if p.get("span_us"):
            table += (
                f"\nthe GPU ran it in {p['span_us']:.0f} us, {p['idle_us']:.0f} of them between "
                "kernels and copies"
            )
        if p.get("graph"):
            g = p["graph"]
            table += (
                f"\nas a CUDA graph replay (as timed): {g['kernel_us']:.0f} us of kernels in "
                f"{g['launches']:.0f} launches, run in {g['span_us']:.0f} us, "
                f"{g['idle_us']:.0f} of them between kernels and copies"
            )
        if "batch" in p and p.get("sequence"):
            n, us = after_last_matmul(p["sequence"])
            share = us / p["kernel_us"] if p["kernel_us"] else 0.0
            table += (
                f"\nafter the LM head (the sampling outputs): {n} launches, {us:.0f} us, "
                f"{100 * share:.1f}% of the step"
            )
        parts.append(table)
    return parts
