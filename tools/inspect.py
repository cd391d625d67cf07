"""Print what an engine artifact holds: model, build, profiles and the I/O contract.

python -m tools.inspect ARTIFACT [--json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from netdef.artifact import METADATA_FILE, ArtifactError, Metadata, check_intact, fmt_bytes
from netdef.contract import GLOBAL_POSITIONS, INPUT_IDS
from tools.cli import path_arg
from weights.hub import is_gguf_source


def quantization(meta: Metadata) -> str:
    opt = meta.options
    if opt.get("quant", "none") == "none":
        return "none"
    if opt["quant"] == "from-gguf":
        kept = meta.from_gguf or {}
        return (
            f"from-gguf ({kept.get('kept', '?')} of {kept.get('of', '?')} linear layers keep the "
            "file's blocks, as INT8)"
        )
    head = " (LM head too)" if opt.get("quant_lm_head") else ""
    blocks = f", blocks of {meta.int4_block} inputs" if meta.int4_block else ""
    calibrated = (
        f", activations calibrated on {meta.calibration['tokens']} tokens of "
        f"{meta.calibration['file']}"
        if meta.calibration
        else ""
    )
    return f"{opt['quant']}{blocks}{head}{calibrated}"


def kv_cache(kv: dict, max_batch: int) -> str:
    """Bytes per sequence and per batch, and how many layers keep how many slots."""
    counts: dict[int, int] = {}
    for n in kv["slots"]:
        counts[n] = counts.get(n, 0) + 1
    layers = ", ".join(f"{k} x {n}" for n, k in sorted(counts.items(), reverse=True))
    return (
        f"{fmt_bytes(kv['bytes_per_sequence'])} per sequence, {fmt_bytes(kv['bytes_per_batch'])} "
        f"per batch of {max_batch} (layers x slots: {layers})"
    )


def jit_caches(meta: Metadata) -> str:
    """The kernels TensorRT-RTX compiled for this artifact on GPUs (runtime.tensorrt_backend)."""
    from runtime.tensorrt_backend import kept_jit_caches

    kept = kept_jit_caches(meta)
    if not kept:
        return "none yet (TensorRT-RTX compiles the kernels on the first run on a GPU)"
    return ", ".join(
        f"{path.stem.rsplit('-', 1)[1]} {fmt_bytes(path.stat().st_size)} ({path})" for path in kept
    )


def span(low: int, opt: int, high: int) -> str:
    """One dimension of a profile: its range and the size TensorRT tuned the kernels for."""
    return str(low) if low == high else f"{low}..{high} (tuned for {opt})"


def layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def describe(metadata: Metadata) -> str:
    meta = metadata.data  # the fields only a person reads stay as metadata.json has them
    cfg, opt, build = meta["config"], meta["options"], meta.get("build", {})
    lines = [
        f"model      {meta['model']['name']} ({cfg['family']}, {layers(len(cfg['layers']))}, "
        f"hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']})",
        f"backend    {meta['backend']['module']} {meta['backend']['version']}, target {meta.get('target') or 'build GPU'}",
        f"format     artifact {meta['format_version']}, network "
        f"{meta.get('network_version', '- (built before network versions)')}",
        f"dtype      {opt['dtype']}, max batch {opt['max_batch']}, max seq len {opt['max_seq_len']}",
        f"KV cache   {kv_cache(meta['kv_cache'], opt['max_batch'])}",
        f"quant      {quantization(metadata)}",
        f"engine     {build.get('engine_bytes', 0) / 2**20:.1f} MiB, built in {build.get('seconds', '?')} s "
        f"(peak RAM {build.get('peak_rss_bytes', 0) / 2**30:.2f} GiB) on {build.get('created', '?')}",
        f"weights    sha256 {meta.get('weights_sha256', '?')}",
        *([f"JIT cache  {jit_caches(metadata)}"] if metadata.target else []),
        "profiles",
    ]
    for p in meta["profiles"]:
        ids = p["shapes"][INPUT_IDS]  # [B, S] as (min, opt, max)
        batch, tokens = (span(*(shape[axis] for shape in ids)) for axis in (0, 1))
        line = f"  {p['name']:<12}batch {batch}, tokens {tokens}"
        if read := p["shapes"].get(GLOBAL_POSITIONS):  # [Lg] as (min, opt, max)
            line += f", global positions {span(*(shape[0] for shape in read))}"
        lines.append(line)
    for kind in ("inputs", "outputs"):
        tensors = meta["io"][kind]
        lines.append(f"{kind} ({len(tensors)})")
        shown = [t for t in tensors if not t["name"][-1].isdigit() or t["name"].endswith("_0")]
        for t in shown:
            lines.append(f"  {t['name']:<18}{t['dtype']:<9}{t['shape']}")
        if len(shown) < len(tensors):
            lines.append(f"  ... and the same for each of the {layers(len(cfg['layers']))}")
    return "\n".join(lines)


def not_an_artifact(path: Path) -> str | None:
    """What `path` is instead of an artifact folder, and what to pass; None for a folder.

    A model (a GGUF file, a model folder) is what tools.build takes, so that is the fix."""
    if not path.exists():
        return f"{path} does not exist; pass a folder written by python -m tools.build."
    model = is_gguf_source(path) or (path / "config.json").is_file()
    if model and not (path / METADATA_FILE).is_file():
        what = "a GGUF file" if path.is_file() else "a model folder"
        return (
            f"{path} is {what}, not an engine artifact; python -m tools.build "
            f"{shlex.quote(str(path))} builds one (it prints the artifact folder to pass here)."
        )
    if not path.is_dir():
        return f"{path} is a file, not a folder; pass a folder written by python -m tools.build."
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.inspect", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "artifact",
        type=path_arg,
        metavar="ARTIFACT",
        help="folder written by python -m tools.build",
    )
    p.add_argument("--json", action="store_true", help="print the raw metadata.json")
    args = p.parse_args(argv)
    if problem := not_an_artifact(args.artifact):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        meta = check_intact(args.artifact)  # says what an artifact folder lacks, and the fix
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(meta.data, indent=2) if args.json else describe(meta))
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
