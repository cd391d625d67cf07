"""Logits of a model's TensorRT network, executed on the CPU: a check anyone can run.

    python -m tools.logits MODEL_DIR --ids 2,18,77,... [--ids ...] [--prefill N]
        [--dtype float32|bfloat16|float16] --out logits.npy

The first N ids of each sequence go through the network as one prefill call, every later
id as one decode call through the KV cache, exactly as a generate loop drives an engine.
Saved as float32: [T, vocab] for one sequence, [B, T_max, vocab] for several, NaN past a
sequence's end.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from netdef import NetworkOptions, OptionsError, build_network
from netdef.artifact import METADATA_FILE, ArtifactError, read_metadata
from netdef.contract import MODEL_DTYPES
from runtime.cpu import CpuBackend, sequence_logits
from runtime.generate import GenerationError, check_token_ids
from runtime.reference import ExecutorError
from tools.cli import path_arg
from weights import Checkpoint, WeightsError
from weights.bundled import default_cache_dir
from weights.folders import staged_file
from weights.gguf_import import converted_path, find_gguf, is_complete
from weights.hub import is_gguf_source


def not_a_model_folder(path: Path) -> str | None:
    """What `path` is instead of a Hugging Face model folder, and what to pass; None for a
    folder that is no artifact or GGUF model (Checkpoint.open says what it lacks)."""
    if not path.exists():
        return (
            f"{path} does not exist; pass a Hugging Face model folder (config.json + safetensors)."
        )
    if is_gguf_source(path):
        return gguf_instead(path)
    if not path.is_dir():
        return (
            f"{path} is a file, not a folder; pass a Hugging Face model folder (config.json + "
            "safetensors)."
        )
    if (path / METADATA_FILE).is_file():
        try:
            source = f", {read_metadata(path)['model']['path']}"
        except (ArtifactError, KeyError, TypeError):
            source = ""
        return (
            f"{path} is an engine artifact; tools.logits runs a model folder's network on the "
            f"CPU: pass the folder it was built from{source}."
        )
    return None


def gguf_instead(path: Path) -> str:
    """A GGUF model's Hugging Face conversion to pass instead: where tools.build keeps it."""
    try:
        folder = converted_path(find_gguf(path).resolve(), default_cache_dir())
    except WeightsError as e:  # a folder of several GGUF files, or parts without the first
        return str(e)
    if is_complete(folder):
        return f"{path} is a GGUF model; pass its Hugging Face conversion, {folder}."
    return (
        f"{path} is a GGUF model; python -m tools.build {shlex.quote(str(path))} converts it "
        f"into {folder} (and builds an engine): pass that folder."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.logits", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "model_dir",
        type=path_arg,
        metavar="MODEL_DIR",
        help="Hugging Face model folder (config.json + safetensors)",
    )
    parser.add_argument(
        "--ids",
        action="append",
        required=True,
        help="comma-separated token ids; repeat for a batch",
    )
    parser.add_argument(
        "--prefill", type=int, help="ids per sequence in the first call (default: all)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=list(MODEL_DTYPES), help="default: %(default)s"
    )
    parser.add_argument(
        "--out",
        type=path_arg,
        required=True,
        help="the .npy file to write (.npy is added where missing)",
    )
    args = parser.parse_args(attached_ids(sys.argv[1:] if argv is None else argv))
    try:
        seqs = [[int(tok) for tok in s.split(",") if tok.strip()] for s in args.ids]
    except ValueError:
        parser.error("--ids takes comma-separated integers, e.g. --ids 2,18,77")
    if any(not s for s in seqs):
        parser.error("every --ids needs at least one token id")
    t_max = max(len(s) for s in seqs)
    prefill = t_max if args.prefill is None else args.prefill
    if not 1 <= prefill <= t_max:
        parser.error(f"--prefill {prefill} must be between 1 and the longest sequence ({t_max})")
    if not args.out.parent.is_dir():
        held = next(p for p in args.out.parents if p.exists())  # "/" at least
        parser.error(
            f"--out {args.out}: {held} is a file, not a folder; name a file in an existing folder"
            if not held.is_dir()
            else f"--out {args.out}: the folder {args.out.parent} does not exist; create it first"
        )
    path = args.out if args.out.name.endswith(".npy") else Path(f"{args.out}.npy")  # np.save's
    if folder := next((p for p in (args.out, path) if p.is_dir()), None):  # else FOLDER.npy
        parser.error(
            f"--out {args.out}: {folder} is a folder; name the file to write in it, e.g. "
            f"--out {folder / 'logits.npy'}"
        )
    if problem := not_a_model_folder(args.model_dir):
        raise SystemExit(f"error: {problem}")
    try:
        ckpt = Checkpoint.open(args.model_dir)
        for i, s in enumerate(seqs):  # the prompts' rule and message (runtime.generate)
            check_token_ids(s, ckpt.config.vocab_size, i if len(seqs) > 1 else None)
        context = ckpt.config.max_position_embeddings
        if t_max > context:  # the network's max_seq_len is the longest sequence
            raise SystemExit(
                f"error: a sequence of {t_max} ids is longer than the model's context "
                f"({context} positions); pass at most {context} ids per --ids."
            )
        options = NetworkOptions(
            dtype=args.dtype,
            max_batch=len(seqs),
            max_seq_len=t_max,
            max_prefill=prefill,
            all_logits=True,
        )
        model = CpuBackend(build_network(ckpt, options))
        logits = sequence_logits(model, seqs, prefill)
    except (WeightsError, OptionsError, GenerationError, ExecutorError) as e:
        raise SystemExit(f"error: {e}") from None
    saved = logits[0] if len(seqs) == 1 else logits
    try:
        with staged_file(path) as tmp, open(tmp, "wb") as f:  # a user's file is replaced whole
            np.save(f, saved)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror}).") from None
    ragged = " (NaN past a shorter sequence's end)" if len(set(map(len, seqs))) > 1 else ""
    print(f"Saved float32 logits {list(saved.shape)} to {path}{ragged}.", file=sys.stderr)
    return 0


def attached_ids(argv: list[str]) -> list[str]:
    """`--ids -1,3` as `--ids=-1,3`: argparse takes a value that starts with '-' (other than a
    lone number) for an option and answers "expected one argument". No option here starts
    with '-' and a digit, so such a value is the ids, which the vocabulary check then refuses."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--ids" and re.match(r"-\d", arg):
            out[-1] = f"--ids={arg}"
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    from tools.cli import run

    run(main)
