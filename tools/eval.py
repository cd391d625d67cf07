"""Perplexity and top-1 agreement of quantized networks against the unquantized one, on the CPU.

    python -m tools.eval MODEL_DIR --text FILE [--quant MODE ...] [--quant-lm-head]
        [--calib-file FILE] [--dtype bfloat16] [--max-tokens N] [--chunk N] [--json]
    python -m tools.eval MODEL.gguf --text FILE    # from-gguf too: the file's own blocks
    python -m tools.eval ARTIFACT --text FILE      # the artifact's model, dtype and quant mode

Every network is the all-logits one, run by the NumPy executor with the text fed in chunks
through the KV cache, as an engine is driven. Perplexity is over every next-token
prediction of the text; top-1 agreement is the share of those positions where the
quantized network's most likely token is the unquantized one's. fp8 is calibrated on
--calib-file (default: the shipped sample text), never on the evaluated text. A GGUF file is
converted as tools.build converts it; from-gguf keeps its blocks the way tools.build does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from netdef import NetworkOptions, OptionsError, build_network
from netdef.artifact import METADATA_FILE, check_intact
from netdef.contract import DEFAULT_DTYPE, LOGITS, MODEL_DTYPES
from netdef.decoder import WeightSource
from netdef.quant import CALIBRATION_TEXT, MODES
from netdef.slots import prompt_chunks
from runtime.calibration import activation_amax
from runtime.cpu import CpuBackend
from runtime.readout import ALL_LOGITS
from runtime.reference import ExecutorError
from runtime.tokenizer import Tokenizer
from tools.cli import path_arg
from weights import Checkpoint, WeightsError, resolve_model
from weights.bundled import default_cache_dir
from weights.gguf_quant import GGUFQuantized, not_a_gguf_file


def score(
    model: CpuBackend, ids: Sequence[int], chunk: int, desc: str = "scoring"
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood (float64) and top-1 id of each next token: [len(ids) - 1] each.

    Chunks of at most `chunk` tokens are cut at KV ring ends, as the generate loop cuts a
    prompt (a call may not cross one). A bar on stderr counts them: one network takes
    minutes on the CPU for a long text."""
    ids = np.asarray(ids, np.int32)
    n = ids.size
    nll, top1 = np.empty(n - 1), np.empty(n - 1, np.int64)
    model.reset(1)
    chunks = list(prompt_chunks(n - 1, chunk, model.rings))  # the last token predicts nothing
    for start, end in tqdm(chunks, desc=desc, unit="chunk", file=sys.stderr):
        positions = np.arange(start, end, dtype=np.int32)[None]
        last = np.zeros(1, np.int32)
        logits = model.forward(ids[None, start:end], positions, last, ALL_LOGITS)[LOGITS][0]
        peak = logits.max(axis=-1)
        log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1, dtype=np.float64))
        nll[start:end] = log_z - logits[np.arange(end - start), ids[start + 1 : end + 1]]
        top1[start:end] = logits.argmax(axis=-1)
    return nll, top1


def evaluate(
    source: WeightSource,
    ids: Sequence[int],
    modes: Sequence[str],
    *,
    dtype: str = DEFAULT_DTYPE,
    quant_lm_head: bool = False,
    calib_ids: Sequence[int] = (),
    chunk: int = 256,
    trt: ModuleType | None = None,
) -> dict[str, Any]:
    """The unquantized `dtype` network's perplexity, and each mode's with its top-1 agreement.
    from-gguf needs a `weights.gguf_quant.GGUFQuantized` source; every mode's options are
    checked before the first network runs, so a bad one costs no scoring."""
    if len(ids) < 2:
        raise ValueError("evaluation needs at least two tokens.")
    options = {
        mode: NetworkOptions(
            dtype=dtype,
            max_seq_len=len(ids),
            max_prefill=min(chunk, len(ids)),
            all_logits=True,
            quant=mode,
            quant_lm_head=quant_lm_head and mode != "none",
        )
        for mode in ("none", *modes)
    }
    for o in options.values():
        o.validate(source.config)

    def run(mode: str) -> tuple[np.ndarray, np.ndarray]:
        amax = activation_amax(source, calib_ids, dtype, chunk, trt) if mode == "fp8" else None
        model = CpuBackend(build_network(source, options[mode], trt, act_amax=amax))
        return score(model, ids, chunk, desc=f"{mode if mode != 'none' else dtype} network")

    ref_nll, ref_top1 = run("none")
    result: dict[str, Any] = {
        "tokens": len(ids),
        "dtype": dtype,
        "quant_lm_head": quant_lm_head,
        "reference": {"perplexity": float(np.exp(ref_nll.mean()))},
        "modes": {},
    }
    for mode in modes:
        nll, top1 = run(mode)
        result["modes"][mode] = {
            "perplexity": float(np.exp(nll.mean())),
            "top1_agreement": float((top1 == ref_top1).mean()),
        }
    return result


