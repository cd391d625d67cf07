"""The engine artifact: a folder holding the engine, its metadata and the tokenizer files.

    model.engine        serialized TensorRT engine
    metadata.json       model config, build options, profiles, I/O contract, versions, checksums
    tokenizer.json ...  copied from the model folder, with config.json and generation_config.json

It is written to a temporary sibling folder and renamed into place, so a failed or
interrupted build leaves nothing that looks usable. A folder is only ever replaced when it is
empty or holds nothing but an artifact's own files: nothing else in it is ever deleted.

Readers take `Metadata` (typed fields over metadata.json) from `open_artifact` (to run an
engine: complete, of this FORMAT_VERSION) or `check_intact` (also unchanged since its
build). This module imports neither TensorRT nor the network definer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weights.folders import staged_folder
from weights.hub import MODEL_FILES

from .contract import FORMAT_VERSION

if TYPE_CHECKING:
    from .decoder import DecoderNetwork

ENGINE_FILE = "model.engine"
METADATA_FILE = "metadata.json"
ARTIFACT_FILES = frozenset({ENGINE_FILE, METADATA_FILE, *MODEL_FILES})  # all an artifact holds
# What `metadata` and tools.build write, which every tool reading an artifact may rely on.
BUILT_FIELDS = ("format_version", "config", "options", "profiles", "io", "backend", "build_key")
BUILT_FIELDS += ("model", "build", "kv_cache")


class ArtifactError(ValueError):
    """An artifact folder that cannot be read, or an output folder that may not be replaced."""


class DamagedArtifact(ArtifactError):
    """A built artifact whose files no longer are what the build wrote; `reason` says how."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; rebuild it with python -m tools.build --force.")
        self.reason = reason


@dataclass(frozen=True)
class Metadata:
    """The fields of metadata.json that runtimes and tools rely on, typed, with the build's
    defaults resolved once; `data` is the whole file as written. Partial metadata (tests,
    stand-in engines) leaves the missing fields empty."""

    data: dict[str, Any]
    options: dict[str, Any]
    max_batch: int
    max_seq_len: int
    max_prefill: int  # the build's max_prefill, or max_seq_len where it set none
    profiles: list[dict[str, Any]]
    io: dict[str, list[dict[str, Any]]]
    attention_window: int | None
    backend_module: str
    target: str | None
    optimization_level: int | None
    model_path: Path | None
    fingerprint: str | None
    calibration: dict[str, Any] | None
    int4_block: int | None  # inputs per INT4 scale (int4-wo)
    from_gguf: dict[str, Any] | None  # from-gguf: the GGUF file, and how many layers kept blocks
    build_key: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metadata:
        options, model = data.get("options", {}), data.get("model", {})
        backend = data.get("backend", {})
        return cls(
            data=data,
            options=options,
            max_batch=options.get("max_batch", 1),
            max_seq_len=options.get("max_seq_len", 0),
            max_prefill=options.get("max_prefill") or options.get("max_seq_len", 0),
            profiles=data.get("profiles", []),
            io=data.get("io", {"inputs": [], "outputs": []}),
            attention_window=data.get("attention_window"),
            backend_module=backend.get("module", ""),
            target=data.get("target"),
            optimization_level=data.get("optimization_level"),
            model_path=Path(model["path"]) if model.get("path") else None,
            fingerprint=model.get("fingerprint"),
            calibration=data.get("calibration"),
            int4_block=data.get("int4_block"),
            from_gguf=data.get("from_gguf"),
            build_key=data.get("build_key"),
        )


