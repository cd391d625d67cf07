"""GPU mode: TensorRT engine latency (the default profile set against one dynamic profile),
transformers on the same prompts, the roofline, and the tables printed from the report."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from netdef.contract import DEFAULT_DTYPE, PROFILE_SETS
from tools.bench import NoGpu
from tools.bench.report import Report, fmt_bytes, format_table, ratio
from tools.bench.roofline import roofline_rows
from tools.bench.timing import (
    DEFAULT_BATCHES,
    HF_MODES,
    NEW_SHAPES_FROM,
    measure_decode,
    measure_new_shapes,
    measure_prefill,
    plan_shapes,
    prompt_ids,
    transformers_available,
    transformers_gpu,
)


def prepare_engines(
    args: argparse.Namespace, source: str, device_cc: tuple[int, int]
) -> dict[str, Any]:
    """{profile set: artifact}, the default set first, plus `skipped` reasons. An artifact is
    used as it is; its counterpart is built from the model folder named in its metadata."""
    from netdef.artifact import is_complete, open_artifact
    from netdef.tensorrt_module import is_rtx, load_tensorrt
    from runtime.build import build
    from tools.build import ConsoleHooks

    out: dict[str, Any] = {"engines": {}, "skipped": None}
    if is_complete(Path(source)):
        meta = open_artifact(Path(source))
        opts = meta.options
        given = opts["profile_set"]
        out["engines"][given] = Path(source)
        if args.compare_profiles:
            other = "dynamic" if given != "dynamic" else PROFILE_SETS[0]
            try:
                out["engines"][other] = build(
                    str(meta.model_path),
                    dtype=opts["dtype"],
                    max_batch=opts["max_batch"],
                    max_seq_len=opts["max_seq_len"],
                    max_prefill=opts["max_prefill"],
                    prefill_opt=opts["prefill_opt"],
                    decode_opt=opts.get("decode_opt"),  # absent from older artifacts
                    profiles=other,
                    backend=meta.backend_module,
                    target=meta.target,
                    optimization_level=meta.optimization_level,
                    hooks=ConsoleHooks(),
                )
            except Exception as e:  # the artifact itself is still measured
                out["skipped"] = f"could not build the {other!r} counterpart: {e}"
    else:
        trt = load_tensorrt(args.backend)
        target = args.target or (f"sm{device_cc[0]}{device_cc[1]}" if is_rtx(trt) else None)
        common = dict(
            dtype=args.dtype or DEFAULT_DTYPE,
            max_batch=args.max_batch or max(args.batches or DEFAULT_BATCHES),
            max_seq_len=args.max_seq_len,
            backend=trt.__name__,
            target=target,
            optimization_level=args.optimization_level,
            hooks=ConsoleHooks(),
        )
        out["engines"][PROFILE_SETS[0]] = build(source, profiles=PROFILE_SETS[0], **common)
        if args.compare_profiles:
            out["engines"]["dynamic"] = build(source, profiles="dynamic", **common)
    out["engines"] = {k: out["engines"][k] for k in PROFILE_SETS if k in out["engines"]}
    return out


def run_gpu(args: argparse.Namespace, report: Report) -> None:
    from runtime.cuda_buffers import bandwidth, device_info, gpu_unavailable_reason
    from weights import load_config, resolve_model

    if reason := gpu_unavailable_reason():
        raise NoGpu(f"GPU mode needs cuda-python and a CUDA GPU, but {reason}.")
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
        from netdef.artifact import open_artifact

        meta = open_artifact(next(iter(engines.values())))
        model_dir, dtype = meta.model_path, meta.options["dtype"]
        config = load_config(next(iter(engines.values())))
        limits = dict(
            max_batch=meta.max_batch, max_prefill=meta.max_prefill, max_seq_len=meta.max_seq_len
        )
    else:
        model_dir = resolve_model(source)
        config = load_config(model_dir)
        dtype = args.dtype or DEFAULT_DTYPE
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
        loading = time.perf_counter()
        with TensorRTBackend.load(artifact, cuda_graphs=not args.no_graph, timed=True) as backend:
            jit = backend.jit_cache  # kernels an earlier process compiled make loads faster
            measured = report["engines"][profile_set] = {
                "artifact": str(artifact),
                "load_s": round(time.perf_counter() - loading, 2),
                "jit_cache_read_bytes": jit.loaded if jit else None,
            }
            if args.new_shapes:  # first, while every shape is new to the backend
                start = max(1, min(NEW_SHAPES_FROM, limits["max_prefill"] - args.new_shapes))
                lengths = range(start, min(start + args.new_shapes, limits["max_prefill"] + 1))
                fresh = prompt_ids(config.vocab_size, limits["max_batch"], max(lengths) + 1)
                batches = range(1, limits["max_batch"] + 1)
                measured["new_shapes"] = measure_new_shapes(backend, fresh, lengths, batches)
            measured |= {
                "prefill": measure_prefill(backend, ids, plan.prompt_lens, warmup, rounds),
                "decode": measure_decode(
                    backend, ids, plan.batches, plan.context, plan.steps, warmup, rounds
                ),
            }
            if args.profile:
                from tools.bench.profile import profile_engine

                measured["profile"] = profile_engine(
                    backend, ids, plan.context, max(plan.prompt_lens), plan.batches
                )
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
    staged = next((k for k in engines if k != "dynamic"), None)  # the engine of several profiles
    base = engines[staged] if staged else next(iter(engines.values()), {})
    hf = report.get("transformers", {})

    eng_pre = {r["tokens"]: r for r in base.get("prefill", [])}
    hf_pre = {r["tokens"]: r for r in hf.get("prefill", [])}
    if eng_pre or hf_pre:
        headers, rows = ["prompt tokens"], []
        profiles = any("profile" in r for r in eng_pre.values())
        if eng_pre:
            headers += ["engine min ms", "engine median ms", "engine tok/s"]
            headers += ["engine profile"] * profiles
        if hf_pre:
            headers += ["HF eager min ms", "HF eager median ms", "HF eager tok/s"]
        if eng_pre and hf_pre:
            headers.append("engine speedup")
        for n in sorted(eng_pre.keys() | hf_pre.keys()):
            e, h = eng_pre.get(n, {}), hf_pre.get(n, {})
            row: list[Any] = [n]
            if eng_pre:
                row += [e.get("min_ms"), e.get("median_ms"), e.get("tokens_per_s")]
                row += [e.get("profile")] * profiles
            if hf_pre:
                row += [h.get("min_ms"), h.get("median_ms"), h.get("tokens_per_s")]
            if eng_pre and hf_pre:
                row.append(ratio(h.get("median_ms"), e.get("median_ms")))
            rows.append(row)
        parts.append(format_table(headers, rows, "prefill (batch 1), ms per call"))

    eng_dec = {r["batch"]: r for r in base.get("decode", [])}
    hf_dec = {m: {r["batch"]: r for r in rows} for m, rows in hf.get("decode", {}).items() if rows}
    if eng_dec or hf_dec:
        headers = ["batch"]
        host = any("host_ms" in r for r in eng_dec.values())
        if eng_dec:
            headers += ["engine min ms", "engine median ms", "engine tok/s"]
            headers += ["untimed wall ms", "host ms", "chained wall ms", "chained host ms"] * host
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
                row += [
                    e.get(k) for k in ("wall_ms", "host_ms", "chained_ms", "chained_host_ms")
                ] * host
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
    if "load_s" in base:
        parts.append(f"engine load: {base['load_s']:.2f} s, {jit_cache_words(base)}")
    if new := base.get("new_shapes"):
        parts.append(new_shapes_table(new, jit_cache_words(base)))

    if staged and "dynamic" in engines:
        a, d = engines[staged], engines["dynamic"]
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
                ["call", f"{staged} ms", "dynamic ms", "speedup"],
                rows,
                f"profiles: the {staged} engine vs one dynamic profile (median ms per call)",
            )
        )
    elif report.get("profiles_skipped"):
        parts.append(f"profiles comparison skipped: {report['profiles_skipped']}")

    if "profile" in base:
        from tools.bench.profile import profile_tables

        parts += profile_tables(base["profile"], format_table)

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
                f"{roof[0]['attended_slots']} attended slots (as-built: global layers read "
                "that rounded up to a power of two >= 256, sliding ones their window)",
            )
        )
    return "\n\n".join(parts)


def jit_cache_words(engine: dict[str, Any]) -> str:
    """What the measured backend found kept of TensorRT-RTX's compiled kernels at load."""
    read = engine.get("jit_cache_read_bytes")
    return (
        f"with {read / 2**20:.1f} MiB of kernels from the JIT cache"
        if read
        else "with no JIT cache"
    )


def new_shapes_table(new: dict[str, list[dict[str, Any]]], loaded: str) -> str:
    """`measure_new_shapes`' result: each kind's first calls against the same calls again;
    `loaded` says what the backend was loaded with (`jit_cache_words`)."""
    rows = []
    for kind, key, what in (
        ("prefill", "tokens", "prompt lengths"),
        ("decode", "batch", "batch sizes"),
    ):
        calls = new[kind]
        first = [r["first_ms"] for r in calls]
        again = [r["again_ms"] for r in calls]
        span = f"{calls[0][key]}..{calls[-1][key]}"
        rows.append(
            [
                f"{kind}, {len(calls)} {what} {span}",
                statistics.median(first),
                max(first),
                statistics.median(again),
            ]
        )
    return format_table(
        ["calls", "first median ms", "first max ms", "again median ms"],
        rows,
        f"calls of shapes the engine had not run (wall ms; loaded {loaded}), each then run again",
    )