def format_table(result: dict[str, Any]) -> str:
    ref = result["reference"]["perplexity"]
    head = " + LM head" if result["quant_lm_head"] else ""
    lines = [
        f"{result['tokens']} tokens, {result['dtype']} reference{head}",
        f"{'network':<10}{'perplexity':>12}{'vs ref':>9}{'top-1 agreement':>17}",
        f"{result['dtype']:<10}{ref:>12.3f}{'':>9}{'':>17}",
    ]
    for mode, r in result["modes"].items():
        change = r["perplexity"] / ref - 1
        lines.append(
            f"{mode:<10}{r['perplexity']:>12.3f}{change:>+9.2%}{r['top1_agreement']:>17.2%}"
        )
    return "\n".join(lines)


def read_text(flag: str, path: Path) -> str:
    """The UTF-8 text of the file `flag` names, read before any network runs; a ValueError
    naming the flag and the path if it is not such a file."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "is a folder; pass a text file"
    except UnicodeDecodeError as e:
        problem = (
            f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        )
    except OSError as e:
        problem = e.strerror.lower()
    raise ValueError(f"{flag} {path}: {problem}.")


def from_artifact(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Evaluate what an artifact was built with: its model folder (returned, with the GGUF
    file of a from-gguf build), dtype, mode and calibration, set in `args`. Flags that ask
    for other settings are refused, not overridden: the numbers would not be what they asked
    for, and the model folder is the way to choose them."""
    meta = check_intact(args.model_dir)
    options = meta.options
    if options["quant"] == "none":
        raise ValueError(
            f"{args.model_dir} is not quantized, so there is nothing to compare it with; pass "
            f"its model folder {meta.model_path} to compare quantization modes (--quant)."
        )
    built = {"--dtype": options["dtype"], "--quant": options["quant"]}
    if options["quant_lm_head"]:
        built["--quant-lm-head"] = ""
    if meta.calibration:
        built["--calib-file"] = meta.calibration["file"]
    given = {
        "--dtype": args.dtype,
        "--quant": " --quant ".join(dict.fromkeys(args.quant or ())) or None,
        "--quant-lm-head": "" if args.quant_lm_head else None,
        "--calib-file": args.calib_file and str(args.calib_file.resolve()),
    }
    if other := {k: v for k, v in given.items() if v is not None and v != built.get(k)}:
        raise ValueError(
            f"{args.model_dir} was built with {flags(built)}, and tools.eval evaluates an artifact "
            f"as built; drop {flags(other)}, or pass its model folder {meta.model_path} to choose "
            "them."
        )
    if not (meta.model_path / "config.json").is_file():
        raise ValueError(
            f"the artifact's model folder {meta.model_path} is gone; pass the model folder instead."
        )
    args.dtype, args.quant = options["dtype"], [options["quant"]]
    args.quant_lm_head = options["quant_lm_head"]
    if meta.calibration:
        args.calib_file = Path(meta.calibration["file"])
    return meta.model_path, Path(meta.from_gguf["file"]) if meta.from_gguf else None


def flags(values: dict[str, str]) -> str:
    """`{"--dtype": "bfloat16", "--quant-lm-head": ""}` as the command line says it."""
    return " ".join(f"{flag} {value}".strip() for flag, value in values.items())


