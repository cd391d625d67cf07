"""A memory-mapped safetensors reader that hands out zero-copy NumPy views, bfloat16 included,
and the header writer of the files written here (GGUF conversions, random checkpoints).

`safetensors`' own NumPy API cannot represent bfloat16, so the format is read directly: an
8-byte little-endian header length, a JSON header, then the raw tensor bytes. The header is
checked against the file's size, and the tensors must tile the data exactly as the
`safetensors` library requires, before any tensor is handed out, so a truncated or corrupt
download fails here with the file's name instead of as a crash or garbage weights later.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from .errors import CheckpointError

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# The floating dtypes a model is stored and built in, by the name config.json's torch_dtype
# and the CLIs' --dtype use: their safetensors tags (GGUF conversions write them), and their
# NumPy dtypes (netdef.contract re-exports MODEL_DTYPES).
MODEL_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MODEL_DTYPES = {name: DTYPES[tag] for name, tag in MODEL_TAGS.items()}
# What builds and GGUF conversions use unless told: half float32's bytes, and Gemma-3's
# activations overflow float16.
DEFAULT_DTYPE = "bfloat16"


def write_header(f: BinaryIO, tensors: Iterable[tuple[str, Sequence[int]]], tag: str) -> None:
    """Write the header of a safetensors file whose tensors, all of dtype `tag` (a DTYPES
    key), follow it in this order: shapes known up front let a writer then stream each
    tensor's raw bytes, one tensor in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, DTYPES[tag].itemsize
    for name, shape in tensors:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(blob)) + blob)


class SafetensorsFile:
    """One .safetensors file, mapped read-only; `tensor(name)` costs no copy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fix = f"re-download {self.path.name} (it is truncated or corrupt)"
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} does not exist; re-download the model.") from None
        except ValueError:  # mmap refuses empty files
            raise CheckpointError(f"{self.path} is empty; {self._fix}.") from None
        size = len(self._map)
        if size < 8:
            raise CheckpointError(
                f"{self.path} is too short to be a safetensors file; {self._fix}."
            )
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if 8 + header_len > size:
            raise CheckpointError(
                f"{self.path} has a header of {header_len} bytes but only {size} bytes in all; {self._fix}."
            )
        try:
            header = json.loads(self._map[8 : 8 + header_len])
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} has an unreadable header; {self._fix}.")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {
            name: self._check_entry(name, entry, size - self._data_start)
            for name, entry in header.items()
        }
        self._check_tiling(size - self._data_start)

    def _check_tiling(self, data_size: int) -> None:
        """The tensors must cover the data exactly once, in some order, as the `safetensors`
        library demands: overlapping entries would hand out the same bytes as two weights."""
        offset = 0
        for begin, end, name in sorted((b, e, n) for n, (_, _, b, e) in self._entries.items()):
            if begin != offset:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} starts at byte {begin} of the data, but the "
                    f"tensors before it end at byte {offset} (they overlap or leave a gap); "
                    f"{self._fix}."
                )
            offset = end
        if offset != data_size:
            raise CheckpointError(
                f"{self.path}: its tensors cover {offset} bytes of data, but the file holds "
                f"{data_size}; {self._fix}."
            )

    def _check_entry(
        self, name: str, entry: Any, data_size: int
    ) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, after checking it fits the file."""
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has an invalid header entry {entry!r}; {self._fix}."
            ) from None
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {dtype_name!r}, which is not supported "
                f"(known: {', '.join(DTYPES)}); use a checkpoint stored in BF16, F16 or F32."
            )
        dtype = DTYPES[dtype_name]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= data_size
            or end - begin != expected
        ):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} claims bytes [{begin}, {end}) for {expected} bytes of data, "
                f"but the file holds {data_size}; {self._fix}."
            )
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor, without touching its bytes."""
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def release(self, name: str) -> None:
        """Drop this process's mapped pages of tensor `name` (madvise MADV_DONTNEED) once
        whoever read it holds a copy: otherwise every page read stays resident, counted in
        RSS, while the mapping lives (1.3 GiB of a Gemma-3-1B build, whose network copies
        each linear weight). The file and page cache are untouched, so a later read of the
        tensor maps its pages again; only whole pages inside the tensor are dropped, never a
        neighbour's."""
        if not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return  # not Linux: nothing to do
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        start = -(-(self._data_start + begin) // page) * page
        stop = (self._data_start + end) // page * page
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view over the mapped file."""
        dtype, shape, begin, end = self._entries[name]
        count = (end - begin) // dtype.itemsize
        return np.frombuffer(
            self._map, dtype=dtype, count=count, offset=self._data_start + begin
        ).reshape(shape)
