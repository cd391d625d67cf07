"""One GGUF file's metadata and tensors, read from a memory map.

The gguf package's GGUFReader makes NumPy views of every metadata item before a value can be
read: Gemma-3's 262,144-token vocabulary took 14 s of a GGUF build on 2 cores. This reads
the same format (versions 2 and 3, little-endian, as llama.cpp writes it) with `struct`, and
makes one array per tensor, shaped as GGUFReader shapes it, for gguf's `dequantize`.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import WeightsError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUF's value types: scalars by struct code, then its string and array
SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    data: np.ndarray  # F32/F16 as such; other types as bytes, one row per last dimension


class _Damaged(Exception):
    """The metadata value `key` is not UTF-8 text."""

    def __init__(self, key: str):
        self.key = key


def read_gguf_file(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The metadata (Python values) and tensors (read-only views of the mapped file) of the
    GGUF file `path`; a file that is cut short, or not GGUF, is one clear WeightsError."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:  # unreadable: permissions, a folder by the name, an I/O error
        raise WeightsError(f"cannot read {path} ({e.strerror}); check the file.") from None
    except ValueError:  # an empty file cannot be mapped
        buf = b""
    try:
        return _parse(buf)
    except _Damaged as e:
        raise WeightsError(
            f"{path} is damaged: its metadata {e.key!r} is not UTF-8 text, as every GGUF "
            "string is; download it again."
        ) from None
    except (ValueError, IndexError, KeyError, struct.error):
        raise WeightsError(
            f"{path} is not a complete GGUF file: it ends before the data its header describes, "
            "or is not a GGUF file at all; download it again."
        ) from None


def _parse(buf: Any) -> tuple[dict[str, Any], list[GGUFTensor]]:
    if buf[:4] != MAGIC:
        raise ValueError("no GGUF magic")
    (version,) = U32.unpack_from(buf, 4)
    if version not in VERSIONS:  # a big-endian file reads as 2 << 24 or 3 << 24
        raise ValueError(f"GGUF version {version}")
    n_tensors, n_keys = struct.unpack_from("<QQ", buf, 8)
    at, meta = 24, {}
    for _ in range(n_keys):
        key, at = _string(buf, at)
        if key in meta:
            raise KeyError(key)
        (kind,) = U32.unpack_from(buf, at)
        try:
            meta[key], at = _value(buf, at + 4, kind)
        except UnicodeDecodeError:
            raise _Damaged(key) from None
    infos = []
    for _ in range(n_tensors):
        name, at = _string(buf, at)
        (n_dims,) = U32.unpack_from(buf, at)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, at + 4)
        kind, offset = struct.unpack_from("<IQ", buf, at + 4 + 8 * n_dims)
        infos.append((name, dims, GGMLQuantizationType(kind), offset))
        at += 4 + 8 * n_dims + 12
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment!r}")
    start = -(-at // alignment) * alignment
    whole = np.frombuffer(buf, np.uint8)
    tensors: list[GGUFTensor] = []
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        rows = tuple(reversed(dims))
        width = rows[-1] // block * size  # bytes of one row along the fastest dimension
        n_bytes = int(np.prod(rows[:-1], dtype=np.int64)) * width
        begin = start + offset
        if begin + n_bytes > whole.size or rows[-1] % block:
            raise ValueError(f"tensor {name!r} out of the file")
        data = whole[begin : begin + n_bytes].reshape(*rows[:-1], width)
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = data.view(np.float32 if kind == GGMLQuantizationType.F32 else np.float16)
        tensors.append(GGUFTensor(name, kind, dims, data))
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("a tensor name twice")
    return meta, tensors


def _string(buf: Any, at: int) -> tuple[str, int]:
    (size,) = U64.unpack_from(buf, at)
    end = at + 8 + size
    if end > len(buf):
        raise ValueError("a string past the end")
    return str(buf[at + 8 : end], "utf-8"), end


def _value(buf: Any, at: int, kind: int) -> tuple[Any, int]:
    """A value of GGUF type `kind` at `at`, and where the next item starts."""
    if kind in SCALARS:
        code = SCALARS[kind]
        return struct.unpack_from("<" + code, buf, at)[0], at + struct.calcsize(code)
    if kind == STRING:
        return _string(buf, at)
    if kind != ARRAY:
        raise ValueError(f"value type {kind}")
    item, count = struct.unpack_from("<IQ", buf, at)
    at += 12
    if item in SCALARS:  # one NumPy read for the whole array
        dtype = np.dtype("<" + SCALARS[item])
        values = np.frombuffer(buf, dtype, count, at)
        return values.tolist(), at + values.nbytes
    out = []
    for _ in range(count):  # strings (a vocabulary) or arrays
        value, at = _string(buf, at) if item == STRING else _value(buf, at, item)
        out.append(value)
    return out, at
