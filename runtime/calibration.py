"""FP8 calibration: the activation range entering each linear layer of the unquantized network.

The network runs in the NumPy executor over a calibration text, fed in chunks through the
KV cache as an engine would be driven, and the executor hands back the input tensor of every
linear layer (`Graph.linear_inputs`). Each layer's amax (largest |x| over every token)
becomes its per-tensor FP8 scale, amax / 448, when the fp8 network is defined.

    amax = activation_amax(ckpt, calibration_ids(model_dir, text_file), "bfloat16")
    dn = build_network(ckpt, NetworkOptions(quant="fp8"), act_amax=amax)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from netdef import NetworkOptions, build_network
from netdef.decoder import WeightSource
from netdef.slots import prompt_chunks

from .cpu import CpuBackend
from .tokenizer import Tokenizer


def calibration_ids(model_dir: Path, text_file: Path) -> list[int]:
    """The token ids a calibration pass runs: `text_file` encoded by the model's tokenizer
    (the build and `--backend reference` on an fp8 artifact measure the same ranges)."""
    return Tokenizer.from_dir(model_dir).encode(text_file.read_text(encoding="utf-8"))


def activation_amax(
    source: WeightSource,
    token_ids: Sequence[int],
    dtype: str,
    chunk: int = 256,
    trt: ModuleType | None = None,
) -> dict[str, float]:
    """Each linear layer's input amax (by layer name) over `token_ids`, from the unquantized
    `dtype` network. Tokens beyond the model's context are not used."""
    ids = np.asarray(token_ids[: source.config.max_position_embeddings], np.int32)
    if ids.size == 0:
        raise ValueError("calibration needs at least one token.")
    options = NetworkOptions(
        dtype=dtype,
        max_seq_len=ids.size,
        max_prefill=min(chunk, ids.size),
        all_logits=True,  # the LM head's input at every position, not only the last
    )
    dn = build_network(source, options, trt)
    taps = dn.graph.linear_inputs
    model = CpuBackend(dn)
    model.reset(1)
    amax = dict.fromkeys(taps, 0.0)
    # chunks cut at KV ring ends, as the generate loop cuts them
    for start, end in prompt_chunks(ids.size, model.max_prefill, model.rings):
        positions = np.arange(start, end, dtype=np.int32)[None]
        feeds = model.feeds(ids[None, start:end], positions, np.zeros(1, np.int32))
        seen = model.executor.run(feeds, extra=taps.values())
        for layer, tensor in taps.items():
            amax[layer] = max(amax[layer], float(np.abs(seen[tensor].astype(np.float32)).max()))
    return amax
