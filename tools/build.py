"""Build a TensorRT engine artifact from a model name, Hub repo id or local folder.

    python -m tools.build gemma-3-1b-it --backend tensorrt_rtx --target sm89 [--quant int8-wo]

The artifact folder (engine, metadata.json, tokenizer and generation config) lands in the
user cache, keyed by the model's files, the options, the backend and its version and the
target; an identical second build reuses it at once.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from netdef import (
    BackendError,
    NetworkOptions,
    OptionsError,
    build_engine,
    build_network,
    load_backend,
)
from netdef.artifact import (
    ENGINE_FILE,
    FORMAT_VERSION,
    ArtifactError,
    DamagedArtifact,
    build_key,
    check_intact,
    check_replaceable,
    copy_model_files,
    files_sha256,
    is_complete,
    metadata,
    read_metadata,
    source_fingerprint,
    staging,
    write_metadata,
)
from netdef.backend import compute_capability, is_rtx
from netdef.contract import MODEL_DTYPES
from netdef.engine import EngineBuildError
from netdef.options import check_quant_target, default_max_prefill, default_max_seq_len
from netdef.quant import CALIBRATION_TEXT, MODES
from runtime.calibration import activation_amax
from runtime.tokenizer import Tokenizer, TokenizerError
from weights import SHORT_NAMES, Checkpoint, WeightsError, resolve_model
from weights.folders import locked, remove_stale_partials


class BuildError(RuntimeError):
    """A build request that cannot be carried out as given."""


def cache_root() -> Path:
    return Path(os.environ.get("TRT_NETDEF_CACHE") or Path.home() / ".cache" / "trt-netdef")


def builder_progress(trt: Any, enabled: bool) -> Any:
    """An IProgressMonitor drawing a tqdm bar per top-level builder phase, whose postfix names
    the nested phase underway and its step, so a long phase visibly moves.

    TensorRT calls it from its own threads, hence the lock."""
    lock = threading.Lock()

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}
            self.parents: dict[str, str | None] = {}
            self.steps: dict[str, int] = {}
            self.drawn = 0.0

        def root(self, phase_name):
            while self.parents.get(phase_name) is not None:
                phase_name = self.parents[phase_name]
            return phase_name

        def show(self, phase_name, step):
            bar = self.bars.get(self.root(phase_name))
            if bar is not None and phase_name not in self.bars:
                total = self.steps.get(phase_name, 0)
                text = f"{phase_name} {step}/{total}" if total else phase_name
                bar.set_postfix_str(text, refresh=False)
                if time.monotonic() - self.drawn >= 0.25:  # redrawn 4 times a second at most
                    self.drawn = time.monotonic()
                    bar.refresh()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with lock:
                self.parents[phase_name], self.steps[phase_name] = parent_phase, num_steps
                if enabled and parent_phase is None:
                    self.bars[phase_name] = tqdm(
                        total=num_steps, desc=f"TensorRT: {phase_name}", leave=False
                    )
                self.show(phase_name, 0)

        def step_complete(self, phase_name, step):
            with lock:
                if phase_name in self.bars:
                    self.bars[phase_name].update(1)
                else:
                    self.show(phase_name, step + 1)
            return True

        def phase_finish(self, phase_name):
            with lock:
                if phase_name in self.bars:
                    self.bars.pop(phase_name).close()

    return Monitor()


def build(
    model: str,
    *,
    dtype: str = "bfloat16",
    max_batch: int = 1,
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    prefill_opt: int | None = None,
    profiles: str = "decode,prefill",
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
    progress: bool = True,
) -> Path:
    """Build (or reuse) the artifact for `model`; returns its folder.

    fp8 calibrates its activation scales on `calib_file` (default: the shipped sample text)."""
    trt = load_backend(backend)
    if is_rtx(trt):
        if target is None:
            raise BuildError(
                "TensorRT-RTX builds ahead of time for one GPU generation: pass --target "
                "(sm75, sm80, sm86, sm89, sm120 or sm121), e.g. --target sm89 for an RTX 40-series GPU."
            )
        compute_capability(trt, target)  # validates the name before any work
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
    model_dir = resolve_model(model, revision=revision, token=token, progress=progress)
    ckpt = Checkpoint.open(model_dir)
    if (model_dir / "tokenizer.json").is_file():  # a broken one fails now, not after the build
        try:
            Tokenizer.from_dir(model_dir)
        except TokenizerError as e:
            raise BuildError(str(e)) from None
    config = ckpt.config
    max_seq_len = max_seq_len or default_max_seq_len(config)
    options = NetworkOptions(
        dtype=dtype,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_prefill=max_prefill or default_max_prefill(config, max_batch, max_seq_len),
        prefill_opt=prefill_opt,
        profile_set=profiles,
        quant=quant,
        quant_lm_head=quant_lm_head,
        sample_top_k=sample_top_k,
    )
    options.validate(config)
    calibration = None
    if calib_file is not None:
        try:
            calib_ids = Tokenizer.from_dir(model_dir).encode(calib_file.read_text(encoding="utf-8"))
        except TokenizerError as e:
            raise BuildError(f"fp8 calibration tokenizes {calib_file}: {e}") from None
        calibration = {
            "file": str(calib_file),
            "sha256": files_sha256([calib_file]),
            "tokens": min(len(calib_ids), config.max_position_embeddings),
        }
    identity = {  # what decides the build; metadata.json records the same fields
        "format_version": FORMAT_VERSION,
        "model": {"fingerprint": source_fingerprint(model_dir)},
        "options": options.__dict__,
        "backend": {"module": trt.__name__, "version": trt.__version__},
        "target": target,
        "optimization_level": optimization_level,
        "calibration": calibration,
    }
    key = build_key(identity)
    slug = Path(model.rstrip("/")).name.lower()
    output = Path(output) if output else cache_root() / "engines" / f"{slug}-{key[:16]}"
    if not force and _reusable(output, key):  # needs no lock: a read-only cache serves too
        _say(progress, f"Reusing {output} (identical build; --force rebuilds).")
        return output
    waiting = f"Waiting for another build of {output} to finish..."
    try:
        with locked(output, on_wait=lambda: _say(progress, waiting)):
            if stale := remove_stale_partials(output):
                names = ", ".join(p.name for p in stale)
                _say(progress, f"Removed what interrupted builds left in {output.parent}: {names}.")
            check_replaceable(output)  # absent, empty, or one of ours: nothing else is touched
            if output.exists() and any(output.iterdir()) and not force:
                if read_metadata(output).get("build_key") != key:
                    raise BuildError(
                        f"{output} holds another or an incomplete engine artifact; pass --force to "
                        "replace it, or choose another --output."
                    )
                try:
                    check_intact(output)
                    _say(progress, f"Reusing {output} (identical build; --force rebuilds).")
                    return output
                except DamagedArtifact as e:  # the same build, damaged: ours to replace
                    _say(progress, f"Rebuilding {output}: {e.reason}.")
            with staging(output) as tmp:
                if not (model_dir / "tokenizer.json").is_file():
                    print(
                        f"warning: {model_dir} has no tokenizer.json, so python -m tools.generate cannot use "
                        "this artifact; add the model's tokenizer files to that folder and build again.",
                        file=sys.stderr,
                    )
                act_amax = None
                if calibration is not None:
                    _say(
                        progress,
                        f"Calibrating FP8 activation ranges on {calibration['tokens']} tokens of {calib_file}...",
                    )
                    act_amax = activation_amax(ckpt, calib_ids, dtype, trt=trt)
                with tqdm(
                    total=config.num_layers,
                    desc="Network definition",
                    unit="layer",
                    disable=not progress,
                ) as bar:
                    dn = build_network(
                        ckpt,
                        options,
                        trt,
                        on_layer=lambda done, total: bar.update(1),
                        act_amax=act_amax,
                    )
                shards = sorted(model_dir.glob("*.safetensors"))
                # Hashed on a thread while the builder runs (hashlib releases the GIL): its
                # long "Determining refit engines" phases leave a core idle, and the hash
                # alone is about 10% of a 1B build.
                hashing = ThreadPoolExecutor(max_workers=1)
                weights_sha256 = hashing.submit(files_sha256, shards)
                monitor = builder_progress(trt, progress)
                _say(
                    progress,
                    f"Building the engine for {target or 'this GPU'} ({dtype}"
                    + (f", {quant}" if quant != "none" else "")
                    + f", {dn.network.num_layers} layers)...",
                )
                engine_bytes = build_engine(
                    dn,
                    tmp / ENGINE_FILE,
                    target=target,
                    optimization_level=optimization_level,
                    timing_cache=timing_cache,
                    progress_monitor=monitor,
                )
                contract = metadata(dn)  # I/O contract, profiles, config, backend versions
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
                        model={
                            **identity["model"],
                            "name": model,
                            "path": str(model_dir),
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
    _say(
        progress,
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


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.build",
        description=__doc__.split("\n\n")[0],
        epilog="short names: " + ", ".join(SHORT_NAMES),
    )
    p.add_argument(
        "model",
        help="short name (gemma-3-1b-it, llama-3.2-1b-instruct, qwen3-0.6b, ...), Hub repo id or local folder",
    )
    p.add_argument("--dtype", default="bfloat16", choices=list(MODEL_DTYPES))
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="KV-cache length per sequence (default: the model's context)",
    )
    p.add_argument(
        "--max-prefill",
        type=int,
        help="longest prompt chunk per call (default: --max-seq-len, less where the attention "
        "scores of batch x heads x chunk x cache would pass 2^30)",
    )
    p.add_argument(
        "--prefill-opt",
        type=int,
        help="prompt length the prefill profile is tuned for (default: min(512, max))",
    )
    p.add_argument(
        "--profiles",
        default="decode,prefill",
        choices=["decode,prefill", "dynamic"],
        metavar="SET",
        help="optimization profiles, one of two sets: 'decode,prefill' (the default: one for "
        "decode steps, one for prompt chunks) or 'dynamic' (one profile for both)",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=MODES,
        help="quantize the linear layers: int8-wo (per-channel INT8 weights), int4-wo (INT4 "
        "weights in blocks of 128 inputs) or fp8 (FP8 weights and activations, sm89+)",
    )
    p.add_argument(
        "--quant-lm-head",
        action="store_true",
        help="quantize the LM head too (embeddings, norms and the head stay unquantized otherwise)",
    )
    p.add_argument(
        "--calib-file",
        type=Path,
        help="text whose activation ranges set the fp8 scales (default: a shipped public-domain sample)",
    )
    p.add_argument(
        "--sample-top-k",
        type=int,
        default=64,
        help="the engine also returns its best K logits and their ids (and the softmax's "
        "log-normalizer), so sampling with top-k <= K, or top-p whose nucleus fits in K, copies "
        "those instead of the vocabulary (default 64; 0: no such outputs)",
    )
    p.add_argument(
        "--backend", choices=["tensorrt", "tensorrt_rtx"], help="default: whichever is installed"
    )
    p.add_argument("--target", help="TensorRT-RTX compute capability, e.g. sm89")
    p.add_argument("--output", type=Path, help="artifact folder (default: in the user cache)")
    p.add_argument("--optimization-level", type=int, choices=range(6))
    p.add_argument("--timing-cache", type=Path, help="read and update this timing cache file")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if an identical artifact exists, or replace another artifact in "
        "--output (a folder holding anything else is never replaced)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        out = build(
            args.model,
            dtype=args.dtype,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_prefill=args.max_prefill,
            prefill_opt=args.prefill_opt,
            profiles=args.profiles,
            quant=args.quant,
            quant_lm_head=args.quant_lm_head,
            calib_file=args.calib_file,
            sample_top_k=args.sample_top_k,
            backend=args.backend,
            target=args.target,
            output=args.output,
            optimization_level=args.optimization_level,
            timing_cache=args.timing_cache,
            force=args.force,
            token=os.environ.get("HF_TOKEN"),
            revision=args.revision,
            progress=not args.quiet,
        )
    except (
        BuildError,
        ArtifactError,
        BackendError,
        WeightsError,
        OptionsError,
        EngineBuildError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