def quant_modes(args: argparse.Namespace, gguf: Path | None) -> list[str]:
    """The modes to compare: those asked for, else every one that applies to this source
    (from-gguf only to a GGUF file, and not under --quant-lm-head). An asked-for from-gguf
    that cannot apply is refused here, before any network runs, not after the others have."""
    if args.quant is None:
        applies = gguf is not None and not args.quant_lm_head
        return [m for m in MODES if m != "none" and (m != "from-gguf" or applies)]
    if "from-gguf" in args.quant and gguf is None:
        raise not_a_gguf_file(args.model_dir)
    return list(dict.fromkeys(args.quant))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model_dir",
        type=path_arg,
        help="Hugging Face model folder (with its tokenizer), GGUF file, or artifact of tools.build",
    )
    p.add_argument("--text", type=path_arg, required=True, help="UTF-8 text file to evaluate on")
    p.add_argument(
        "--quant",
        action="append",
        choices=[m for m in MODES if m != "none"],
        help="mode to compare with the unquantized network; repeat for several (default: every "
        "mode that applies; from-gguf only to a GGUF file, without --quant-lm-head)",
    )
    p.add_argument("--quant-lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument(
        "--calib-file", type=path_arg, help="fp8 calibration text (default: the shipped sample)"
    )
    p.add_argument(
        "--dtype", choices=list(MODEL_DTYPES), help=f"model dtype (default: {DEFAULT_DTYPE})"
    )
    p.add_argument("--max-tokens", type=int, help="evaluate on the text's first N tokens")
    p.add_argument("--chunk", type=int, default=256, help="tokens per prefill call")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        p.error(f"--max-tokens {args.max_tokens}: evaluation needs at least two tokens.")
    if args.chunk < 1:
        p.error(f"--chunk {args.chunk} must be at least 1.")
    if args.quant_lm_head and "from-gguf" in (args.quant or ()):
        p.error(
            "--quant-lm-head does not apply to --quant from-gguf, which keeps the LM head "
            "unquantized; evaluate from-gguf in a run without --quant-lm-head."
        )
    try:
        text = read_text("--text", args.text)
        calib_text = args.calib_file and read_text("--calib-file", args.calib_file)
    except ValueError as e:
        p.error(str(e))
    if not args.model_dir.exists():
        print(
            f"error: {args.model_dir} does not exist; pass an artifact folder from python -m "
            "tools.build or a Hugging Face model folder.",
            file=sys.stderr,
        )
        return 1
    try:
        if (args.model_dir / METADATA_FILE).is_file():  # an artifact, damaged or not
            model_dir, gguf = from_artifact(args)
        elif args.model_dir.is_file() and args.model_dir.suffix.lower() != ".gguf":
            raise ValueError(
                f"{args.model_dir} is a file; pass a Hugging Face model folder, a .gguf file or "
                "an artifact folder from python -m tools.build."
            )
        else:  # a GGUF file (or a folder holding one) is converted as tools.build converts it
            model_dir = resolve_model(str(args.model_dir))
            gguf = None if model_dir == args.model_dir else args.model_dir
        modes = quant_modes(args, gguf)
        dtype = args.dtype or DEFAULT_DTYPE
        tokenizer = Tokenizer.from_dir(model_dir)
        ids = tokenizer.encode(text)[: args.max_tokens]
        if len(ids) < 2:  # a token predicts the next: one (a BOS) leaves nothing to score
            raise ValueError(
                f"--text {args.text} is {len(ids)} token(s) long with the tokenizer's special "
                "tokens; evaluation needs at least two: pass a longer text."
            )
        ckpt = Checkpoint.open(model_dir)
        context = ckpt.config.max_position_embeddings
        if len(ids) > context:  # the network's max_seq_len is the text's length
            raise ValueError(
                f"{args.text} is {len(ids)} tokens, longer than the model's context "
                f"({context} positions); evaluate its first {context} with --max-tokens {context}."
            )
        calib = ()
        if "fp8" in modes:
            if calib_text is None:  # the shipped sample, or the text an artifact recorded
                calib_text = read_text("fp8 calibration text", args.calib_file or CALIBRATION_TEXT)
            calib = tokenizer.encode(calib_text)
        source = (
            GGUFQuantized.open(ckpt, gguf, default_cache_dir()) if "from-gguf" in modes else ckpt
        )
        result = evaluate(
            source,
            ids,
            modes,
            dtype=dtype,
            quant_lm_head=args.quant_lm_head,
            calib_ids=calib,
            chunk=args.chunk,
        )
    except (OSError, ValueError, WeightsError, OptionsError, ExecutorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
