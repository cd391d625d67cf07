"""Quantized networks: weight quantization, the networks it gives, calibration, builds, errors,
and the accuracy of each mode on the real Gemma-3-270M.

Tiny models come from `tests/fixtures/tiny_quant.py` (128 inputs wide, with a tokenizer).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from netdef import NetworkOptions, OptionsError, build_engine, build_network, load_backend
from netdef.artifact import read_metadata
from netdef.options import check_quant_target
from netdef.quant import (
    CALIBRATION_TEXT,
    FP8,
    INT4,
    QuantizedWeight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from runtime.calibration import activation_amax
from runtime.cpu import CpuBackend
from runtime.reference import Executor, ExecutorError
from runtime.tokenizer import Tokenizer
from tests.fixtures.tiny_quant import tiny_quant_dir
from tools import build as build_tool
from tools import eval as eval_tool
from tools import inspect as inspect_tool
from tools.logits import sequence_logits
from weights import Checkpoint

trt = load_backend("tensorrt_rtx")
BF16 = np.dtype(ml_dtypes.bfloat16)
rng = np.random.default_rng(0)
MOBY_DICK = CALIBRATION_TEXT.parents[2] / "tests" / "data" / "moby_dick_loomings.txt"


# Weight quantization, against loops written from TensorRT's formulas -----------------------------
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


# The networks ------------------------------------------------------------------------------------
class Dequantized:
    """A checkpoint whose linear weights are replaced by what a quantized network computes with."""

    def __init__(self, ckpt: Checkpoint, mode: str, head: bool):
        self.ckpt, self.mode, self.config = ckpt, mode, ckpt.config
        self.head = "embed_tokens.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight"
        self.quantized = lambda name: name.endswith("_proj.weight") or (head and name == self.head)

    def tensor(self, name: str) -> np.ndarray:
        w = self.ckpt.tensor(name)
        return quantize_weight(w, self.mode).dequantized() if self.quantized(name) else w


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


def test_calibration_amax_is_the_largest_linear_input_over_every_chunk():
    """Chunked prefill through the KV cache sees what one call over the whole text sees."""
    ckpt = Checkpoint.open(tiny_quant_dir("gemma3"))
    ids = rng.integers(0, 512, 40).tolist()
    chunked = activation_amax(ckpt, ids, "float32", chunk=7, trt=trt)
    whole = activation_amax(ckpt, ids, "float32", chunk=40, trt=trt)
    assert chunked.keys() == whole.keys()
    for layer in whole:
        assert chunked[layer] == pytest.approx(whole[layer], rel=1e-5)


def test_executor_returns_intermediate_tensors_by_name():
    ckpt = Checkpoint.open(tiny_quant_dir("llama"))
    dn = build_network(ckpt, NetworkOptions(dtype="float32", max_seq_len=8), trt)
    model = CpuBackend(dn)
    model.reset(1)
    feeds = model.feeds(
        np.array([[5, 6, 7]], np.int32), np.array([[0, 1, 2]], np.int32), np.array([2], np.int32)
    )
    tensor = dn.graph.linear_inputs["layers.0.qkv_proj"]
    out = Executor.for_network(dn).run(feeds, extra=[tensor])
    assert out[tensor].shape == (1, 3, 128) and "logits" in out
    with pytest.raises(ExecutorError, match="no tensor named 'nope'"):
        Executor.for_network(dn).run(feeds, extra=["nope"])


# Builds ------------------------------------------------------------------------------------------
def build(args, capsys):
    code = build_tool.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("family", "flags"),
    [
        ("llama", ["--quant", "int8-wo", "--quant-lm-head"]),
        ("gemma3", ["--quant", "int4-wo", "--quant-lm-head"]),
        ("gemma3", ["--quant", "fp8"]),
    ],
)
def test_each_mode_builds_for_sm89(family, flags, tmp_path, capsys):
    out_dir = tmp_path / "artifact"
    args = [str(tiny_quant_dir(family)), "--target", "sm89", "--max-seq-len", "64"]
    code, _, err = build([*args, *flags, "--output", str(out_dir)], capsys)
    assert code == 0, err
    meta = read_metadata(out_dir)
    assert meta["options"]["quant"] == flags[1]
    assert meta["options"]["quant_lm_head"] == ("--quant-lm-head" in flags)
    assert f", {flags[1]}, " in err  # "Building the engine for sm89 (bfloat16, int8-wo, ...)"
    assert inspect_tool.main([str(out_dir)]) == 0
    described = {
        "int8-wo": "int8-wo (LM head too)",
        "int4-wo": "int4-wo (LM head too)",
        "fp8": f"fp8, activations calibrated on 256 tokens of {CALIBRATION_TEXT}",
    }[flags[1]]
    assert f"\nquant      {described}\n" in capsys.readouterr().out
    if flags[1] == "fp8":
        assert "Calibrating FP8 activation ranges on" in err
        assert meta["calibration"]["file"] == str(CALIBRATION_TEXT)
        assert meta["calibration"]["tokens"] == 256  # the fixture's context
        assert len(meta["calibration"]["sha256"]) == 64
    else:
        assert meta["calibration"] is None


def test_fp8_calibration_file_is_part_of_the_build_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.txt"
    other.write_text(MOBY_DICK.read_text()[:3000])
    args = [
        str(tiny_quant_dir("llama")),
        "--target",
        "sm89",
        "--max-seq-len",
        "32",
        "--quant",
        "fp8",
        "--quiet",
    ]
    code, first, _ = build(args, capsys)
    code2, second, _ = build([*args, "--calib-file", str(other)], capsys)
    assert code == code2 == 0 and first != second
    assert read_metadata(second.strip())["calibration"]["file"] == str(other)


def test_eval_takes_an_artifact_and_compares_what_it_was_built_with(tmp_path, capsys):
    folder = tiny_quant_dir("llama")
    quantized, plain = tmp_path / "int8", tmp_path / "plain"
    args = [str(folder), "--target", "sm89", "--max-seq-len", "64", "--quiet"]
    assert build([*args, "--quant", "int8-wo", "--output", str(quantized)], capsys)[0] == 0
    assert build([*args, "--dtype", "float32", "--output", str(plain)], capsys)[0] == 0
    text = ["--text", str(MOBY_DICK), "--max-tokens", "48", "--json"]
    assert eval_tool.main([str(quantized), *text]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dtype"], set(report["modes"]), report["tokens"]) == (
        "bfloat16",
        {"int8-wo"},
        48,
    )
    assert report["modes"]["int8-wo"]["top1_agreement"] >= 0.9
    assert eval_tool.main([str(plain), *text]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {plain} is not quantized; nothing to compare it with."
    )


# Refusals, with their exact messages -------------------------------------------------------------
def test_fp8_for_a_target_without_fp8_is_refused_before_any_build_work(tmp_path, capsys):
    """The model is not even looked at: the folder does not exist."""
    code, _, err = build([str(tmp_path / "absent"), "--target", "sm80", "--quant", "fp8"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: fp8 needs FP8 matrix multiplies, which TensorRT-RTX has on compute capability 8.9 "
        "and newer (sm89, sm120, sm121); target sm80 has none. Choose int8-wo or int4-wo for it."
    )
    for target in ("sm75", "sm86", "8.6"):
        with pytest.raises(OptionsError, match=f"target {target} has none"):
            check_quant_target("fp8", target)
    for target in ("sm89", "sm120", "sm121"):
        check_quant_target("fp8", target)


def test_calibration_file_errors(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    args = [
        str(tiny_quant_dir("llama")),
        "--target",
        "sm89",
        "--quant",
        "fp8",
        "--calib-file",
        str(missing),
    ]
    code, _, err = build(args, capsys)
    assert code == 1
    assert err.strip() == f"error: calibration text {missing} does not exist (--calib-file)."
    code, _, err = build([*args[:4], "int8-wo", *args[5:]], capsys)
    assert code == 1
    assert err.strip() == "error: --calib-file applies to --quant fp8 only."


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        (
            "llama",
            NetworkOptions(quant="int3"),
            "quant 'int3' is not supported; choose none, int8-wo, int4-wo or fp8.",
        ),
        (
            "llama",
            NetworkOptions(quant_lm_head=True),
            "quant_lm_head needs a quantization mode (--quant).",
        ),
        (
            "gemma3",
            NetworkOptions(quant="int8-wo", quant_lm_head=True),
            "quant_lm_head with int8-wo needs an untied LM head: this model's head is its "
            "embedding table, which TensorRT keeps in the model dtype for the embedding lookup. "
            "Use int4-wo, or leave the LM head unquantized.",
        ),
        (
            "llama",
            NetworkOptions(quant="fp8"),
            "fp8 needs activation ranges from a calibration pass "
            "(runtime.calibration.activation_amax).",
        ),
    ],
)
def test_bad_quantization_options(model, options, message):
    ckpt = Checkpoint.open(tiny_quant_dir(model))
    with pytest.raises(OptionsError) as err:
        build_network(ckpt, NetworkOptions(**{**options.__dict__, "max_seq_len": 32}), trt)
    assert str(err.value) == message


def test_int4_needs_input_dimensions_of_whole_blocks(tiny_dir, capsys):
    """The 64-wide tiny Llama: its first quantized weight is named, with its shape."""
    code, _, err = build([str(tiny_dir("llama")), "--target", "sm89", "--quant", "int4-wo"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: int4-wo quantizes weights in blocks of 128 inputs, but "
        "layers.0.self_attn.q_proj.weight has shape [64, 64], whose input dimension 64 is not "
        "a multiple of 128; choose int8-wo or fp8."
    )


# Accuracy on the real Gemma-3-270M ---------------------------------------------------------------
@pytest.mark.slow
def test_gemma270m_quantized_accuracy(gemma3_270m_dir, capsys):
    """Over 320 tokens of Moby-Dick against the bfloat16 network (fp8 calibrated on 256 tokens
    of the shipped text). Measured: int8-wo 98.4% top-1 agreement, perplexity +0.4%; fp8
    91.5%, +0.8%; int4-wo 52.7%, 2.0x. This checkpoint is the bundled Q4_K_M GGUF
    dequantized: its weights already sit on another 4-bit grid (asymmetric, blocks of 32)
    that symmetric INT4 in blocks of 128 represents poorly, hence int4's loose bounds."""
    tok = Tokenizer.from_dir(gemma3_270m_dir)
    ids = tok.encode(MOBY_DICK.read_text())[:320]
    calib = tok.encode(CALIBRATION_TEXT.read_text())[:256]
    result = eval_tool.evaluate(
        Checkpoint.open(gemma3_270m_dir),
        ids,
        ["int8-wo", "fp8", "int4-wo"],
        calib_ids=calib,
        trt=trt,
    )
    ref = result["reference"]["perplexity"]
    modes = result["modes"]
    assert 20 < ref < 200
    assert modes["int8-wo"]["top1_agreement"] >= 0.97
    assert modes["int8-wo"]["perplexity"] <= 1.02 * ref
    assert modes["fp8"]["top1_agreement"] >= 0.85
    assert modes["fp8"]["perplexity"] <= 1.05 * ref
    assert modes["int4-wo"]["top1_agreement"] >= 0.45
    assert modes["int4-wo"]["perplexity"] <= 2.5 * ref
    # The command-line tool prints the same figures as a table and as JSON.
    args = [
        str(gemma3_270m_dir),
        "--text",
        str(MOBY_DICK),
        "--max-tokens",
        "40",
        "--quant",
        "int8-wo",
    ]
    assert eval_tool.main(args) == 0
    table = capsys.readouterr().out
    assert "40 tokens, bfloat16 reference" in table and "int8-wo" in table
    assert eval_tool.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 40 and set(report["modes"]) == {"int8-wo"}


