"""--build: engine build time and memory, each build in its own child process."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.bench import BenchError
from tools.bench.cgroup import MemoryCgroup, uncache
from tools.bench.report import Report, fmt_bytes, format_table
from weights import resolve_model
from weights.checkpoint import shard_paths
from weights.safetensors_file import DEFAULT_DTYPE

REPO = Path(__file__).resolve().parents[2]
PHASE_DEPTH = 3  # builder phases recorded by --build (deeper ones repeat per layer/tensor)


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


def measure_build(
    model: str, options: dict[str, Any], memory_limit: float | None = None, poll_s: float = 0.02
) -> dict[str, Any]:
    """Build `model` in a child process; its wall time, exact peak RSS (wait4's rusage of that
    child alone) and, from polling /proc, the peak split into anonymous and file-backed pages
    and the peak inside the TensorRT builder call. With `memory_limit`, the child runs in a
    memory cgroup capped at that multiple of the checkpoint (tools.bench.cgroup)."""
    cgroup = limit = None
    if memory_limit is not None:
        shards = shard_paths(resolve_model(model, progress=False))
        limit = int(memory_limit * sum(s.stat().st_size for s in shards))
        cgroup = MemoryCgroup(limit)
        uncache(shards)
    try:
        out = _measure_build(model, options, cgroup, poll_s)
        if cgroup:
            out["memory_limit"] = {"x_checkpoint": memory_limit, "bytes": limit, **cgroup.stats()}
        return out
    except BenchError:
        if cgroup and cgroup.stats()["oom_kills"]:
            raise BenchError(
                f"building {model} was killed at the memory limit of {memory_limit}x its "
                f"checkpoint ({fmt_bytes(limit)}, page cache included): it needs more memory "
                "than that."
            ) from None
        raise
    finally:
        if cgroup:
            cgroup.remove()


def _measure_build(
    model: str, options: dict[str, Any], cgroup: MemoryCgroup | None, poll_s: float
) -> dict[str, Any]:
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
            [sys.executable, "-m", "tools.bench", "--build-worker", str(spec)],
            cwd=REPO,
            env=env,
            preexec_fn=cgroup.join if cgroup else None,
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
        "build_s": child["build_s"],  # runtime.build.build() itself
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


def build_worker(spec_path: str) -> int:
    """Child side of measure_build: run runtime.build.build, noting time and RSS at its phases
    through BuildHooks."""
    spec = json.loads(Path(spec_path).read_text())
    phases: list[dict[str, Any]] = []

    def mark(name: str) -> None:
        phases.append({"name": name, "t": time.monotonic(), **(proc_status() or {})})

    from netdef import load_tensorrt
    from netdef.artifact import read_metadata
    from runtime.build import BuildHooks, build

    load_tensorrt(spec["options"].get("backend"))
    mark("imported")
    timings: dict[str, float] = {}

    class Recording(BuildHooks):
        """Marks RSS and time around the network definition and the builder call, and at
        the builder's phases down to PHASE_DEPTH."""

        @contextmanager
        def phase(self, name: str, total: int = 0) -> Iterator[None]:
            marks = {"network": "network", "engine": "builder"}.get(name)
            if marks is None:
                yield None
                return
            mark(f"before_{marks}")
            t0 = time.perf_counter()
            try:
                yield None
            finally:
                timings[f"{marks}_s"] = time.perf_counter() - t0
                mark(f"after_{marks}")

        def builder_monitor(self, trt: Any) -> Any:
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

                def step_complete(self, name: str, step: int) -> bool:
                    return True

                def phase_finish(self, name: str) -> None:
                    if name in open_key:
                        mark(f"builder[{depth[name]}]:{open_key.pop(name)}:finish")

            return Recorder()

    t0 = time.perf_counter()
    artifact = build(
        spec["model"], output=Path(spec["output"]), force=True, hooks=Recording(), **spec["options"]
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
        "dtype": args.dtype or DEFAULT_DTYPE,
        "max_batch": args.max_batch or 1,
        "max_seq_len": args.max_seq_len,
        "profiles": args.profiles,
        "optimization_level": args.optimization_level,
    }
    for model in args.models:  # a name that resolves to nothing is one error, before any build
        resolve_model(model)
    report["builds"] = []
    rounds = args.rounds or 1
    for r in range(1, rounds + 1):  # round-robin: a machine's drift hits every model alike
        for model in args.models:
            print(f"building {model} in a child process (round {r}) ...", file=sys.stderr)
            build = measure_build(model, options, args.memory_limit)
            report["builds"].append({"round": r, **build})
            report.save()


def build_tables(report: dict[str, Any]) -> str:
    o = report["builds"][0]["options"] if report["builds"] else {}
    times, memory = [], []
    rounds = max((b.get("round", 1) for b in report["builds"]), default=1)
    capped = any("memory_limit" in b for b in report["builds"])  # --memory-limit columns
    for b in report["builds"]:
        name = Path(b["model"]).name + (f" #{b['round']}" if rounds > 1 else "")
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
                *(limited(b.get("memory_limit")) if capped else []),
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
    headers += ["peak RSS", "peak / ckpt"]
    if capped:
        headers += ["memory limit", "cgroup peak", "limit reached"]
        title += "; memory cgroup peak: page cache included"
    first = format_table(headers, times, title)
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
    if rounds > 1:
        first += "\n\n" + median_table(report["builds"], rounds)
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


def limited(limit: dict[str, Any] | None) -> list[str | int | None]:
    """The memory-limit columns of a build: the cap, the cgroup's peak, how often it was hit."""
    if not limit:
        return ["-", None, None]
    cap = f"{fmt_bytes(limit['bytes'])} ({limit['x_checkpoint']:g}x)"
    return [cap, fmt_bytes(limit["peak_bytes"]), limit["limit_hits"]]


def median_table(builds: list[dict[str, Any]], rounds: int) -> str:
    """Each model's median (and range) of wall time and peak RSS over its rounds."""
    rows = []
    for model in dict.fromkeys(b["model"] for b in builds):
        mine = [b for b in builds if b["model"] == model]
        wall = sorted(b["wall_s"] for b in mine)
        peak = sorted(b["peak_rss_x_checkpoint"] for b in mine)
        rows.append(
            [
                Path(model).name,
                len(mine),
                statistics.median(wall),
                wall[0],
                wall[-1],
                statistics.median(peak),
            ]
        )
    return format_table(
        ["model", "rounds", "median wall s", "min wall s", "max wall s", "median peak / ckpt"],
        rows,
        f"over {rounds} rounds, run round-robin",
    )
