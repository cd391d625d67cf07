"""The JSON report, statistics and plain-text tables, and the machine a run was on."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from netdef.artifact import fmt_bytes as artifact_bytes
from weights.folders import staged_file


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
    return "-" if n is None else artifact_bytes(n)


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


def json_path_error(path: Path) -> str | None:
    """Why --json cannot be written (a missing folder, a folder itself), or None: said at
    parse time, not in a traceback after the measurements."""
    if not path.parent.is_dir():
        return f"--json: {path.parent} is not a folder."
    if path.is_dir():
        return f"--json: {path} is a folder; name the file to write, e.g. {path / 'bench.json'}."
    return None


class Report(dict):
    """The JSON report; `save()` rewrites --json after each section, so an interrupted run
    keeps what it measured."""

    def __init__(self, path: Path | None, **fields: Any):
        super().__init__(**fields)
        self.path = path

    def save(self) -> None:
        if self.path is None:
            return
        with staged_file(self.path) as tmp:
            tmp.write_text(json.dumps(self, indent=2, default=str) + "\n")


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