@pytest.mark.slow
def test_gemma270m_engines_shrink(gemma3_270m_dir, tmp_path):
    """sm89 engines of the 268M parameters, 168M of them the tied embedding table, which stays
    bfloat16 unless the LM head is quantized (then INT4 too). Measured at max_seq_len 1024:
    bf16 552.8 MB; int8-wo 453.7 MB, whose weights beside the table take 0.54x of bf16's;
    int4-wo with the head 155.7 MB (1/3.55)."""
    ckpt = Checkpoint.open(gemma3_270m_dir)
    table = ckpt.config.vocab_size * ckpt.config.hidden_size * 2
    sizes = {}
    for mode, head in (("none", False), ("int8-wo", False), ("int4-wo", True)):
        options = NetworkOptions(max_seq_len=512, quant=mode, quant_lm_head=head)
        path = tmp_path / f"{mode}.engine"
        sizes[mode] = build_engine(build_network(ckpt, options, trt), path, target="sm89")
        path.unlink()
    assert sizes["int8-wo"] - table < 0.6 * (sizes["none"] - table)
    assert sizes["int4-wo"] < 0.3 * sizes["none"]


def test_dequantized_weight_matches_the_stored_values_times_scale():
    q = QuantizedWeight(np.array([[1, -2], [3, 4]], np.int8), np.array([0.5, 2.0], BF16))
    np.testing.assert_array_equal(q.dequantized().astype(np.float32), [[0.5, -1.0], [6.0, 8.0]])
