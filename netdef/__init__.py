"""Decoder networks written against the TensorRT network-definition API."""

from .backend import BackendError, load_backend
from .decoder import DecoderNetwork, build_network
from .engine import EngineBuildError, build_engine
from .options import NetworkOptions, OptionsError, Profile

__all__ = [
    "BackendError",
    "DecoderNetwork",
    "EngineBuildError",
    "NetworkOptions",
    "OptionsError",
    "Profile",
    "build_engine",
    "build_network",
    "load_backend",
]
