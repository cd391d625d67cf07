"""The one place that chooses the TensorRT flavour.

`tensorrt` (datacenter GPUs) and `tensorrt_rtx` (RTX GPUs, and ahead-of-time builds on a
machine without a GPU) share the network-definition API this project uses. Everything
else imports `trt` through `load_tensorrt()`; nothing else names either module.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from weights.folders import interrupts_deferred

from .contract import normalize_target

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")


class TensorRTModuleError(RuntimeError):
    """No usable TensorRT module."""


def load_tensorrt(name: str | None = None) -> ModuleType:
    """Import the TensorRT module `name`, else $TRT_NETDEF_BACKEND, else whichever is installed."""
    name = name or os.environ.get("TRT_NETDEF_BACKEND") or None
    if name is not None and name not in TENSORRT_MODULES:
        raise TensorRTModuleError(
            f"unknown backend {name!r}; choose one of {', '.join(TENSORRT_MODULES)}."
        )
    errors = []
    for candidate in [name] if name else TENSORRT_MODULES:
        try:
            # A Ctrl-C inside the module's initialization became its ImportError, reported
            # as no TensorRT installed: it is raised after the import instead.
            with interrupts_deferred():
                return importlib.import_module(candidate)
        except ImportError as e:  # also catches the datacenter wheel's library stub
            errors.append(f"{candidate}: {e}")
    raise TensorRTModuleError(
        "no TensorRT Python module could be imported ("
        + "; ".join(errors)
        + "); install one: pip install -e '.[rtx]' (TensorRT-RTX, also builds on CPU-only machines) "
        "or pip install -e '.[tensorrt]' (datacenter GPUs)."
    )


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


def compute_capability(trt: ModuleType, target: str) -> Any:
    """'sm89' or '8.9' -> trt.ComputeCapability.SM89 (TensorRT-RTX ahead-of-time targets)."""
    member = getattr(trt.ComputeCapability, normalize_target(target).upper(), None)
    if member is None:
        known = [m.lower() for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        raise TensorRTModuleError(
            f"unknown compute capability target {target!r}; choose one of {', '.join(known)}."
        )
    return member
