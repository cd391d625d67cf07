"""Build a TensorRT engine artifact from a model name, Hub repo id, local folder or GGUF file.

    python -m tools.build gemma-3-1b-it --backend tensorrt_rtx --target sm89 [--quant int8-wo]
    python -m tools.build path/to/model.gguf --target sm89

The artifact folder (engine, metadata.json, tokenizer and generation config) lands in the
user cache, keyed by the model's files, the options, the backend and its version and the
target; an identical second build reuses it at once. The pipeline is runtime.build.build;
this CLI parses the arguments and draws the progress (ConsoleHooks).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from netdef import OptionsError, TensorRTModuleError
from netdef.artifact import ArtifactError
from netdef.contract import DEFAULT_DTYPE, MODEL_DTYPES, PROFILE_SETS
from netdef.engine import EngineBuildError
from netdef.options import GLOBAL_OPT
from netdef.quant import MODES
from runtime.build import BuildError, BuildHooks, build
from runtime.reference import ExecutorError
from tools.cli import flag_named, path_arg
from weights import SHORT_NAMES, WeightsError
from weights.hub import BUNDLED


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

        def close(self):
            """The bars of phases a cancelled build never finished."""
            with lock:
                for bar in self.bars.values():
                    bar.close()
                self.bars.clear()

    return Monitor()


class ConsoleHooks(BuildHooks):
    """Progress on stderr: lines, a bar over the network's layers, the builder's phases."""

    downloads = True
    monitor: Any = None  # the builder's, once builder_monitor made it

    def say(self, message: str) -> None:
        print(message, file=sys.stderr)

    @contextmanager
    def phase(self, name: str, total: int = 0) -> Iterator[Callable[[int, int], None] | None]:
        if name == "engine":  # the builder's bars (builder_monitor) end with it, however
            try:
                yield None
            finally:
                if self.monitor is not None:
                    self.monitor.close()
            return
        if name != "network":
            yield None
            return
        with tqdm(total=total, desc="Network definition", unit="layer") as bar:
            yield lambda done, total: bar.update(1)

    def builder_monitor(self, trt: Any) -> Any:
        self.monitor = builder_progress(trt, True)
        return self.monitor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.build",
        description=__doc__.split("\n\n")[0],
        epilog="short names: " + ", ".join(SHORT_NAMES),
    )
    p.add_argument(
        "model",
        help="short name (gemma-3-1b-it, llama-3.2-1b-instruct, qwen3-0.6b, ...), Hub repo id, "
        f"local folder, a GGUF file (or a folder holding one), or {BUNDLED} (Gemma-3-270M from "
        "the bundled extra)",
    )
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(MODEL_DTYPES))
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
        "scores of batch x heads x chunk x cache would pass 2^30, and at most 4 sliding windows; "
        "sliding layers keep window + max-prefill - 1 KV slots)",
    )
    p.add_argument(
        "--prefill-opt",
        type=int,
        help="prompt length the prefill profile is tuned for (default: min(512, max))",
    )
    p.add_argument(
        "--decode-opt",
        type=int,
        help="batch the decode profile is tuned for (default: 1, for the fastest "
        "single-sequence steps; a server whose batches are mostly full may tune for more)",
    )
    p.add_argument(
        "--decode-long",
        action=argparse.BooleanOptionalAction,
        help=f"decode steps that read more than {GLOBAL_OPT:,} global positions get a profile "
        "of their own, tuned for the whole cache: 23%% faster after 30,000 cached tokens (H100, "
        "Gemma-3-1B shape), a longer build (default: on where the model has global attention "
        "layers and --max-seq-len passes that)",
    )
    p.add_argument(
        "--profiles",
        default=PROFILE_SETS[0],
        choices=PROFILE_SETS,
        metavar="SET",
        help="optimization profiles, one of three sets: 'decode,prefill,chunk' (the default: "
        "one for decode steps, one for prompt chunks, one for a single sequence's full chunks "
        "of --max-prefill tokens, whose fixed shape gets faster kernels), 'decode,prefill' "
        "(the first two: a faster build) or 'dynamic' (one profile for every call)",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=MODES,
        help="quantize the linear layers: int8-wo (per-channel INT8 weights), int4-wo (INT4 "
        "weights in blocks of 128 inputs, or 64 or 32 where 128 does not divide a layer's "
        "inputs), fp8 (FP8 weights and activations, sm89+) or from-gguf (a GGUF MODEL's "
        "Q8_0/Q5_0/Q4_0/Q6_K weights keep their blocks exactly, as INT8; the rest unquantized)",
    )
    p.add_argument(
        "--quant-lm-head",
        action="store_true",
        help="quantize the LM head too (embeddings, norms and the head stay unquantized otherwise)",
    )
    p.add_argument(
        "--calib-file",
        type=path_arg,
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
    p.add_argument("--output", type=path_arg, help="artifact folder (default: in the user cache)")
    p.add_argument("--optimization-level", type=int, choices=range(6))
    p.add_argument(
        "--timing-cache",
        type=path_arg,
        help="--backend tensorrt: read and update this file of the builder's kernel timings, "
        "so later builds skip them (TensorRT-RTX does not time kernels)",
    )
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
            decode_opt=args.decode_opt,
            decode_long=args.decode_long,
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
            hooks=BuildHooks() if args.quiet else ConsoleHooks(),
        )
    except (
        BuildError,
        ArtifactError,
        TensorRTModuleError,
        WeightsError,
        OptionsError,
        EngineBuildError,
        ExecutorError,  # fp8 calibration runs the network on the CPU
    ) as e:
        print(f"error: {flag_named(e)}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
