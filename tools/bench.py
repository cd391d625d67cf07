"""Benchmarks: TensorRT engine latency on a GPU; engine builds and the NumPy executor on the CPU.

    python -m tools.bench ARTIFACT_OR_MODEL [--compare-transformers] [--json FILE]   # GPU
    python -m tools.bench --build MODEL [MODEL ...] [--target sm89] [--json FILE]     # CPU
    python -m tools.bench --cpu MODEL [--json FILE]                                   # CPU
    python -m tools.bench --make-random gemma-3-1b --out DIR                          # CPU

GPU (TensorRT backend, CUDA events through `TensorRTBackend.last_call_ms`): prefill latency
per prompt length and decode latency per batch size (one call = H2D of the inputs, the engine,
D2H of the logits; decode steps replay a CUDA graph unless --no-graph), each after warm-up
rounds, as min and median over timed rounds. Given a model rather than an artifact, it builds
the engine for this GPU; unless --no-compare-profiles it also builds the same model with one
`dynamic` profile and prints both engines' per-call latency with the speedup of the
decode+prefill engine. The roofline divides the bytes a decode step must read (weights + the
KV-cache slots its tokens attend to) by the device's measured copy bandwidth and prints the
measured latency as a multiple of that floor. --compare-transformers times transformers on
the same prompts in the same run (torch is imported only then). --no-engine measures all of
that except the engine (for a GPU without TensorRT).

--build builds each model's engine in a child process (tools.build.build, TensorRT-RTX ahead
of time for --target) and reports its wall time and peak RSS (the child's own rusage from
wait4, plus /proc polling for the anonymous/file-backed split and per-phase figures), also as
a multiple of the checkpoint size. --cpu times the NumPy executor (runtime.cpu.CpuModel)
against transformers on the CPU. --make-random writes a checkpoint with a real model's shapes
and random bfloat16 weights, streamed tensor by tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPT_LENS = (128, 512, 2048)
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_CONTEXT = 128  # tokens in the cache before the timed decode steps
PHASE_DEPTH = 3  # builder phases recorded by --build (deeper ones repeat per layer/tensor)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
HF_MODES = ("eager", "static-compile")
GiB, MiB = 1 << 30, 1 << 20


class BenchError(RuntimeError):
    """A benchmark request that cannot be carried out as given."""


# ---- small pure helpers: option lists, statistics, formatting ----


def int_list(text: str) -> list[int]:
    """'128,512' -> [128, 512] (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 1,4,16; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def fit_to_engine(
    requested: Sequence[int] | None, default: Sequence[int], maximum: int, what: str
) -> list[int]:
    """Sorted unique sizes. Explicit ones must fit the engine's `maximum`; defaults are clipped
    to it (128, 512, 2048 with a max of 1024 -> 128, 512, 1024)."""
    if requested:
        if too_big := sorted(v for v in set(requested) if v > maximum):
            raise BenchError(
                f"{what} {too_big} exceed the engine's maximum of {maximum}; "
                "ask for less or rebuild the engine with larger limits."
            )
        return sorted(set(requested))
    return sorted({min(v, maximum) for v in default})


@dataclass(frozen=True)
class Plan:
    """The shapes one GPU run measures."""

    prompt_lens: list[int]  # prefill, batch 1
    batches: list[int]  # decode
    context: int  # cached tokens before the first timed decode step
    steps: int  # decode steps per round

    @property
    def attended(self) -> int:
        """Cache slots the middle decode step attends to (its own included)."""
        return self.context + (self.steps + 1) // 2


def plan_shapes(
    prompt_lens: Sequence[int] | None,
    batches: Sequence[int] | None,
    context: int | None,
    steps: int,
    *,
    max_batch: int,
    max_prefill: int,
    max_seq_len: int,
) -> Plan:
    """Requested or default shapes, checked against (defaults clipped to) the engine's limits."""
    if steps < 1 or steps > max_seq_len:
        raise BenchError(f"--steps {steps} must be between 1 and max_seq_len={max_seq_len}.")
    if context is None:
        context = max(0, min(DEFAULT_CONTEXT, max_seq_len - steps))
    elif context < 0 or context + steps > max_seq_len:
        raise BenchError(
            f"--context {context} + --steps {steps} exceed the engine's max_seq_len={max_seq_len}."
        )
    return Plan(
        fit_to_engine(
            prompt_lens, DEFAULT_PROMPT_LENS, min(max_prefill, max_seq_len), "--prompt-lens"
        ),
        fit_to_engine(batches, DEFAULT_BATCHES, max_batch, "--batches"),
        context,
        steps,
    )


def stats(samples_ms: Sequence[float]) -> dict[str, float]:
    return {
        "min_ms": float(min(samples_ms)),
        "median_ms": float(statistics.median(samples_ms)),
        "rounds": len(samples_ms),
    }


def fmt(value: Any) -> str:
    """Table cell: '-' for missing, 3-4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float | np.floating):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    return (
        f"{value:.0f}"
        if a >= 100
        else f"{value:.1f}"
        if a >= 10
        else f"{value:.2f}"
        if a >= 1
        else f"{value:.3f}"
    )


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """Aligned plain-text table: text columns left-aligned, numbers right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(r[i], int | float | np.number) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


class Report(dict):
    """The JSON report; `save()` rewrites --json after each section, so an interrupted run
    keeps what it measured."""

    def __init__(self, path: Path | None, **fields: Any):
        super().__init__(**fields)
        self.path = path

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = os.getloadavg()[0]  # 1-minute; others' work shows here
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        )
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["memory_bytes"] = int(mem.split()[1]) * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return info


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    by_module = metadata.packages_distributions()
    for module in ("numpy", "ml_dtypes", "tensorrt_rtx", "tensorrt", "torch", "transformers"):
        for dist in by_module.get(module, [])[:1]:
            out[module] = metadata.version(dist)
    for dist in ("cuda-python", "cuda-bindings"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


# ---- roofline: bytes a decode step must read ----


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
    per_slot = 2 * config.num_kv_heads * config.head_dim * DTYPE_BYTES[dtype]  # key + value
    slots = sum(
        min(attended, layer.sliding_window) if layer.sliding_window else attended
        for layer in config.layers
    )
    return batch * slots * per_slot


def decode_read_bytes(
    config: Any, dtype: str, batch: int, attended: int, cache_len: int | None = None
) -> dict[str, int]:
    """Weights + KV bytes of one decode step. `kv_as_built` is what this project's engines
    read: their attention sees every one of the `cache_len` slots and masks the unused ones."""
    w = weight_read_bytes(config, dtype, batch)
    kv = kv_read_bytes(config, dtype, batch, attended)
    out = {"weights": w, "kv": kv, "total": w + kv}
    if cache_len:
        per_slot = 2 * config.num_kv_heads * config.head_dim * DTYPE_BYTES[dtype]
        out["kv_as_built"] = batch * config.num_layers * cache_len * per_slot
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


# ---- timing loops over any runtime.backend.Backend ----


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, length] (ids 0-3 are left out: special tokens in most vocabularies)."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(4, vocab - 1), vocab, size=(batch, length), dtype=np.int32)


