"""Quantization in the network: the weight formulas (against loops written from TensorRT's),
the networks they give on the executor, the option checks, and engine sizes.

Tiny models come from `tests/fixtures/tiny_quant.py` (128 inputs wide, with a tokenizer).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from netdef import NetworkOptions, OptionsError, build_engine, build_network, load_tensorrt
from netdef.quant import (
    CALIBRATION_TEXT,
    FP8,
    INT4,
    QuantizedWeight,
    int4_block,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from runtime.calibration import activation_amax
from runtime.cpu import CpuBackend, sequence_logits
from runtime.tokenizer import Tokenizer
from tests.fixtures.tiny_quant import tiny_quant_dir
from weights import Checkpoint, parse_config

trt = load_tensorrt("tensorrt_rtx")
BF16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)


def bf16(v: float) -> float:
    return float(np.array(v, np.float32).astype(BF16))


def test_int8_weights_per_output_channel():
    w = (rng.standard_normal((3, 8)) * [[1.0], [0.01], [30.0]]).astype(BF16)
    w[1, 3] = 0.0
    q = quantize_weight(w, "int8-wo")
    assert q.values.dtype == np.int8 and q.scale.dtype == BF16 and q.scale.shape == (3,)
    for i in range(3):
        s = bf16(max(abs(float(v)) for v in w[i]) / 127)
        assert float(q.scale[i]) == s
        expected = [round(max(-128, min(127, float(v) / s))) for v in w[i]]
        assert q.values[i].tolist() == expected
    assert np.abs(q.values).max() == 127


def test_int4_weights_per_block_of_128_inputs():
    w = rng.standard_normal((2, 256)).astype(np.float32)
    w[1, 128:] = 0.0  # an all-zero block: scale 1, values 0
    q = quantize_weight(w, "int4-wo")
    assert q.values.dtype == INT4 and q.scale.shape == (2, 2)
    for i in range(2):
        for b in range(2):
            block = [float(v) for v in w[i, 128 * b : 128 * (b + 1)]]
            s = max(abs(v) for v in block) / 7 or 1.0
            assert float(q.scale[i, b]) == np.float32(s)
            expected = [round(max(-8, min(7, v / s))) for v in block]
            assert q.values[i, 128 * b : 128 * (b + 1)].astype(np.int8).tolist() == expected


def test_fp8_weights_per_tensor():
    w = rng.standard_normal((4, 16)).astype(BF16)
    q = quantize_weight(w, "fp8")
    s = bf16(np.abs(w.astype(np.float32)).max() / 448)
    assert q.values.dtype == FP8 and q.scale.shape == () and float(q.scale) == s
    assert np.abs(q.values.astype(np.float32)).max() == 448
    deq = q.dequantized()
    assert deq.dtype == BF16
    np.testing.assert_allclose(deq.astype(np.float32), w.astype(np.float32), rtol=1 / 16)


def test_int4_packing_puts_the_first_value_in_the_low_nibble():
    values = np.array([1, -2, 7, -8, 3], INT4)
    packed = pack_int4(values)
    assert packed.tolist() == [0xE1, 0x87, 0x03]  # (1, -2), (7, -8), (3, pad 0)
    np.testing.assert_array_equal(unpack_int4(packed, 5).astype(np.int8), [1, -2, 7, -8, 3])


class Dequantized:
    """A checkpoint whose linear weights are replaced by what a quantized network computes with."""

    def __init__(self, ckpt: Checkpoint, mode: str, head: bool, block: int = 128):
        self.ckpt, self.mode, self.config, self.block = ckpt, mode, ckpt.config, block
        self.head = "embed_tokens.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight"
        self.quantized = lambda name: name.endswith("_proj.weight") or (head and name == self.head)

    def tensor(self, name: str) -> np.ndarray:
        w = self.ckpt.tensor(name)
        q = quantize_weight(w, self.mode, self.block) if self.quantized(name) else None
        return w if q is None else q.dequantized()


@pytest.mark.parametrize(
    ("family", "mode", "head"),
    [
        ("llama", "int8-wo", False),
        ("llama", "int8-wo", True),  # untied LM head
        ("llama", "int4-wo", True),
        ("gemma3", "int4-wo", False),
        ("gemma3", "int4-wo", True),  # tied: the embedding table is quantized with the head
    ],
)
def test_weight_only_network_computes_with_the_dequantized_weights(family, mode, head):
    """Bit for bit the unquantized network of the dequantized checkpoint: the Dequantize
    layers sit in front of the right matmuls, with the right axis and block scales."""
    ckpt = Checkpoint.open(tiny_quant_dir(family))
    seq = rng.integers(0, 512, 14).tolist()
    options = NetworkOptions(dtype="bfloat16", max_seq_len=16, max_prefill=6, all_logits=True)
    quant = NetworkOptions(**{**options.__dict__, "quant": mode, "quant_lm_head": head})
    dn = build_network(ckpt, quant, trt)
    ours = sequence_logits(CpuBackend(dn), [seq], 6)
    ref = sequence_logits(
        CpuBackend(build_network(Dequantized(ckpt, mode, head), options, trt)), [seq], 6
    )
    np.testing.assert_array_equal(ours, ref)
    kinds = [dn.network.get_layer(i).type for i in range(dn.network.num_layers)]
    linears = 4 * ckpt.config.num_layers + head  # qkv, o, gate/up, down (+ head)
    assert kinds.count(trt.LayerType.DEQUANTIZE) == linears
    assert trt.LayerType.QUANTIZE not in kinds  # weight-only: activations stay as they are


def test_fp8_network_quantizes_each_linear_input_with_its_calibrated_scale():
    ckpt = Checkpoint.open(tiny_quant_dir("llama"))
    ids = Tokenizer.from_dir(tiny_quant_dir("llama")).encode(CALIBRATION_TEXT.read_text())
    amax = activation_amax(ckpt, ids[:64], "bfloat16", chunk=16, trt=trt)
    n = ckpt.config.num_layers
    assert set(amax) == {
        f"layers.{i}.{name}"
        for i in range(n)
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    } | {"lm_head"}
    assert all(v > 0 for v in amax.values())
    dn = build_network(ckpt, NetworkOptions(max_seq_len=32, quant="fp8"), trt, act_amax=amax)
    scales = {
        k.removesuffix(".input_scale"): v
        for k, v in dn.graph.constants.items()
        if k.endswith(".input_scale")
    }
    assert scales.keys() == amax.keys() - {"lm_head"}  # the head stays unquantized
    for layer, scale in scales.items():
        assert scale.dtype == BF16 and scale.shape == ()
        assert float(scale) == bf16(amax[layer] / 448)
    kinds = [dn.network.get_layer(i).type for i in range(dn.network.num_layers)]
    assert kinds.count(trt.LayerType.QUANTIZE) == 4 * n
    assert kinds.count(trt.LayerType.DEQUANTIZE) == 8 * n  # activations and weights


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        (
            "llama",
            dict(quant="int3"),
            "quant 'int3' is not supported; choose none, int8-wo, int4-wo, fp8 or from-gguf.",
        ),
        (
            "llama",
            dict(quant_lm_head=True),
            "quant_lm_head needs a quantization mode (--quant).",
        ),
        (
            "gemma3",
            dict(quant="int8-wo", quant_lm_head=True),
            "quant_lm_head with int8-wo needs an untied LM head: this model's head is its "
            "embedding table, which TensorRT keeps in the model dtype for the embedding lookup. "
            "Use int4-wo, or leave the LM head unquantized.",
        ),
        (
            "llama",
            dict(quant="fp8"),
            "fp8 needs activation ranges from a calibration pass "
            "(runtime.calibration.activation_amax).",
        ),
    ],
)
def test_bad_quantization_options(model, options, message):
    ckpt = Checkpoint.open(tiny_quant_dir(model))
    with pytest.raises(OptionsError) as err:
        build_network(ckpt, NetworkOptions(**{**options, "max_seq_len": 32}), trt)
    assert str(err.value) == message


def test_int4_network_computes_with_blocks_of_64_where_128_does_not_divide(tiny_dir):
    """The 64-wide tiny Llama (a hidden size no multiple of 128, like 576) quantizes in blocks
    of 64, and computes with exactly those blocks' dequantized weights."""
    ckpt = Checkpoint.open(tiny_dir("llama"))
    options = NetworkOptions(dtype="bfloat16", max_seq_len=16, max_prefill=6, all_logits=True)
    dn = build_network(ckpt, NetworkOptions(**{**options.__dict__, "quant": "int4-wo"}), trt)
    scales = {k: v.shape for k, v in dn.graph.constants.items() if k.endswith("weight_scale")}
    assert scales["layers.0.qkv_proj.weight_scale"] == (1, 96, 1)  # [1, q + k + v, in / 64]
    assert scales["layers.0.down_proj.weight_scale"] == (1, 64, 2)  # 128 inputs: 2 blocks
    seq = rng.integers(0, 512, 14).tolist()
    blocked = Dequantized(ckpt, "int4-wo", head=False, block=64)
    ref = sequence_logits(CpuBackend(build_network(blocked, options, trt)), [seq], 6)
    np.testing.assert_array_equal(sequence_logits(CpuBackend(dn), [seq], 6), ref)