def io_contract(dn: DecoderNetwork) -> dict[str, list[dict[str, Any]]]:
    """Name, dtype and declared shape (-1 dynamic) of every network input and output."""
    net = dn.network

    def describe(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": t.dtype.name.lower(), "shape": list(t.shape)}

    return {
        "inputs": [describe(net.get_input(i)) for i in range(net.num_inputs)],
        "outputs": [describe(net.get_output(i)) for i in range(net.num_outputs)],
    }


def metadata(dn: DecoderNetwork, **extra: Any) -> dict[str, Any]:
    """Everything a runtime or a person needs to know about the engine, as JSON-able data."""
    return {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(dn.config),
        "options": dataclasses.asdict(dn.options),
        "int4_block": dn.options.int4_block(dn.config),  # inputs per INT4 scale (int4-wo)
        "profiles": [
            {"name": p.name, "shapes": {k: list(map(list, v)) for k, v in p.shapes.items()}}
            for p in dn.profiles
        ],
        "io": io_contract(dn),
        "attention_window": dn.window,  # what window_positions covers (netdef.slots)
        "kv_cache": kv_cache_summary(dn),
        "backend": {"module": dn.trt.__name__, "version": dn.trt.__version__},
        **extra,
    }


def kv_cache_summary(dn: DecoderNetwork) -> dict[str, Any]:
    """KV-cache slots per layer and bytes per sequence and per max_batch batch."""
    per_sequence = dn.options.kv_bytes(dn.config)
    return {
        "slots": dn.options.cache_slots(dn.config),
        "bytes_per_sequence": per_sequence,
        "bytes_per_batch": per_sequence * dn.options.max_batch,
    }


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 3 << 30 -> '3.00 GiB' (binary units, as the CLIs print sizes)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def files_sha256(paths: list[Path], chunk: int = 1 << 24) -> str:
    """One checksum over several files (in order), read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def read_metadata(artifact: Path) -> dict[str, Any]:
    """metadata.json as a dict, or an ArtifactError if it is missing or not a JSON object."""
    path = Path(artifact) / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(
            f"{artifact} is not an engine artifact (no {METADATA_FILE}); build one with "
            "python -m tools.build."
        ) from None
    except (OSError, ValueError) as e:
        raise DamagedArtifact(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DamagedArtifact(f"{path} holds no JSON object")
    return meta


def is_complete(artifact: Path) -> bool:
    artifact = Path(artifact)
    return (artifact / ENGINE_FILE).is_file() and (artifact / METADATA_FILE).is_file()


def source_fingerprint(model_dir: Path) -> str:
    """Identifies a model folder cheaply: the bytes of every file an artifact copies (config,
    tokenizer, generation config), plus each shard's name, size and mtime."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + hashlib.sha256((model_dir / name).read_bytes()).digest())
    for shard in sorted(model_dir.glob("*.safetensors")):
        st = shard.stat()
        digest.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def build_key(meta: dict[str, Any]) -> str:
    """The name of one build, from the metadata fields that decide it.

    `check_intact` recomputes it, so a metadata.json edited after the build is caught."""
    calibration = meta.get("calibration")
    decided_by = {
        "format": meta["format_version"],  # a contract change makes a new artifact
        "source": meta["model"]["fingerprint"],
        "options": meta["options"],
        "backend": [meta["backend"]["module"], meta["backend"]["version"]],
        "target": meta.get("target"),
        "optimization_level": meta.get("optimization_level"),
        "calibration": calibration["sha256"] if calibration else None,
    }
    if "network_version" in meta:  # absent in artifacts built before it: they keep their key
        decided_by["network"] = meta["network_version"]
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()


def check_format(artifact: Path, meta: dict[str, Any]) -> None:
    """Refuse an artifact of another FORMAT_VERSION: its network follows another contract."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{artifact} has artifact format {version}, but this trt-netdef reads format "
            f"{FORMAT_VERSION}; rebuild it with python -m tools.build --force."
        )


def open_artifact(artifact: Path) -> Metadata:
    """The metadata of an artifact to run: complete and of this FORMAT_VERSION."""
    artifact = Path(artifact)
    if not is_complete(artifact):
        raise ArtifactError(
            f"{artifact} is not an engine artifact; build one with python -m tools.build."
        )
    meta = read_metadata(artifact)
    check_format(artifact, meta)
    return Metadata.from_dict(meta)


def check_intact(artifact: Path) -> Metadata:
    """The metadata of a built artifact that is still what its build wrote.

    Catches what `is_complete` cannot see (a truncated engine, a lost tokenizer file, an
    edited metadata.json) before anything reuses or runs it; raises DamagedArtifact."""
    artifact = Path(artifact)
    meta = read_metadata(artifact)
    missing = [k for k in BUILT_FIELDS if k not in meta]
    if missing:
        raise DamagedArtifact(f"{artifact / METADATA_FILE} lacks {', '.join(missing)}")
    check_format(artifact, meta)
    try:
        built, files, key = meta["build"]["engine_bytes"], meta["model"]["files"], build_key(meta)
    except (KeyError, TypeError) as e:
        raise DamagedArtifact(f"{artifact / METADATA_FILE} has a malformed field ({e!r})") from None
    if key != meta.get("build_key"):
        raise DamagedArtifact(
            f"{artifact / METADATA_FILE} was edited after the build (it no longer matches its "
            "build_key)"
        )
    engine = artifact / ENGINE_FILE
    if not engine.is_file():
        raise DamagedArtifact(f"{artifact} has no {ENGINE_FILE}")
    if engine.stat().st_size != built:
        raise DamagedArtifact(
            f"{engine} is {engine.stat().st_size} bytes but was built as {built} bytes (truncated "
            "or replaced)"
        )
    lost = [name for name in files if not (artifact / name).is_file()]
    if lost:
        raise DamagedArtifact(f"{artifact} has lost {', '.join(lost)}")
    return Metadata.from_dict(meta)


def check_replaceable(folder: Path) -> None:
    """Raise ArtifactError unless `folder` is absent, empty, or holds only an artifact's files.

    Replacing such a folder deletes nothing a user put there; anything else is refused, with
    or without --force."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ArtifactError(
            f"{folder} exists and is not a folder; choose another --output (nothing was changed)."
        )
    names = sorted(p.name for p in folder.iterdir())
    foreign = [n for n in names if n not in ARTIFACT_FILES or not (folder / n).is_file()]
    if names and (foreign or METADATA_FILE not in names):
        held = ", ".join((foreign or names)[:3]) + (", ..." if len(foreign or names) > 3 else "")
        what = (
            "holds an engine artifact and files of yours"
            if METADATA_FILE in names
            else "is not empty and is not an engine artifact"
        )
        raise ArtifactError(
            f"{folder} {what} (it holds {held}); nothing was deleted: choose another --output, "
            "or empty that folder yourself."
        )


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it takes `final`'s place
    (`weights.folders.staged_folder`). An existing `final` is checked again at the end (it may
    have changed during the build), and only an artifact's own files in it are ever deleted."""
    with staged_folder(final, ARTIFACT_FILES) as tmp:
        yield tmp
        check_replaceable(final)


def copy_model_files(model_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in MODEL_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, dest / name)
            copied.append(name)
    return copied


def write_metadata(dest: Path, data: dict[str, Any]) -> None:
    (Path(dest) / METADATA_FILE).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
