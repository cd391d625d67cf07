"""Perplexity and top-1 agreement of quantized networks against the unquantized one, on the CPU.

    python -m tools.eval MODEL_DIR --text FILE [--quant MODE ...] [--quant-lm-head]
        [--calib-file FILE] [--dtype bfloat16] [--max-tokens N] [--chunk N] [--json]
    python -m tools.eval ARTIFACT --text FILE      # the artifact's model, dtype and quant mode

Every network is the all-logits one, run by the NumPy executor with the text fed in chunks
through the KV cache, as an engine is driven. Perplexity is over every next-token
prediction of the text; top-1 agreement is the share of those positions where the
quantized network's most likely token is the unquantized one's. fp8 is calibrated on
--calib-file (default: the shipped sample text), never on the evaluated text.
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
from netdef.artifact import is_complete, open_artifact
from netdef.contract import LOGITS, MODEL_DTYPES
from netdef.decoder import WeightSource
from netdef.quant import CALIBRATION_TEXT, MODES
from runtime.calibration import activation_amax
from runtime.cpu import CpuBackend
from runtime.readout import ALL_LOGITS
from runtime.tokenizer import Tokenizer
from weights import Checkpoint, WeightsError


def score(
    model: CpuBackend, ids: Sequence[int], chunk: int, desc: str = "scoring"
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood (float64) and top-1 id of each next token: [len(ids) - 1] each.

    A bar on stderr counts the chunks: one network takes minutes on the CPU for a long text."""
    ids = np.asarray(ids, np.int32)
    n = ids.size
    nll, top1 = np.empty(n - 1), np.empty(n - 1, np.int64)
    model.reset(1)
    for start in tqdm(range(0, n - 1, chunk), desc=desc, unit="chunk", file=sys.stderr):
        end = min(start + chunk, n - 1)  # the last token predicts nothing
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
    dtype: str = "bfloat16",
    quant_lm_head: bool = False,
    calib_ids: Sequence[int] = (),
    chunk: int = 256,
    trt: ModuleType | None = None,
) -> dict[str, Any]:
    """The unquantized `dtype` network's perplexity, and each mode's with its top-1 agreement."""
    if len(ids) < 2:
        raise ValueError("evaluation needs at least two tokens.")

    def run(mode: str) -> tuple[np.ndarray, np.ndarray]:
        options = NetworkOptions(
            dtype=dtype,
            max_seq_len=len(ids),
            max_prefill=min(chunk, len(ids)),
            all_logits=True,
            quant=mode,
            quant_lm_head=quant_lm_head and mode != "none",
        )
        options.validate(source.config)  # before a calibration pass
        amax = activation_amax(source, calib_ids, dtype, chunk, trt) if mode == "fp8" else None
        model = CpuBackend(build_network(source, options, trt, act_amax=amax))
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


def from_artifact(args: argparse.Namespace) -> None:
    """Evaluate what an artifact was built with: its model folder, dtype, mode and calibration."""
    meta = open_artifact(args.model_dir)
    options = meta.options
    if options["quant"] == "none":
        raise ValueError(f"{args.model_dir} is not quantized; nothing to compare it with.")
    args.model_dir = meta.model_path
    if not (args.model_dir / "config.json").is_file():
        raise ValueError(
            f"the artifact's model folder {args.model_dir} is gone; pass the model folder instead."
        )
    args.dtype, args.quant = options["dtype"], [options["quant"]]
    args.quant_lm_head = options["quant_lm_head"]
    if meta.calibration:
        args.calib_file = Path(meta.calibration["file"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model_dir",
        type=Path,
        help="Hugging Face model folder (with its tokenizer), or an artifact of tools.build",
    )
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to evaluate on")
    p.add_argument(
        "--quant",
        action="append",
        choices=[m for m in MODES if m != "none"],
        help="mode to compare with the unquantized network; repeat for several (default: all)",
    )
    p.add_argument("--quant-lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument(
        "--calib-file",
        type=Path,
        default=CALIBRATION_TEXT,
        help="fp8 calibration text (default: the shipped sample)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=list(MODEL_DTYPES))
    p.add_argument("--max-tokens", type=int, help="evaluate on the text's first N tokens")
    p.add_argument("--chunk", type=int, default=256, help="tokens per prefill call")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        p.error(f"--max-tokens {args.max_tokens}: evaluation needs at least two tokens.")
    if args.chunk < 1:
        p.error(f"--chunk {args.chunk} must be at least 1.")
    for flag, path in (("--text", args.text), ("--calib-file", args.calib_file)):
        if not path.is_file():
            p.error(f"{flag} {path}: no such file.")
    if not args.model_dir.exists():
        print(
            f"error: {args.model_dir} does not exist; pass an artifact folder from python -m "
            "tools.build or a Hugging Face model folder.",
            file=sys.stderr,
        )
        return 1
    try:
        if is_complete(args.model_dir):
            from_artifact(args)
        modes = args.quant or [m for m in MODES if m != "none"]
        tokenizer = Tokenizer.from_dir(args.model_dir)
        ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))[: args.max_tokens]
        ckpt = Checkpoint.open(args.model_dir)
        context = ckpt.config.max_position_embeddings
        if len(ids) > context:  # the network's max_seq_len is the text's length
            raise ValueError(
                f"{args.text} is {len(ids)} tokens, longer than the model's context "
                f"({context} positions); evaluate its first {context} with --max-tokens {context}."
            )
        calib = (
            tokenizer.encode(args.calib_file.read_text(encoding="utf-8")) if "fp8" in modes else ()
        )
        result = evaluate(
            ckpt,
            ids,
            modes,
            dtype=args.dtype,
            quant_lm_head=args.quant_lm_head,
            calib_ids=calib,
            chunk=args.chunk,
        )
    except (OSError, ValueError, WeightsError, OptionsError) as e:  # ArtifactError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
