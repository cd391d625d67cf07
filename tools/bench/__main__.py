"""Benchmarks: TensorRT engine latency on a GPU; engine builds and the NumPy executor on the CPU.

    python -m tools.bench ARTIFACT_OR_MODEL [--compare-transformers] [--json FILE]   # GPU
    python -m tools.bench --build MODEL [MODEL ...] [--target sm89] [--json FILE]     # CPU
    python -m tools.bench --cpu MODEL [--json FILE]                                   # CPU
    python -m tools.bench --make-random gemma-3-1b --out DIR                          # CPU

GPU (TensorRT backend, CUDA events through `TensorRTBackend.last_call_ms`): prefill latency
per prompt length and decode latency per batch size (one call = H2D of the inputs, the engine,
D2H of the logits; decode steps replay a CUDA graph unless --no-graph), each after warm-up
rounds, as min and median over timed rounds; each decode row also has the untimed wall-clock
step and, run as greedy generation runs it (each step chained on the one before, its input ids
the previous step's argmax on the GPU), the chained step: beyond the GPU time, each is host
work the GPU waits for. Given a model rather than an artifact, it builds
the engine for this GPU; unless --no-compare-profiles it also builds the same model with one
`dynamic` profile and prints both engines' per-call latency with the speedup of the default
(decode,prefill,chunk) engine. The roofline divides the bytes a decode step must read
(weights + the KV-cache slots its tokens attend to) by the device's measured copy bandwidth
and prints the measured latency as a multiple of that floor. --compare-transformers times
transformers on the same prompts in the same run (torch is imported only then). --no-engine
measures all of that except the engine (for a GPU without TensorRT).

--build builds each model's engine in a child process (tools.build.build, TensorRT-RTX ahead
of time for --target) and reports its wall time and peak RSS (the child's own rusage from
wait4, plus /proc polling for the anonymous/file-backed split and per-phase figures), also as
a multiple of the checkpoint size; with --rounds N it builds every model N times, round-robin,
and adds each model's median. --cpu times the NumPy executor (runtime.cpu.CpuBackend)
against transformers on the CPU, and the host work the generate loop and the server add to
each decode step (tools/bench/host.py): all of it, and the part an emulated device step of
--device-ms waits for. A random checkpoint's logits are flat, so its top-p rows are the worst
case (the nucleus is most of the vocabulary: ~4 ms per sequence and step on 2 cores) and
--cpu takes about 3.5 minutes there; a trained model's logits are peaked. --make-random writes a checkpoint with a real model's shapes
and random bfloat16 weights, streamed tensor by tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from netdef.contract import PROFILE_SETS
from tools.bench import BenchError, NoGpu
from tools.bench.build import build_tables, build_worker, run_build
from tools.bench.cpu import cpu_tables, run_cpu
from tools.bench.gpu import gpu_tables, run_gpu
from tools.bench.host import DEVICE_MS
from tools.bench.random_model import (
    RANDOM_PRESETS,
    SHAPE_OVERRIDES,
    random_config,
    write_random_checkpoint,
)
from tools.bench.report import Report, busy_warning, fmt_bytes, json_path_error, machine, versions
from tools.bench.roofline import DTYPE_BYTES
from tools.bench.timing import DEFAULT_CONTEXT, HF_MODES
from tools.cli import at_least, path_arg


def int_list(text: str) -> list[int]:
    """'128,512' -> [128, 512] (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 1,4,16; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="ARTIFACT_OR_MODEL",
        help="engine artifact, model folder, short name or Hub repo id (--build takes several)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--build", action="store_true", help="measure engine builds (CPU)")
    mode.add_argument(
        "--cpu", action="store_true", help="NumPy executor vs transformers on the CPU"
    )
    mode.add_argument(
        "--make-random",
        metavar="PRESET",
        choices=sorted(RANDOM_PRESETS),
        help="write a random checkpoint with a real model's shapes: %(choices)s",
    )
    mode.add_argument("--build-worker", help=argparse.SUPPRESS)
    p.add_argument("--json", type=path_arg, help="also write the results as JSON")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: 3 GPU, 1 CPU)")
    p.add_argument(
        "--rounds", type=int, help="timed rounds (default: 10 GPU, 3 CPU; --build: 1 per model)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        help="default: bfloat16 (GPU, --build), float32 (--cpu)",
    )

    g = p.add_argument_group("GPU")
    g.add_argument(
        "--prompt-lens",
        type=int_list,
        help="prefill lengths (default 128,512,2048, clipped to the engine)",
    )
    g.add_argument(
        "--batches",
        type=int_list,
        help="decode batch sizes (default 1,4,16, clipped to the engine)",
    )
    g.add_argument(
        "--context",
        type=int,
        help=f"cached tokens before the decode steps (default {DEFAULT_CONTEXT})",
    )
    g.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    g.add_argument("--no-graph", action="store_true", help="decode without CUDA graph replay")
    g.add_argument(
        "--new-shapes",
        type=int,
        default=0,
        metavar="N",
        help="first time calls of shapes the engine has not run, once and again: N prompt "
        "lengths from 300 and every decode batch size (what a server pays when one first "
        "comes up)",
    )
    g.add_argument(
        "--profile",
        action="store_true",
        help="also list the GPU kernels of a decode step (batch 1 and the largest of --batches) "
        "and of the longest prefill (torch.profiler/CUPTI), and the time the GPU sat idle "
        "between them, plainly and (decode) as the CUDA graph replay that is timed",
    )
    g.add_argument(
        "--no-compare-profiles",
        dest="compare_profiles",
        action="store_false",
        help="skip the dynamic-profile engine",
    )
    g.add_argument(
        "--compare-transformers",
        action="store_true",
        help="time transformers (needs torch) in the same run",
    )
    g.add_argument(
        "--hf-modes",
        type=lambda s: [m for m in s.split(",") if m],
        help=f"transformers modes (default {','.join(HF_MODES)})",
    )
    g.add_argument(
        "--no-engine", action="store_true", help="measure bandwidth, roofline and transformers only"
    )
    g.add_argument(
        "--bandwidth-mib",
        type=int,
        default=512,
        help="D2D copy size for the bandwidth (default 512)",
    )

    b = p.add_argument_group("engine builds (GPU with a model, and --build)")
    b.add_argument("--backend", choices=["tensorrt", "tensorrt_rtx"])
    b.add_argument(
        "--target", help="TensorRT-RTX compute capability (--build default sm89; GPU: this GPU's)"
    )
    b.add_argument("--max-batch", type=int, help="default: largest --batches (GPU), 1 (--build)")
    b.add_argument("--max-seq-len", type=int, help="default: min(model context, 4096)")
    b.add_argument(
        "--profiles",
        default=PROFILE_SETS[0],
        choices=PROFILE_SETS,
        metavar="SET",
        help=f"--build only: {', '.join(repr(s) for s in PROFILE_SETS)} (default: the first)",
    )
    b.add_argument("--optimization-level", type=int, choices=range(6))
    b.add_argument(
        "--memory-limit",
        type=float,
        metavar="X",
        help="--build only: run each build in a memory cgroup capped at X times its checkpoint, "
        "page cache included (needs root)",
    )

    c = p.add_argument_group("--cpu")
    c.add_argument("--prompt-len", type=int, default=128, help="prefill tokens (default 128)")
    c.add_argument(
        "--decode-tokens", type=int, default=16, help="decode steps per round (default 16)"
    )
    c.add_argument(
        "--device-ms",
        type=float,
        default=DEVICE_MS,
        help="the emulated device step behind the host tables' 'device waits' column "
        f"(default {DEVICE_MS}: a Gemma-3-1B-shaped decode step on an H200)",
    )

    r = p.add_argument_group("--make-random")
    r.add_argument("--out", type=path_arg, help="folder to write (absent or empty)")
    r.add_argument("--seed", type=int, default=0)
    for key, field in SHAPE_OVERRIDES.items():
        r.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override {field}")
    args = p.parse_args(argv)

    if args.hf_modes and (bad := sorted(set(args.hf_modes) - set(HF_MODES))):
        p.error(f"--hf-modes: unknown {bad}; choose from {', '.join(HF_MODES)}")
    if args.make_random:
        if not args.out:
            p.error("--make-random needs --out DIR")
    elif args.build_worker is None:
        if not args.models:
            p.error("name an engine artifact or a model")
        if len(args.models) > 1 and not args.build:
            p.error("only --build takes several models")
        if args.memory_limit is not None and not (args.build and args.memory_limit > 0):
            p.error("--memory-limit takes a positive multiple of the checkpoint, with --build")
    positive = ("rounds", "prompt_len", "decode_tokens", "steps", "max_batch", "max_seq_len")
    names = {"warmup": 0, "context": 0, "new_shapes": 0, "seed": 0}
    names |= dict.fromkeys((*positive, *SHAPE_OVERRIDES, "bandwidth_mib"), 1)
    at_least(p, args, {f"--{name.replace('_', '-')}": low for name, low in names.items()})
    if args.json and (problem := json_path_error(args.json)):
        p.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_worker:
        return build_worker(args.build_worker)
    from netdef import OptionsError, TensorRTModuleError
    from netdef.artifact import ArtifactError
    from netdef.engine import EngineBuildError
    from runtime.build import BuildError
    from runtime.cuda_buffers import CudaError
    from runtime.tensorrt_backend import EngineLoadError
    from weights import WeightsError

    errors = (BenchError, TensorRTModuleError, BuildError, CudaError, EngineBuildError)
    errors += (ArtifactError, EngineLoadError, OptionsError, WeightsError)

    if args.make_random:
        overrides = {key: getattr(args, key) for key in SHAPE_OVERRIDES}
        try:
            out = write_random_checkpoint(
                args.out, random_config(args.make_random, **overrides), args.seed
            )
        except errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        size = (out / "model.safetensors").stat().st_size
        print(f"{out} ({fmt_bytes(size)} of random bfloat16 weights)")
        return 0

    kind = "build" if args.build else "cpu" if args.cpu else "gpu"
    report = Report(
        args.json,
        kind=kind,
        machine=machine(),
        versions=versions(),
        command=["python", "-m", "tools.bench", *(argv if argv is not None else sys.argv[1:])],
    )
    run, tables = {
        "build": (run_build, build_tables),
        "cpu": (run_cpu, cpu_tables),
        "gpu": (run_gpu, gpu_tables),
    }[kind]
    try:
        run(args, report)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, NoGpu) else 1
    with contextlib.suppress(OSError):
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    report.save()
    print(tables(report))
    if warning := busy_warning(report["machine"]):
        print(warning)
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