def timed_call(backend: Any, ids: np.ndarray, positions: np.ndarray, last: np.ndarray) -> float:
    """Milliseconds of one forward: CUDA events where the backend keeps `last_call_ms`
    (TensorRTBackend), else wall clock."""
    t0 = time.perf_counter()
    backend.forward(ids, positions, last)
    wall = (time.perf_counter() - t0) * 1e3
    return float(backend.last_call_ms) if hasattr(backend, "last_call_ms") else wall


def fill_cache(backend: Any, ids: np.ndarray, batch: int, length: int) -> None:
    """Prefill `length` tokens of `batch` sequences, in chunks of the backend's max_prefill."""
    for start in range(0, length, backend.max_prefill):
        end = min(start + backend.max_prefill, length)
        pos = np.broadcast_to(np.arange(start, end, dtype=np.int32), (batch, end - start))
        backend.forward(ids[:batch, start:end], pos, np.full(batch, end - start - 1, np.int32))


def measure_prefill(
    backend: Any, ids: np.ndarray, lengths: Sequence[int], warmup: int, rounds: int
) -> list[dict[str, Any]]:
    """Per prompt length: one batch-1 prefill call per round, from position 0."""
    rows = []
    backend.reset(1)
    for n in lengths:
        args = (ids[:1, :n], np.arange(n, dtype=np.int32)[None], np.array([n - 1], np.int32))
        times = [timed_call(backend, *args) for _ in range(warmup + rounds)][warmup:]
        row = {"tokens": n, **stats(times)}
        row["tokens_per_s"] = n / row["median_ms"] * 1e3
        rows.append(row)
    return rows


def measure_decode(
    backend: Any,
    ids: np.ndarray,
    batches: Sequence[int],
    context: int,
    steps: int,
    warmup: int,
    rounds: int,
    graph: bool = True,
) -> list[dict[str, Any]]:
    """Per batch size: prefill `context` tokens, then rounds of `steps` decode steps at
    positions context .. context+steps-1 (each round rewrites the same slots). A round's
    figure is its mean ms per step (one token per sequence); min and median over rounds."""
    rows = []
    for b in batches:
        backend.reset(b)
        fill_cache(backend, ids, b, context)
        captured = bool(graph and hasattr(backend, "capture_decode_graph"))
        if captured:
            backend.capture_decode_graph(b)
        last = np.zeros(b, np.int32)
        per_round = []
        for _ in range(warmup + rounds):
            times = [
                timed_call(
                    backend,
                    ids[:b, context + s : context + s + 1],
                    np.full((b, 1), context + s, np.int32),
                    last,
                )
                for s in range(steps)
            ]
            per_round.append(statistics.fmean(times))
        row = {"batch": b, "context": context, "steps": steps, "graph": captured}
        row.update(stats(per_round[warmup:]))
        row["tokens_per_s"] = b / row["median_ms"] * 1e3
        rows.append(row)
    return rows


# ---- transformers (torch is imported only here) ----


def transformers_gpu(
    model_dir: Path,
    *,
    dtype: str,
    ids: np.ndarray,
    plan: Plan,
    warmup: int,
    rounds: int,
    modes: Sequence[str] = HF_MODES,
    device: str = "cuda",
) -> dict[str, Any]:
    """transformers on the same prompts: prefill = one forward (logits of the last token only),
    decode = `generate` (greedy, exactly steps + 1 new tokens) with a stopping criterion that
    synchronizes and stamps the clock after every token, so the figure excludes the prefill.
    "eager" uses the default dynamic cache; "static-compile" passes cache_implementation=
    "static", with which generate compiles the decode step (torch.compile, on CUDA)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    out: dict[str, Any] = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": device,
        "dtype": dtype,
        "prefill": [],
        "decode": {},
        "errors": {},
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = torch.from_numpy(ids.astype(np.int64)).to(device)

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    with torch.inference_mode():
        for n in plan.prompt_lens:
            x = tokens[:1, :n]
            times = [
                timed(lambda x=x: model(input_ids=x, use_cache=True, logits_to_keep=1))
                for _ in range(warmup + rounds)
            ][warmup:]
            row = {"tokens": n, **stats(times)}
            row["tokens_per_s"] = n / row["median_ms"] * 1e3
            out["prefill"].append(row)

    class Stamps(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    context = max(plan.context, 1)
    for mode in modes:
        rows: list[dict[str, Any]] = []
        out["decode"][mode] = rows
        try:
            for b in plan.batches:
                x = tokens[:b, :context]
                stamps = Stamps()
                kwargs: dict[str, Any] = dict(
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=plan.steps + 1,
                    min_new_tokens=plan.steps + 1,
                    do_sample=False,
                    pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([stamps]),
                )
                if mode == "static-compile":
                    kwargs["cache_implementation"] = "static"
                per_round = []
                for _ in range(max(warmup, 1 if mode == "static-compile" else 0) + rounds):
                    stamps.times.clear()
                    model.generate(x, **kwargs)
                    t = stamps.times
                    per_round.append((t[-1] - t[0]) * 1e3 / (len(t) - 1))
                row = {"batch": b, "context": context, "steps": plan.steps}
                row.update(stats(per_round[-rounds:]))
                row["tokens_per_s"] = b / row["median_ms"] * 1e3
                row["compiled"] = getattr(model, "_compiled_call", None) is not None
                rows.append(row)
        except Exception as e:  # one mode failing (e.g. compile) must not lose the others
            out["errors"][mode] = f"{type(e).__name__}: {e}"
    return out


def cpu_rounds(
    prefill: Callable[[], None],
    step: Callable[[int], None],
    n_steps: int,
    warmup: int,
    rounds: int,
) -> dict[str, Any]:
    """Rounds of one prefill then `n_steps` decode steps; min/median over rounds of the
    prefill ms and of the mean decode ms per token."""
    pre, dec = [], []
    for _ in range(warmup + rounds):
        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        for s in range(n_steps):
            step(s)
        t2 = time.perf_counter()
        pre.append((t1 - t0) * 1e3)
        dec.append((t2 - t1) * 1e3 / n_steps)
    return {"prefill": stats(pre[warmup:]), "decode_per_token": stats(dec[warmup:])}


def with_rates(result: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    result["prefill_tokens_per_s"] = prompt_len / result["prefill"]["median_ms"] * 1e3
    result["decode_tokens_per_s"] = 1e3 / result["decode_per_token"]["median_ms"]
    return result


def executor_cpu(
    model_dir: Path, dtype: str, prompt: np.ndarray, decode: np.ndarray, warmup: int, rounds: int
) -> dict[str, Any]:
    """The NumPy executor (runtime.cpu.CpuModel) of the model's network, batch 1."""
    from netdef import NetworkOptions, build_network, load_backend
    from runtime.cpu import CpuModel
    from weights import Checkpoint

    p, n = len(prompt), len(decode)
    t0 = time.perf_counter()
    options = NetworkOptions(dtype=dtype, max_batch=1, max_seq_len=p + n, max_prefill=p)
    model = CpuModel(build_network(Checkpoint.open(model_dir), options, load_backend()))
    model.reset(1)
    setup_s = time.perf_counter() - t0
    zero = np.zeros(1, np.int32)

    def prefill() -> None:
        model.forward(prompt[None], np.arange(p, dtype=np.int32)[None], np.array([p - 1], np.int32))

    def step(s: int) -> None:
        model.forward(decode[None, s : s + 1], np.array([[p + s]], np.int32), zero)

    result = cpu_rounds(prefill, step, n, warmup, rounds)
    return with_rates(dict(result, setup_s=setup_s), p)


