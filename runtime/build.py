"""The build pipeline: a model name, Hub repo id, local folder or GGUF file -> an engine artifact.

    artifact = build("gemma-3-1b-it", backend="tensorrt_rtx", target="sm89", quant="int8-wo")

Checks every option first, resolves and opens the checkpoint, names the build by its cache
key (netdef.artifact.build_key), reuses an intact identical artifact, else calibrates (fp8),
defines the network, runs the TensorRT builder and writes the artifact in a staging folder
under a lock. It lives in runtime, not netdef, because fp8 calibration runs the network in
the executor and the tokenizer is checked before the build: netdef stays below runtime.
`BuildHooks` hear of each phase; the CLI (tools.build) and the benchmarks (tools.bench)
pass their own, so neither re-implements or patches the pipeline.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from netdef import NetworkOptions, build_engine, build_network, load_tensorrt
from netdef.artifact import (
    ENGINE_FILE,
    ArtifactError,
    DamagedArtifact,
    build_key,
    check_intact,
    check_replaceable,
    copy_model_files,
    files_sha256,
    fmt_bytes,
    is_complete,
    metadata,
    read_metadata,
    source_fingerprint,
    staging,
    write_metadata,
)
from netdef.contract import (
    DEFAULT_DTYPE,
    FORMAT_VERSION,
    NETWORK_VERSION,
    PROFILE_SETS,
    normalize_target,
)
from netdef.options import (
    GLOBAL_OPT,
    check_quant_target,
    default_max_prefill,
    default_max_seq_len,
)
from netdef.quant import CALIBRATION_TEXT
from netdef.tensorrt_module import compute_capability, is_rtx
from weights import Checkpoint, resolve_model
from weights.bundled import default_cache_dir
from weights.folders import locked, remove_stale_partials
from weights.gguf_import import open_gguf
from weights.gguf_quant import GGUFQuantized

from .calibration import activation_amax, calibration_ids
from .tokenizer import Tokenizer, TokenizerError


class BuildError(RuntimeError):
    """A build request that cannot be carried out as given."""


class BuildHooks:
    """What a build tells its caller; this base prints warnings only. Override `say`
    (progress lines), `phase` (a context around "calibration", "network" and "engine"; for
    "network" it yields the per-layer callback build_network takes, or None) and
    `builder_monitor` (a TensorRT IProgressMonitor for the builder's own phases, or None)."""

    downloads = False  # progress bars for Hub downloads

    def say(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    @contextmanager
    def phase(self, name: str, total: int = 0) -> Iterator[Callable[[int, int], None] | None]:
        yield None

    def builder_monitor(self, trt: Any) -> Any:
        return None


def warn_without_tokenizer(model_dir: Path, hooks: BuildHooks) -> None:
    """Said when an artifact is built or reused: it builds without tokenizer.json, but
    tools.generate cannot use it."""
    if not (model_dir / "tokenizer.json").is_file():
        hooks.warn(
            f"{model_dir} has no tokenizer.json, so python -m tools.generate cannot use "
            "this artifact; add the model's tokenizer files to that folder and build again."
        )


def build(
    model: str,
    *,
    dtype: str = DEFAULT_DTYPE,
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    prefill_opt: int | None = None,
    decode_opt: int | None = None,
    global_opt: int = GLOBAL_OPT,
    decode_long: bool | None = None,
    profiles: str = PROFILE_SETS[0],
    quant: str = "none",
    quant_lm_head: bool = False,
    calib_file: Path | None = None,
    sample_top_k: int = 64,
    backend: str | None = None,
    target: str | None = None,
    output: Path | None = None,
    optimization_level: int | None = None,
    timing_cache: Path | None = None,
    force: bool = False,
    token: str | None = None,
    revision: str | None = None,
    hooks: BuildHooks | None = None,
) -> Path:
    """Build (or reuse) the artifact for `model`; returns its folder.

    fp8 calibrates its activation scales on `calib_file` (default: the shipped sample text).
    `decode_long` None: on where it applies (`NetworkOptions.why_not_decode_long`).
    `hooks` hear of each phase (tools.build draws progress with them, tools.bench times them)."""
    hooks = hooks or BuildHooks()
    trt = load_tensorrt(backend)
    if is_rtx(trt):
        if target is None:
            raise BuildError(
                "TensorRT-RTX builds ahead of time for one GPU generation: pass --target "
                "(sm75, sm80, sm86, sm89, sm120 or sm121), e.g. --target sm89 for an RTX 40-series GPU."
            )
        compute_capability(trt, target)  # validates the name before any work
        target = normalize_target(target)  # '8.9' and 'SM89' build (and reuse) as 'sm89'
        if timing_cache is not None:
            raise BuildError(
                "--timing-cache applies to --backend tensorrt only: TensorRT-RTX does not "
                "autotune, so a timing cache has no effect on its engines; drop --timing-cache."
            )
    elif target is not None:
        raise BuildError(
            "--target applies to --backend tensorrt_rtx only; datacenter TensorRT builds for the GPU it runs on."
        )
    check_quant_target(quant, target)
    if calib_file is not None and quant != "fp8":
        raise BuildError("--calib-file applies to --quant fp8 only.")
    calib_file = Path(calib_file or CALIBRATION_TEXT) if quant == "fp8" else None
    if calib_file is not None and not calib_file.is_file():
        raise BuildError(f"calibration text {calib_file} does not exist (--calib-file).")
    started = time.perf_counter()
    model_dir = resolve_model(model, revision=revision, token=token, progress=hooks.downloads)
    local = Path(model).expanduser()
    named = local.resolve() if local.exists() else None  # a local model, absolute, links followed
    ckpt = Checkpoint.open(model_dir)
    gguf_source = None  # from-gguf: the file's own quantized blocks, where TensorRT has them
    if quant == "from-gguf":
        gguf_source = GGUFQuantized.source(ckpt, model, default_cache_dir())
    if (model_dir / "tokenizer.json").is_file():  # a broken one fails now, not after the build
        try:
            Tokenizer.from_dir(model_dir)
        except TokenizerError as e:
            raise BuildError(str(e)) from None
    config = ckpt.config
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(config)
    options = NetworkOptions(
        dtype=dtype,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_prefill=max_prefill,
        prefill_opt=prefill_opt,
        decode_opt=decode_opt,
        global_opt=global_opt,
        decode_long=bool(decode_long),
        profile_set=profiles,
        quant=quant,
        quant_lm_head=quant_lm_head,
        sample_top_k=sample_top_k,
    )
    options.validate(config)  # the model's bounds first (the numbers were checked on creation)
    if max_prefill is None:  # replace checks prefill_opt against that default
        options = replace(options, max_prefill=default_max_prefill(config, max_batch, max_seq_len))
    for caveat in options.caveats(config):
        hooks.warn(caveat)
    if decode_long is None:  # where it applies (NetworkOptions.profiles says why)
        options = replace(options, decode_long=options.why_not_decode_long(config) is None)
    calibration = None
    if calib_file is not None:
        try:
            calib_ids = calibration_ids(model_dir, calib_file)
        except TokenizerError as e:
            raise BuildError(f"fp8 calibration tokenizes {calib_file}: {e}") from None
        calibration = {
            "file": str(calib_file.resolve()),  # tools.eval reads it from any cwd
            "sha256": files_sha256([calib_file]),
            "tokens": min(len(calib_ids), config.max_position_embeddings),
        }
    identity = {  # what decides the build; metadata.json records the same fields
        "format_version": FORMAT_VERSION,
        "network_version": NETWORK_VERSION,
        "model": {"fingerprint": source_fingerprint(model_dir)},
        "options": options.__dict__,
        "backend": {"module": trt.__name__, "version": trt.__version__},
        "target": target,
        "optimization_level": optimization_level,
        "calibration": calibration,
    }
    key = build_key(identity)
    slug = (named or Path(model.rstrip("/"))).name.lower().removesuffix(".gguf")
    output = Path(output) if output else default_cache_dir() / "engines" / f"{slug}-{key[:16]}"
    if not force and _reusable(output, key):  # needs no lock: a read-only cache serves too
        warn_without_tokenizer(model_dir, hooks)
        hooks.say(f"Reusing {output} (identical build; --force rebuilds).")
        return output
    waiting = f"Waiting for another build of {output} to finish..."
    try:
        with locked(output, on_wait=lambda: hooks.say(waiting)):
            remove_stale_partials(output, hooks.say, "builds")
            check_replaceable(output)  # absent, empty, or one of ours: nothing else is touched
            if output.exists() and any(output.iterdir()) and not force:
                if read_metadata(output).get("build_key") != key:
                    raise BuildError(
                        f"{output} holds another or an incomplete engine artifact; pass --force to "
                        "replace it, or choose another --output."
                    )
                try:
                    check_intact(output)
                    warn_without_tokenizer(model_dir, hooks)
                    hooks.say(f"Reusing {output} (identical build; --force rebuilds).")
                    return output
                except DamagedArtifact as e:  # the same build, damaged: ours to replace
                    hooks.say(f"Rebuilding {output}: {e.reason}.")
            with staging(output) as tmp:
                warn_without_tokenizer(model_dir, hooks)
                if gguf_source is not None:  # read now, not for a reused build
                    ckpt = GGUFQuantized(ckpt, open_gguf(gguf_source))
                act_amax = None
                if calibration is not None:
                    hooks.say(
                        f"Calibrating FP8 activation ranges on {calibration['tokens']} tokens of {calib_file}...",
                    )
                    with hooks.phase("calibration"):
                        act_amax = activation_amax(ckpt, calib_ids, dtype, trt=trt)
                with hooks.phase("network", total=config.num_layers) as on_layer:
                    dn = build_network(
                        ckpt, options, trt, on_layer=on_layer, act_amax=act_amax, spill=tmp
                    )
                shards = sorted(model_dir.glob("*.safetensors"))
                # Hashed on a thread while the builder runs (hashlib releases the GIL): its
                # long "Determining refit engines" phases leave a core idle, and the hash
                # alone is about 10% of a 1B build.
                hashing = ThreadPoolExecutor(max_workers=1)
                weights_sha256 = hashing.submit(files_sha256, shards)
                per_sequence = options.kv_bytes(config)
                hooks.say(  # what a GPU must hold beside the engine: said before the long build
                    f"KV cache: {fmt_bytes(max_batch * per_sequence)} of GPU memory once loaded "
                    f"({max_batch} x {fmt_bytes(per_sequence)} per sequence at max_seq_len "
                    f"{max_seq_len}); --max-seq-len and --max-batch set it."
                )
                hooks.say(
                    f"Building the engine for {target or 'this GPU'} ({dtype}"
                    + (f", {quant}" if quant != "none" else "")
                    + f", {dn.network.num_layers} layers)...",
                )
                with hooks.phase("engine"):
                    engine_bytes = build_engine(
                        dn,
                        tmp / ENGINE_FILE,
                        target=target,
                        optimization_level=optimization_level,
                        timing_cache=timing_cache,
                        progress_monitor=hooks.builder_monitor(trt),
                    )
                contract = metadata(dn)  # I/O contract, profiles, config, backend versions
                if quant == "from-gguf":  # the file, and how many linear layers kept its blocks
                    contract["from_gguf"] = {
                        "file": str(ckpt.gguf.path),
                        "kept": len(dn.graph.kept),
                        "of": 4 * config.num_layers,
                    }
                del dn  # frees the network and its references to the weights
                copied = copy_model_files(model_dir, tmp)
                hashing.shutdown()
                seconds = time.perf_counter() - started
                peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                write_metadata(
                    tmp,
                    dict(
                        contract,
                        build_key=key,
                        network_version=identity["network_version"],
                        model={
                            **identity["model"],
                            "name": str(named or model),  # inspect runs from any cwd
                            "path": str(model_dir.resolve()),  # any cwd reads it
                            "files": copied,
                        },
                        target=target,
                        optimization_level=optimization_level,
                        weights_sha256=weights_sha256.result(),
                        calibration=calibration,
                        build={
                            "seconds": round(seconds, 2),
                            "engine_bytes": engine_bytes,
                            "checkpoint_bytes": sum(s.stat().st_size for s in shards),
                            "peak_rss_bytes": peak_rss,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        },
                    ),
                )
    except OSError as e:  # the lock and staging folder come first: a read-only place fails at once
        raise BuildError(
            f"cannot write {output} ({e.strerror}); choose a writable --output, or "
            "set TRT_NETDEF_CACHE to a writable folder (and check the free disk space)."
        ) from None
    hooks.say(
        f"Engine: {output / ENGINE_FILE} ({engine_bytes / 2**20:.1f} MiB) in {seconds:.1f} s, "
        f"peak RAM {peak_rss / 2**30:.2f} GiB.",
    )
    return output


def _reusable(output: Path, key: str) -> bool:
    """Whether `output` is an intact artifact of the build named `key`."""
    try:
        return is_complete(output) and check_intact(output).build_key == key
    except ArtifactError:
        return False
