"""Decoder networks written against the TensorRT network-definition API.

The names below are imported on first use, so that `netdef.slots` (the part of the engine
contract the runtime feeds) can be imported without the network definer."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TensorRTModuleError": "tensorrt_module",
    "load_tensorrt": "tensorrt_module",
    "DecoderNetwork": "decoder",
    "build_network": "decoder",
    "EngineBuildError": "engine",
    "build_engine": "engine",
    "NetworkOptions": "options",
    "OptionsError": "options",
    "Profile": "options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'netdef' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