def transformers_cpu(
    model_dir: Path, dtype: str, prompt: np.ndarray, decode: np.ndarray, warmup: int, rounds: int
) -> dict[str, Any]:
    """transformers on the CPU, the same calls: a prefill forward (last token's logits only),
    then one forward per token through the returned cache."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    setup_s = time.perf_counter() - t0
    x = torch.from_numpy(prompt.astype(np.int64))[None]
    toks = torch.from_numpy(decode.astype(np.int64))
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["out"] = model(input_ids=x, use_cache=True, logits_to_keep=1)

    def step(s: int) -> None:
        state["out"] = model(
            input_ids=toks[s : s + 1][None],
            past_key_values=state["out"].past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )

    with torch.inference_mode():
        result = cpu_rounds(prefill, step, len(decode), warmup, rounds)
    result = with_rates(dict(result, setup_s=setup_s), len(prompt))
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    result["torch_threads"] = torch.get_num_threads()
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return result


def transformers_available() -> str | None:
    """None if torch and transformers can be imported (without importing them); else why not."""
    from importlib.util import find_spec

    missing = [m for m in ("torch", "transformers") if find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


# ---- GPU mode ----


def prepare_engines(
    args: argparse.Namespace, source: str, device_cc: tuple[int, int]
) -> dict[str, Any]:
    """{profile set: artifact}, decode+prefill first, plus `skipped` reasons. An artifact is
    used as it is; its counterpart is built from the model folder named in its metadata."""
    from netdef.artifact import is_complete, read_metadata
    from netdef.backend import is_rtx, load_backend
    from tools.build import build

    out: dict[str, Any] = {"engines": {}, "skipped": None}
    if is_complete(Path(source)):
        meta = read_metadata(Path(source))
        opts = meta["options"]
        given = opts["profile_set"]
        out["engines"][given] = Path(source)
        if args.compare_profiles:
            other = "dynamic" if given != "dynamic" else "decode,prefill"
            try:
                out["engines"][other] = build(
                    meta["model"]["path"],
                    dtype=opts["dtype"],
                    max_batch=opts["max_batch"],
                    max_seq_len=opts["max_seq_len"],
                    max_prefill=opts["max_prefill"],
                    prefill_opt=opts["prefill_opt"],
                    profiles=other,
                    backend=meta["backend"]["module"],
                    target=meta.get("target"),
                    optimization_level=meta.get("optimization_level"),
                )
            except Exception as e:  # the artifact itself is still measured
                out["skipped"] = f"could not build the {other!r} counterpart: {e}"
    else:
        trt = load_backend(args.backend)
        target = args.target or (f"sm{device_cc[0]}{device_cc[1]}" if is_rtx(trt) else None)
        common = dict(
            dtype=args.dtype or "bfloat16",
            max_batch=args.max_batch or max(args.batches or DEFAULT_BATCHES),
            max_seq_len=args.max_seq_len,
            backend=trt.__name__,
            target=target,
            optimization_level=args.optimization_level,
        )
        out["engines"]["decode,prefill"] = build(source, profiles="decode,prefill", **common)
        if args.compare_profiles:
            out["engines"]["dynamic"] = build(source, profiles="dynamic", **common)
    order = ["decode,prefill", "dynamic"]
    out["engines"] = {k: out["engines"][k] for k in order if k in out["engines"]}
    return out


def run_gpu(args: argparse.Namespace, report: Report) -> None:
    from runtime.cuda_buffers import device_info, gpu_unavailable_reason
    from tools.gpu_check import bandwidth
    from weights import load_config, resolve_model

    if reason := gpu_unavailable_reason():
        raise BenchError(f"GPU mode needs cuda-python and a CUDA GPU ({reason}).")
    source = args.models[0]
    dev = device_info()
    report["device"] = {
        "name": dev.name,
        "compute_capability": f"{dev.major}.{dev.minor}",
        "memory_bytes": dev.total_bytes,
    }
    bw = bandwidth(args.bandwidth_mib, repeats=5)
    report["bandwidth"] = {
        "mib": args.bandwidth_mib,
        "d2d_copy_gbs": bw["D2D"],
        "memory_gbs": 2 * bw["D2D"],  # a D2D copy reads and writes each byte
        "h2d_gbs": bw["H2D"],
        "d2h_gbs": bw["D2H"],
    }
    report.save()

    engines: dict[str, Any] = {}
    if args.no_engine:
        report["engine_skipped"] = "--no-engine: the TensorRT engine was not measured"
    else:
        prepared = prepare_engines(args, source, dev.cc)
        engines = prepared["engines"]
        if prepared["skipped"]:
            report["profiles_skipped"] = prepared["skipped"]

    # The model folder (for transformers and the roofline) and the limits shapes are fit to.
    if engines:
        from netdef.artifact import read_metadata

        meta = read_metadata(next(iter(engines.values())))
        opts = meta["options"]
        model_dir, dtype = Path(meta["model"]["path"]), opts["dtype"]
        config = load_config(next(iter(engines.values())))
        limits = dict(
            max_batch=opts["max_batch"],
            max_prefill=opts["max_prefill"] or opts["max_seq_len"],
            max_seq_len=opts["max_seq_len"],
        )
    else:
        model_dir = resolve_model(source)
        config = load_config(model_dir)
        dtype = args.dtype or "bfloat16"
        seq = args.max_seq_len or min(config.max_position_embeddings, 4096)
        limits = dict(
            max_batch=args.max_batch or max(args.batches or DEFAULT_BATCHES),
            max_prefill=seq,
            max_seq_len=seq,
        )
    plan = plan_shapes(args.prompt_lens, args.batches, args.context, args.steps, **limits)
    warmup, rounds = args.warmup if args.warmup is not None else 3, args.rounds or 10
    report["model"] = {"dir": str(model_dir), "summary": config.summary(), "dtype": dtype}
    report["settings"] = dict(
        asdict(plan), **limits, warmup=warmup, rounds=rounds, graph=not args.no_graph
    )
    ids = prompt_ids(
        config.vocab_size, max(plan.batches), max(max(plan.prompt_lens), plan.context + plan.steps)
    )

    from runtime.tensorrt_backend import TensorRTBackend

    report["engines"] = {}
    for profile_set, artifact in engines.items():
        print(f"measuring the {profile_set} engine {artifact} ...", file=sys.stderr)
        with TensorRTBackend.load(artifact) as backend:
            report["engines"][profile_set] = {
                "artifact": str(artifact),
                "prefill": measure_prefill(backend, ids, plan.prompt_lens, warmup, rounds),
                "decode": measure_decode(
                    backend,
                    ids,
                    plan.batches,
                    plan.context,
                    plan.steps,
                    warmup,
                    rounds,
                    not args.no_graph,
                ),
            }
        report.save()

    if args.compare_transformers:
        if why := transformers_available():
            report["transformers"] = {"skipped": why}
        elif not (model_dir / "config.json").is_file():
            report["transformers"] = {"skipped": f"no model folder at {model_dir}"}
        else:
            print(f"timing transformers on {model_dir} ...", file=sys.stderr)
            modes = args.hf_modes or list(HF_MODES)
            report["transformers"] = transformers_gpu(
                model_dir,
                dtype=dtype,
                ids=ids,
                plan=plan,
                warmup=warmup,
                rounds=rounds,
                modes=modes,
            )
        report.save()

    measured: dict[str, dict[int, float]] = {}
    for name, eng in report["engines"].items():
        measured[f"engine {name}"] = {r["batch"]: r["median_ms"] for r in eng["decode"]}
    for mode, rows in report.get("transformers", {}).get("decode", {}).items():
        measured[f"transformers {mode}"] = {r["batch"]: r["median_ms"] for r in rows}
    report["roofline"] = roofline_rows(
        config, dtype, plan, report["bandwidth"]["memory_gbs"], measured, limits["max_seq_len"]
    )
    report.save()


def gpu_tables(report: dict[str, Any]) -> str:
    """The readable form of a GPU report (engine and transformers columns where measured)."""
    dev, bw = report["device"], report["bandwidth"]
    parts = [
        f"device: {dev['name']} (compute capability {dev['compute_capability']}); "
        f"D2D copy {bw['d2d_copy_gbs']:.0f} GB/s = {bw['memory_gbs']:.0f} GB/s of memory traffic "
        f"(read + write), H2D {bw['h2d_gbs']:.1f} GB/s, D2H {bw['d2h_gbs']:.1f} GB/s"
    ]
    if "model" in report:
        parts.append(f"model: {report['model']['summary']}; run in {report['model']['dtype']}")
    if report.get("engine_skipped"):
        parts.append(f"TensorRT engine: NOT MEASURED ({report['engine_skipped']})")
    engines = report.get("engines", {})
    base = engines.get("decode,prefill") or next(iter(engines.values()), {})
    hf = report.get("transformers", {})

    eng_pre = {r["tokens"]: r for r in base.get("prefill", [])}
    hf_pre = {r["tokens"]: r for r in hf.get("prefill", [])}
    if eng_pre or hf_pre:
        headers, rows = ["prompt tokens"], []
        if eng_pre:
            headers += ["engine min ms", "engine median ms", "engine tok/s"]
        if hf_pre:
            headers += ["HF eager min ms", "HF eager median ms", "HF eager tok/s"]
        if eng_pre and hf_pre:
            headers.append("engine speedup")
        for n in sorted(eng_pre.keys() | hf_pre.keys()):
            e, h = eng_pre.get(n, {}), hf_pre.get(n, {})
            row: list[Any] = [n]
            for src, present in ((e, eng_pre), (h, hf_pre)):
                if present:
                    row += [src.get("min_ms"), src.get("median_ms"), src.get("tokens_per_s")]
            if eng_pre and hf_pre:
                row.append(ratio(h.get("median_ms"), e.get("median_ms")))
            rows.append(row)
        parts.append(format_table(headers, rows, "prefill (batch 1), ms per call"))

    eng_dec = {r["batch"]: r for r in base.get("decode", [])}
    hf_dec = {m: {r["batch"]: r for r in rows} for m, rows in hf.get("decode", {}).items() if rows}
    if eng_dec or hf_dec:
        headers = ["batch"]
        if eng_dec:
            headers += ["engine min ms", "engine median ms", "engine tok/s"]
        for mode in hf_dec:
            headers += [f"HF {mode} min ms", f"HF {mode} median ms", f"HF {mode} tok/s"]
            if eng_dec:
                headers.append(f"engine vs HF {mode}")
        both_hf = not eng_dec and len(hf_dec) == 2
        if both_hf:
            headers.append("HF eager / HF static-compile")
        rows = []
        for b in sorted(eng_dec.keys() | {b for m in hf_dec.values() for b in m}):
            e = eng_dec.get(b, {})
            row = [b]
            if eng_dec:
                row += [e.get("min_ms"), e.get("median_ms"), e.get("tokens_per_s")]
            for by_batch in hf_dec.values():
                h = by_batch.get(b, {})
                row += [h.get("min_ms"), h.get("median_ms"), h.get("tokens_per_s")]
                if eng_dec:
                    row.append(ratio(h.get("median_ms"), e.get("median_ms")))
            if both_hf:
                a, c = (hf_dec[m].get(b, {}).get("median_ms") for m in HF_MODES)
                row.append(ratio(a, c))
            rows.append(row)
        first = next(iter(eng_dec.values()), None) or next(
            r for m in hf_dec.values() for r in m.values()
        )
        parts.append(
            format_table(
                headers,
                rows,
                f"decode, ms per step (one token for each sequence) after {first['context']} "
                f"cached tokens, mean of {first['steps']} steps per round",
            )
        )
    for mode, err in hf.get("errors", {}).items():
        parts.append(f"transformers {mode}: FAILED: {err}")
    if hf.get("skipped"):
        parts.append(f"transformers: skipped ({hf['skipped']})")

    if len(engines) == 2:
        a, d = engines["decode,prefill"], engines["dynamic"]
        rows = []
        for kind, key in (("prefill", "tokens"), ("decode", "batch")):
            dyn = {r[key]: r["median_ms"] for r in d[kind]}
            for r in a[kind]:
                label = (
                    f"prefill {r[key]} tokens" if kind == "prefill" else f"decode batch {r[key]}"
                )
                other = dyn.get(r[key])
                rows.append([label, r["median_ms"], other, ratio(other, r["median_ms"])])
        parts.append(
            format_table(
                ["call", "decode+prefill ms", "dynamic ms", "speedup"],
                rows,
                "profiles: decode+prefill engine vs one dynamic profile (median ms per call)",
            )
        )
    elif report.get("profiles_skipped"):
        parts.append(f"profiles comparison skipped: {report['profiles_skipped']}")

    if report.get("roofline"):
        roof = report["roofline"]
        series = sorted({k for r in roof for k in r if k.startswith(("engine ", "transformers "))})
        as_built = "floor_as_built_ms" in roof[0]
        headers = ["batch", "weights", "KV", "floor ms"] + ["as-built floor ms"] * as_built
        for name in series:
            headers += [f"{name} ms", "x floor"]
        rows = []
        for r in roof:
            row = [r["batch"], fmt_bytes(r["bytes"]["weights"]), fmt_bytes(r["bytes"]["kv"])]
            row += [r["floor_ms"]] + [r.get("floor_as_built_ms")] * as_built
            for name in series:
                row += [r.get(name, {}).get("median_ms"), r.get(name, {}).get("x_floor")]
            rows.append(row)
        parts.append(
            format_table(
                headers,
                rows,
                f"roofline: bytes a decode step must read / {bw['memory_gbs']:.0f} GB/s, KV at "
                f"{roof[0]['attended_slots']} attended slots (as-built: the engine's attention "
                "reads every one of its max_seq_len cache slots)",
            )
        )
    return "\n\n".join(parts)


# ---- CPU mode: the NumPy executor against transformers ----


def run_cpu(args: argparse.Namespace, report: Report) -> None:
    from weights import load_config, resolve_model

    model_dir = resolve_model(args.models[0])
    config = load_config(model_dir)
    dtype = args.dtype or "float32"
    warmup, rounds = args.warmup if args.warmup is not None else 1, args.rounds or 3
    ids = prompt_ids(config.vocab_size, 1, args.prompt_len + args.decode_tokens)[0]
    prompt, decode = ids[: args.prompt_len], ids[args.prompt_len :]
    report["model"] = {"dir": str(model_dir), "summary": config.summary(), "dtype": dtype}
    report["settings"] = {
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "warmup": warmup,
        "rounds": rounds,
        "batch": 1,
    }
    print(f"timing the NumPy executor on {model_dir} ...", file=sys.stderr)
    report["executor"] = executor_cpu(model_dir, dtype, prompt, decode, warmup, rounds)
    report.save()
    if why := transformers_available():
        report["transformers"] = {"skipped": why}
    else:
        print("timing transformers ...", file=sys.stderr)
        report["transformers"] = transformers_cpu(model_dir, dtype, prompt, decode, warmup, rounds)
        ex, hf = report["executor"], report["transformers"]
        report["ratio"] = {
            "prefill": ex["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
            "decode": ex["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        }
    report.save()


def cpu_tables(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = []
    for name, key in (
        ("NumPy executor", "executor"),
        ("transformers (torch eager)", "transformers"),
    ):
        r = report.get(key, {})
        if "prefill" not in r:
            rows.append([name] + [None] * 6)
            continue
        rows.append(
            [
                name,
                r["prefill"]["min_ms"],
                r["prefill"]["median_ms"],
                r["prefill_tokens_per_s"],
                r["decode_per_token"]["min_ms"],
                r["decode_per_token"]["median_ms"],
                r["decode_tokens_per_s"],
            ]
        )
    if "ratio" in report:
        rows.append(
            [
                "executor / transformers",
                None,
                None,
                report["ratio"]["prefill"],
                None,
                None,
                report["ratio"]["decode"],
            ]
        )
    title = (
        f"CPU, {report['model']['summary']}; run in {report['model']['dtype']}: prefill "
        f"{s['prompt_len']} tokens, then {s['decode_tokens']} decode steps, batch 1; "
        f"{s['rounds']} rounds after {s['warmup']} warm-up"
    )
    table = format_table(
        [
            "",
            "prefill min ms",
            "prefill median ms",
            "prefill tok/s",
            "decode min ms/tok",
            "decode median ms/tok",
            "decode tok/s",
        ],
        rows,
        title,
    )
    if report.get("transformers", {}).get("skipped"):
        table += f"\ntransformers: skipped ({report['transformers']['skipped']})"
    return table


# ---- --build: engine build time and memory, each build in its own child process ----


def proc_status(pid: int | str = "self") -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process in bytes (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out if "VmRSS" in out else None


def measure_build(model: str, options: dict[str, Any], poll_s: float = 0.02) -> dict[str, Any]:
    """Build `model` in a child process; its wall time, exact peak RSS (wait4's rusage of that
    child alone) and, from polling /proc, the peak split into anonymous and file-backed pages
    and the peak inside the TensorRT builder call."""
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        spec = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "model": model,
                    "options": options,
                    "output": str(Path(tmp) / "artifact"),
                    "result": str(result_path),
                }
            )
        )
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench", "--build-worker", str(spec)], cwd=REPO, env=env
        )
        samples: list[tuple[float, int, int, int]] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if st := proc_status(proc.pid):
                samples.append(
                    (time.monotonic(), st["VmRSS"], st.get("RssAnon", 0), st.get("RssFile", 0))
                )
            time.sleep(poll_s)
        wall_s = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not result_path.is_file():
            raise BenchError(
                f"building {model} failed (child exit code {proc.returncode}; its errors are above)."
            )
        child = json.loads(result_path.read_text())
    phases = {p["name"]: p for p in child["phases"]}

    def peak(t_from: float = -math.inf, t_to: float = math.inf) -> dict[str, int] | None:
        window = [s for s in samples if t_from <= s[0] <= t_to]
        if not window:
            return None
        _, rss, anon, file = max(window, key=lambda s: s[1])
        return {"rss": rss, "anon": anon, "file": file}

    ckpt = child["checkpoint_bytes"]
    peak_rss = usage.ru_maxrss * 1024  # kilobytes on Linux
    out = {
        "model": model,
        "model_dir": child["model_dir"],
        "options": options,
        "checkpoint_bytes": ckpt,
        "engine_bytes": child["engine_bytes"],
        "wall_s": wall_s,  # the child process: interpreter start, imports, build, exit
        "build_s": child["build_s"],  # tools.build.build() itself
        "network_s": child.get("network_s"),
        "builder_s": child.get("builder_s"),
        "peak_rss_bytes": peak_rss,
        "peak_rss_x_checkpoint": peak_rss / ckpt,
        "rss": {
            name: {k: phases[name].get(k) for k in ("VmRSS", "RssAnon", "RssFile")}
            for name in ("imported", "before_network", "before_builder", "after_builder")
            if name in phases
        },
        "polled_peak": peak(),
        "polls": len(samples),
        "builder_phases": [],
    }
    for p in child["phases"]:  # the builder's phases: RSS at start and finish, polled peak
        if p["name"].startswith("builder[") and p["name"].endswith(":start"):
            level, _, name = p["name"][len("builder[") : -len(":start")].partition("]:")
            end = phases.get(f"builder[{level}]:{name}:finish")
            t_end = end["t"] if end else math.inf
            out["builder_phases"].append(
                {
                    "name": name,
                    "depth": int(level),
                    "seconds": t_end - p["t"],
                    "rss_start": p.get("VmRSS"),
                    "rss_finish": end.get("VmRSS") if end else None,
                    "polled_peak": peak(p["t"], t_end),
                }
            )
    top = max(samples, key=lambda s: s[1], default=None)
    if top is not None:  # where the polled peak happened
        at = [p["name"] for p in child["phases"] if p["t"] <= top[0]]
        out["polled_peak_after_mark"] = at[-1] if at else None
    if "before_builder" in phases and "after_builder" in phases:
        out["polled_peak_in_builder"] = peak(
            phases["before_builder"]["t"], phases["after_builder"]["t"]
        )
    base = phases.get("imported", {}).get("VmRSS")
    before = phases.get("before_builder", {}).get("VmRSS")
    if base and before:
        # what the network definition holds, then what the whole build and the builder add
        out["network_rss_x_checkpoint"] = (before - base) / ckpt
        out["above_imports_x_checkpoint"] = (peak_rss - base) / ckpt
        out["builder_added_x_checkpoint"] = (peak_rss - before) / ckpt
    return out


def _build_worker(spec_path: str) -> int:
    """Child side of measure_build: run tools.build.build, noting time and RSS at its phases."""
    spec = json.loads(Path(spec_path).read_text())
    phases: list[dict[str, Any]] = []

    def mark(name: str) -> None:
        phases.append({"name": name, "t": time.monotonic(), **(proc_status() or {})})

    import tools.build as tb
    from netdef.artifact import read_metadata

    tb.load_backend(spec["options"].get("backend"))
    mark("imported")
    timings: dict[str, float] = {}

    def timed_phase(
        fn: Callable[..., Any], before: str, after: str, key: str
    ) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            mark(before)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[key] = time.perf_counter() - t0
                mark(after)

        return wrapper

    # Instrument this process's tools.build (nothing is changed on disk).
    if hasattr(tb, "build_network"):
        tb.build_network = timed_phase(
            tb.build_network, "before_network", "after_network", "network_s"
        )
    if hasattr(tb, "builder_progress"):  # the builder's phases, down to PHASE_DEPTH
        make_monitor = tb.builder_progress

        def builder_progress(trt: Any, enabled: bool) -> Any:
            inner = make_monitor(trt, enabled)
            depth: dict[str, int] = {}
            open_key: dict[str, str] = {}
            seen: dict[str, int] = {}

            class Recorder(trt.IProgressMonitor):
                def __init__(self) -> None:
                    trt.IProgressMonitor.__init__(self)

                def phase_start(self, name: str, parent: str | None, steps: int) -> None:
                    depth[name] = 0 if parent is None else depth.get(parent, 0) + 1
                    if depth[name] <= PHASE_DEPTH:
                        seen[name] = seen.get(name, 0) + 1
                        open_key[name] = f"{name} #{seen[name]}" if seen[name] > 1 else name
                        mark(f"builder[{depth[name]}]:{open_key[name]}:start")
                    inner.phase_start(name, parent, steps)

                def step_complete(self, name: str, step: int) -> bool:
                    return inner.step_complete(name, step)

                def phase_finish(self, name: str) -> None:
                    if name in open_key:
                        mark(f"builder[{depth[name]}]:{open_key.pop(name)}:finish")
                    inner.phase_finish(name)

            return Recorder()

        tb.builder_progress = builder_progress
    if hasattr(tb, "build_engine"):
        tb.build_engine = timed_phase(
            tb.build_engine, "before_builder", "after_builder", "builder_s"
        )
    t0 = time.perf_counter()
    artifact = tb.build(
        spec["model"], output=Path(spec["output"]), force=True, progress=False, **spec["options"]
    )
    build_s = time.perf_counter() - t0
    mark("done")
    meta = read_metadata(artifact)
    Path(spec["result"]).write_text(
        json.dumps(
            {
                "phases": phases,
                "build_s": build_s,
                **timings,
                "model_dir": meta["model"]["path"],
                "checkpoint_bytes": meta["build"]["checkpoint_bytes"],
                "engine_bytes": meta["build"]["engine_bytes"],
            }
        )
    )
    return 0


def run_build(args: argparse.Namespace, report: Report) -> None:
    options = {
        "backend": args.backend or "tensorrt_rtx",
        "target": args.target or "sm89",
        "dtype": args.dtype or "bfloat16",
        "max_batch": args.max_batch or 1,
        "max_seq_len": args.max_seq_len,
        "profiles": args.profiles,
        "optimization_level": args.optimization_level,
    }
    report["builds"] = []
    for model in args.models:
        print(f"building {model} in a child process ...", file=sys.stderr)
        report["builds"].append(measure_build(model, options))
        report.save()


def build_tables(report: dict[str, Any]) -> str:
    o = report["builds"][0]["options"] if report["builds"] else {}
    times, memory = [], []
    for b in report["builds"]:
        name = Path(b["model"]).name
        rss = b["rss"]
        in_builder = b.get("polled_peak_in_builder") or {}
        times.append(
            [
                name,
                fmt_bytes(b["checkpoint_bytes"]),
                fmt_bytes(b["engine_bytes"]),
                b["wall_s"],
                b["build_s"],
                b.get("network_s"),
                b.get("builder_s"),
                fmt_bytes(b["peak_rss_bytes"]),
                b["peak_rss_x_checkpoint"],
            ]
        )
        memory.append(
            [
                name,
                fmt_bytes(rss.get("imported", {}).get("VmRSS")),
                fmt_bytes(rss.get("before_builder", {}).get("VmRSS")),
                fmt_bytes(in_builder.get("anon")),
                fmt_bytes(in_builder.get("file")),
                fmt_bytes(b["peak_rss_bytes"]),
                b.get("network_rss_x_checkpoint"),
                b.get("above_imports_x_checkpoint"),
            ]
        )
    title = (
        f"engine builds ({o.get('backend')}, target {o.get('target')}, {o.get('dtype')}, "
        f"max_seq_len {o.get('max_seq_len') or 'default'}, max_batch {o.get('max_batch')}), "
        "each in its own child process"
    )
    headers = ["model", "checkpoint", "engine", "wall s", "build s", "network s", "builder s"]
    first = format_table([*headers, "peak RSS", "peak / ckpt"], times, title)
    second = format_table(
        [
            "model",
            "after imports",
            "before builder",
            "builder peak anon",
            "builder peak file",
            "peak RSS",
            "(before builder - imports) / ckpt",
            "(peak - imports) / ckpt",
        ],
        memory,
        "RSS: after importing TensorRT, right before build_serialized_network_to_stream, "
        "and the builder's peak split into anonymous and file-backed pages (libraries, mapped checkpoint)",
    )
    largest = max(report["builds"], key=lambda b: b["checkpoint_bytes"], default=None)
    if not largest or not largest.get("builder_phases"):
        return first + "\n\n" + second
    rows = [
        [
            "  " * p["depth"] + p["name"],
            p["seconds"],
            fmt_bytes(p["rss_start"]),
            fmt_bytes(p["rss_finish"]),
            fmt_bytes((p["polled_peak"] or {}).get("rss")),
        ]
        for p in largest["builder_phases"]
    ]
    third = format_table(
        ["builder phase", "s", "RSS at start", "RSS at finish", "polled peak"],
        rows,
        f"TensorRT builder phases of {Path(largest['model']).name}",
    )
    return "\n\n".join([first, second, third])


# ---- --make-random: a real model's shapes with random weights ----

RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-3-1b-it's config.json (its generation-only "cache_implementation" left out).
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "initializer_range": 0.02,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 262144,
    },
}
SHAPE_OVERRIDES = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


def random_config(preset: str, **overrides: int | None) -> dict[str, Any]:
    """The preset's config.json, with shape overrides (None: keep the preset's value)."""
    if preset not in RANDOM_PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}.")
    config = dict(RANDOM_PRESETS[preset])
    for key, value in overrides.items():
        if value is not None:
            config[SHAPE_OVERRIDES[key]] = value
    return config


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return (
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    ).astype(np.uint16)


def write_random_checkpoint(
    out: Path, config: dict[str, Any], seed: int = 0, std: float = 0.02
) -> Path:
    """config.json plus one model.safetensors of random bfloat16 weights, written tensor by
    tensor in chunks (memory stays around 100 MB whatever the model size). Matrices are
    uniform with standard deviation `std`; norm scales are the identity."""
    from weights.config import parse_config

    parsed = parse_config(config)
    shapes = {f"model.{name}": shape for name, shape in parsed.tensor_shapes().items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.default_rng(seed)
    half_width = np.float32(std * math.sqrt(3.0))
    norm_bits = bf16_bits(np.array([1.0 - parsed.norm_offset], np.float32))[0]
    chunk = 1 << 23
    partial = out / ".model.safetensors.partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(shapes):
            total = math.prod(shapes[name])
            if name.endswith("norm.weight"):
                f.write(np.full(total, norm_bits, np.uint16).tobytes())
                continue
            for start in range(0, total, chunk):
                n = min(chunk, total - start)
                values = rng.random(n, dtype=np.float32)
                values *= 2 * half_width
                values -= half_width
                f.write(bf16_bits(values).tobytes())
    os.replace(partial, out / "model.safetensors")
    return out


# ---- command line ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="ARTIFACT_OR_MODEL",
        help="engine artifact, model folder, short name or Hub repo id (--build takes several)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--build", action="store_true", help="measure engine builds (CPU)")
    mode.add_argument(
        "--cpu", action="store_true", help="NumPy executor vs transformers on the CPU"
    )
    mode.add_argument(
        "--make-random",
        metavar="PRESET",
        choices=sorted(RANDOM_PRESETS),
        help="write a random checkpoint with a real model's shapes",
    )
    mode.add_argument("--build-worker", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: 3 GPU, 1 CPU)")
    p.add_argument("--rounds", type=int, help="timed rounds (default: 10 GPU, 3 CPU)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        help="default: bfloat16 (GPU, --build), float32 (--cpu)",
    )

    g = p.add_argument_group("GPU")
    g.add_argument(
        "--prompt-lens",
        type=int_list,
        help="prefill lengths (default 128,512,2048, clipped to the engine)",
    )
    g.add_argument(
        "--batches",
        type=int_list,
        help="decode batch sizes (default 1,4,16, clipped to the engine)",
    )
    g.add_argument(
        "--context",
        type=int,
        help=f"cached tokens before the decode steps (default {DEFAULT_CONTEXT})",
    )
    g.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    g.add_argument("--no-graph", action="store_true", help="decode without CUDA graph replay")
    g.add_argument(
        "--no-compare-profiles",
        dest="compare_profiles",
        action="store_false",
        help="skip the dynamic-profile engine",
    )
    g.add_argument(
        "--compare-transformers",
        action="store_true",
        help="time transformers (needs torch) in the same run",
    )
    g.add_argument(
        "--hf-modes",
        type=lambda s: [m for m in s.split(",") if m],
        help=f"transformers modes (default {','.join(HF_MODES)})",
    )
    g.add_argument(
        "--no-engine", action="store_true", help="measure bandwidth, roofline and transformers only"
    )
    g.add_argument(
        "--bandwidth-mib",
        type=int,
        default=512,
        help="D2D copy size for the bandwidth (default 512)",
    )

    b = p.add_argument_group("engine builds (GPU with a model, and --build)")
    b.add_argument("--backend", choices=["tensorrt", "tensorrt_rtx"])
    b.add_argument(
        "--target", help="TensorRT-RTX compute capability (--build default sm89; GPU: this GPU's)"
    )
    b.add_argument("--max-batch", type=int, help="default: largest --batches (GPU), 1 (--build)")
    b.add_argument("--max-seq-len", type=int, help="default: min(model context, 4096)")
    b.add_argument(
        "--profiles",
        default="decode,prefill",
        choices=["decode,prefill", "dynamic"],
        help="--build only",
    )
    b.add_argument("--optimization-level", type=int, choices=range(6))

    c = p.add_argument_group("--cpu")
    c.add_argument("--prompt-len", type=int, default=128, help="prefill tokens (default 128)")
    c.add_argument(
        "--decode-tokens", type=int, default=16, help="decode steps per round (default 16)"
    )

    r = p.add_argument_group("--make-random")
    r.add_argument("--out", type=Path, help="folder to write")
    r.add_argument("--seed", type=int, default=0)
    for key, field in SHAPE_OVERRIDES.items():
        r.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override {field}")
    args = p.parse_args(argv)

    if args.hf_modes and (bad := sorted(set(args.hf_modes) - set(HF_MODES))):
        p.error(f"--hf-modes: unknown {bad}; choose from {', '.join(HF_MODES)}")
    if args.make_random:
        if not args.out:
            p.error("--make-random needs --out DIR")
    elif args.build_worker is None:
        if not args.models:
            p.error("name an engine artifact or a model")
        if len(args.models) > 1 and not args.build:
            p.error("only --build takes several models")
    for name in ("warmup", "rounds", "prompt_len", "decode_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(
                f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else 'positive'}"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_worker:
        return _build_worker(args.build_worker)
    from netdef import BackendError, OptionsError
    from netdef.engine import EngineBuildError
    from runtime.cuda_buffers import CudaError
    from runtime.tensorrt_backend import EngineLoadError
    from tools.build import BuildError
    from weights import WeightsError

    errors = (BenchError, BackendError, BuildError, CudaError, EngineBuildError, EngineLoadError)
    errors += (OptionsError, WeightsError)

    if args.make_random:
        overrides = {key: getattr(args, key) for key in SHAPE_OVERRIDES}
        try:
            out = write_random_checkpoint(
                args.out, random_config(args.make_random, **overrides), args.seed
            )
        except errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        size = (out / "model.safetensors").stat().st_size
        print(f"{out} ({fmt_bytes(size)} of random bfloat16 weights)")
        return 0

    kind = "build" if args.build else "cpu" if args.cpu else "gpu"
    report = Report(
        args.json,
        kind=kind,
        machine=machine(),
        versions=versions(),
        command=["python", "-m", "tools.bench", *(argv if argv is not None else sys.argv[1:])],
    )
    run, tables = {
        "build": (run_build, build_tables),
        "cpu": (run_cpu, cpu_tables),
        "gpu": (run_gpu, gpu_tables),
    }[kind]
    try:
        run(args, report)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if "needs cuda-python and a CUDA GPU" in str(e) else 1
    with contextlib.suppress(OSError):
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    report.save()
    print(tables(report))
    if warning := busy_warning(report["machine"]):
        print(warning)
    return 0


def busy_warning(info: dict[str, Any]) -> str | None:
    """A note when other processes kept the CPUs busy (1-minute load average >= 0.5 per core
    above what this run adds), since CPU timings are then inflated."""
    load = info.get("load_average_at_start")
    if load is None or load < 0.5 * (info.get("cpu_count") or 1):
        return None
    return (
        f"note: the 1-minute load average was {load:.2f} on {info.get('cpu_count')} CPUs when this "
        "run started: other processes were running, so CPU timings may be inflated."
    )


if __name__ == "__main__":
    sys.exit(main())