def test_int4_block_is_the_largest_that_divides_every_input():
    assert [int4_block(sizes) for sizes in ([1152, 6912], [576, 1536], [96, 256], [80])] == [
        128,
        64,
        32,
        None,
    ]


def test_int4_needs_input_dimensions_of_whole_blocks(tiny_dir):
    """A hidden size of 80 is a multiple of no block: its first quantized weight is named."""
    raw = json.loads((tiny_dir("llama") / "config.json").read_text())
    config = parse_config({**raw, "hidden_size": 80, "num_attention_heads": 5})
    with pytest.raises(OptionsError) as err:
        NetworkOptions(quant="int4-wo", max_seq_len=32).validate(config)
    assert str(err.value) == (
        "int4-wo quantizes weights in blocks of 128, 64, 32 inputs, but "
        "layers.0.self_attn.q_proj.weight has 80 inputs, a multiple of none of them; choose "
        "int8-wo or fp8."
    )


@pytest.mark.slow
def test_gemma270m_engines_shrink(gemma3_270m_dir, tmp_path):
    """sm89 engines of the 268M parameters, 168M of them the tied embedding table, which stays
    bfloat16 unless the LM head is quantized (then INT4 too). Measured at max_seq_len 1024:
    bf16 552.8 MB; int8-wo 453.7 MB, whose weights beside the table take 0.54x of bf16's;
    int4-wo with the head 155.7 MB (1/3.55). At max_seq_len 512 (three profiles' kernels,
    which do not shrink): bf16 567.0 MB, int4-wo 170.3 MB (0.300x)."""
    ckpt = Checkpoint.open(gemma3_270m_dir)
    table = ckpt.config.vocab_size * ckpt.config.hidden_size * 2
    sizes = {}
    for mode, head in (("none", False), ("int8-wo", False), ("int4-wo", True)):
        options = NetworkOptions(max_seq_len=512, quant=mode, quant_lm_head=head)
        path = tmp_path / f"{mode}.engine"
        sizes[mode] = build_engine(build_network(ckpt, options, trt), path, target="sm89")
        path.unlink()
    assert sizes["int8-wo"] - table < 0.6 * (sizes["none"] - table)
    assert sizes["int4-wo"] < 0.31 * sizes["none"]


def test_dequantized_weight_matches_the_stored_values_times_scale():
    q = QuantizedWeight(np.array([[1, -2], [3, 4]], np.int8), np.array([0.5, 2.0], BF16))
    np.testing.assert_array_equal(q.dequantized().astype(np.float32), [[0.5, -1.0], [6.0, 8.0]])
