"""The GGUF block formats TensorRT's explicit quantization expresses exactly (`--quant from-gguf`).

TensorRT dequantizes symmetrically: value = q · s, q INT8 (or INT4), one strictly positive
scale s per block of inputs, zero point 0 (netdef.quant). A GGUF weight maps onto that
exactly when each of its values is an integer times one scale per block, the integer within
INT8 once the scale's sign is moved into it:

    type   GGUF value (per block)                 TensorRT                          exact
    Q8_0   d·q, q in [-127, 127], 32 values        INT8, blocks of 32                yes
    Q5_0   d·(q − 16), q in [0, 31], 32 values     INT8, blocks of 32                yes
    Q4_0   d·(q − 8), q in [0, 15], 32 values      INT8, blocks of 32                yes
    Q6_K   d·sc·(q − 32), int8 sc per 16 values    INT8, blocks of 16, s = |d·sc|    yes
    Q3_K   d·(sc − 32)·q, 6-bit sc per 16          INT8, blocks of 16                yes, not
                                                                                     implemented
    Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: d·q + m, a per-block minimum m, i.e. a zero point: no

Q4_0 is not INT4 in general: llama.cpp picks d = (the block's largest-magnitude value) / −8,
so d < 0 wherever that value is positive, and that value, 8·|d|, is outside INT4's [−8, 7]
under any positive scale. The scales are float16 (Q6_K: float16 × int8), exact in float32,
so they are kept in float32: bfloat16 would round them. Every other weight is built from the
converted folder's dequantized values, unquantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from .checkpoint import Checkpoint
from .errors import WeightsError
from .gguf_file import GGUFTensor
from .gguf_import import (
    GGUFFile,
    converted_path,
    find_gguf,
    hf_tensor_name,
    open_gguf,
    unpermute_qk,
)
from .hub import BUNDLED, is_gguf_source

Q = GGMLQuantizationType
# Type -> (inputs per scale, bytes per block, where the block's float16 d sits).
EXACT = {Q.Q8_0: (32, 34, 0), Q.Q5_0: (32, 22, 0), Q.Q4_0: (32, 18, 0), Q.Q6_K: (16, 210, 208)}
Q6_K_SCALES = slice(192, 208)  # int8 scale of each 16 values of a 256-value Q6_K block


def block_scales(tensor: GGUFTensor, rows: int) -> np.ndarray:
    """The signed scale of each block of inputs, [rows, inputs / block], in float32."""
    _, size, d_at = EXACT[tensor.tensor_type]
    raw = np.asarray(tensor.data).reshape(rows, -1, size)
    d = raw[..., d_at : d_at + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor.tensor_type == Q.Q6_K:
        sub = raw[..., Q6_K_SCALES].copy().view(np.int8).astype(np.float32)
        return (d[..., None] * sub).reshape(rows, -1)
    return d


def exact_int8(tensor: GGUFTensor, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(values INT8 [out, in], scales float32 [out, in / block]) with values · scales equal to
    the dequantized tensor, value for value, as TensorRT's Dequantize computes it."""
    block = EXACT[tensor.tensor_type][0]
    w = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
    signed = block_scales(tensor, shape[0])
    scale = np.abs(signed)
    scale[scale == 0] = 1.0  # an all-zero block: any positive scale, values 0
    per_value = np.repeat(scale, block, axis=1)
    values = np.rint(w / per_value)
    if np.abs(values).max() > 127 or not np.array_equal(values * per_value, w):
        raise WeightsError(
            f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}) is not the integer multiple "
            "of its block scales that its type promises; the file is damaged."
        )
    return values.astype(np.int8), scale


def not_a_gguf_file(model: str | Path) -> WeightsError:
    """The refusal of --quant from-gguf for a source that is no GGUF file (tools.build's
    `GGUFQuantized.open`, tools.eval before any network runs)."""
    return WeightsError(
        f"--quant from-gguf keeps a GGUF file's own quantization, but {model} is not a "
        "GGUF file; pass a .gguf file (or a folder holding one), or choose another --quant."
    )


class GGUFQuantized:
    """A converted GGUF checkpoint that also hands out, for each linear weight whose GGUF type
    TensorRT expresses exactly, the file's own INT8 values and block scales."""

    def __init__(self, ckpt: Checkpoint, gguf: GGUFFile):
        self.ckpt, self.config, self.gguf = ckpt, ckpt.config, gguf
        self.tensors = {}
        for t in gguf.tensors:
            name = hf_tensor_name(t.name, gguf.family)
            if name is not None and name.endswith("_proj.weight"):
                self.tensors[name.removeprefix("model.")] = t

    @classmethod
    def open(cls, ckpt: Checkpoint, model: str | Path, cache_dir: Path) -> GGUFQuantized:
        """`ckpt` (converted from the GGUF file `model` names) with that file's quantization."""
        return cls(ckpt, open_gguf(cls.source(ckpt, model, cache_dir)))

    @staticmethod
    def source(ckpt: Checkpoint, model: str | Path, cache_dir: Path) -> Path:
        """The GGUF file `model` names, refused unless `ckpt` is what it converts to now (an
        edited file converts to another folder). Reads nothing: reading a large vocabulary
        takes seconds, which a build that is reused need not spend."""
        path = Path(model).expanduser()
        if str(model) == BUNDLED and not path.exists():  # converted from a GGUF, not into gguf/
            from .bundled import bundled_gguf_path

            gguf = bundled_gguf_path(cache_dir)
            raise WeightsError(
                f"--quant from-gguf takes a GGUF file, and {BUNDLED} names the folder converted "
                f"from one; pass that file instead ({gguf}: python -m tools.build {gguf} "
                "--quant from-gguf), which is converted once more, into $TRT_NETDEF_CACHE/gguf/."
            )
        if not is_gguf_source(path):
            raise not_a_gguf_file(model)
        source = find_gguf(path).resolve()
        if converted_path(source, cache_dir) != Path(ckpt.model_dir):
            raise WeightsError(
                f"{model} has changed since {ckpt.model_dir} was converted from it; build it again."
            )
        return source

    def tensor(self, name: str) -> np.ndarray:
        return self.ckpt.tensor(name)

    def release(self, name: str) -> None:
        self.ckpt.release(name)

    def quantized(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(INT8 values, float32 scales) of linear weight `name`, or None if its type has no
        exact TensorRT form (it is then built unquantized)."""
        t = self.tensors.get(name)
        if t is None or t.tensor_type not in EXACT:
            return None
        shape = self.config.tensor_shapes()[name]
        values, scales = exact_int8(t, shape)
        if self.gguf.family.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
            values, scales = unpermute_qk(values, heads), unpermute_qk(scales, heads)
        return values, scales
