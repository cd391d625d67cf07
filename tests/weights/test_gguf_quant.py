"""`--quant from-gguf`: GGUF blocks kept as TensorRT INT8 blocks where that is exact.

The claim is value-for-value equality: the INT8 values times the float32 block scales the
network's Dequantize layers hold are the file's dequantized weights, so a float32 network
built that way equals the unquantized float32 network of the same file.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from netdef import NetworkOptions, OptionsError, build_network, load_tensorrt
from netdef.artifact import check_intact
from runtime.cpu import CpuBackend, sequence_logits
from tests.fixtures.tiny import tiny_model_dir
from tests.fixtures.tiny_gguf import ALL_Q8_0, _k_quant, write_gguf
from tools import build as build_tool
from tools import generate as generate_tool
from tools import inspect as inspect_tool
from weights import Checkpoint, WeightsError
from weights.gguf_import import convert_gguf, gguf_model_dir, open_gguf
from weights.gguf_quant import EXACT, GGUFQuantized, exact_int8

trt = load_tensorrt("tensorrt_rtx")
rng = np.random.default_rng(0)


def reader_tensor(tmp_path, data: np.ndarray, qtype: Q):
    path = tmp_path / f"{qtype.name}.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).tensors[0]


@pytest.mark.parametrize("qtype", list(EXACT))
def test_exact_types_are_int8_times_positive_block_scales(qtype, tmp_path):
    rows, cols = 8, 512
    if qtype == Q.Q6_K:
        data = _k_quant(rng, rows, cols, qtype)
    else:
        data = quantize(rng.normal(0, 1, (rows, cols)).astype(np.float32), qtype)
    tensor = reader_tensor(tmp_path, data, qtype)
    values, scales = exact_int8(tensor, (rows, cols))
    block = EXACT[qtype][0]
    assert values.dtype == np.int8 and scales.dtype == np.float32
    assert scales.shape == (rows, cols // block) and (scales > 0).all()
    w = dequantize(tensor.data, qtype).reshape(rows, cols)
    np.testing.assert_array_equal(values * np.repeat(scales, block, axis=1), w)
    if qtype == Q.Q4_0:  # why not INT4: blocks whose extreme is positive need the level +8
        assert values.max() == 8


def test_from_gguf_network_equals_the_float32_network_of_the_file(tmp_path):
    """All-Q8_0 tiny Llama (q/k rows permuted by llama.cpp): every linear layer keeps the
    file's blocks, and the float32 network equals the one built from float32 weights."""
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "q8.gguf", "llama", ALL_Q8_0)
    plain = Checkpoint.open(convert_gguf(path, tmp_path / "f32", "float32", progress=False))
    source = GGUFQuantized(plain, open_gguf(path))  # the rest (embedding, norms) in float32 too
    options = NetworkOptions(dtype="float32", max_seq_len=16, max_prefill=6, all_logits=True)
    dn = build_network(source, NetworkOptions(**{**options.__dict__, "quant": "from-gguf"}), trt)
    assert len(dn.graph.kept) == 4 * 3  # qkv, o, gate_up, down of 3 layers
    scale = dn.graph.constants["layers.0.qkv_proj.weight_scale"]
    assert scale.dtype == np.float32 and scale.shape == (1, 96, 64 // 32)  # [1, out, in / 32]
    seq = rng.integers(0, 512, 14).tolist()
    ours = sequence_logits(CpuBackend(dn), [seq], 6)
    ref = sequence_logits(CpuBackend(build_network(plain, options, trt)), [seq], 6)
    np.testing.assert_array_equal(ours, ref)


def test_only_layers_whose_every_part_is_exact_are_kept(tmp_path):
    """The mixed tiny Llama: q/k/v are Q4_0, Q8_0, Q4_1 (Q4_1 has a minimum: not exact), gate
    BF16: only each layer's Q8_0 down_proj keeps its blocks."""
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "mixed.gguf", "llama")
    folder = gguf_model_dir(path, tmp_path / "cache", progress=False)
    source = GGUFQuantized.open(Checkpoint.open(folder), path, tmp_path / "cache")
    options = NetworkOptions(max_seq_len=16, quant="from-gguf")
    assert build_network(source, options, trt).graph.kept == [
        f"layers.{i}.down_proj" for i in range(3)
    ]


def test_build_cli_keeps_the_blocks(tmp_path, monkeypatch, capsys):
    """The real TensorRT-RTX builder takes INT8 blocks of 32 with float32 scales; the artifact
    says how many layers kept them, and its CPU backend runs the same network."""
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "q8.gguf", "llama", ALL_Q8_0)
    out = tmp_path / "artifact"
    args = [str(path), "--target", "sm89", "--max-seq-len", "32", "--quant", "from-gguf"]
    assert build_tool.main([*args, "--output", str(out), "--quiet"]) == 0
    meta = check_intact(out)
    assert meta.options["quant"] == "from-gguf"
    assert meta.from_gguf == {"file": str(path.resolve()), "kept": 12, "of": 12}
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 0
    shown = "\nquant      from-gguf (12 of 12 linear layers keep the file's blocks, as INT8)\n"
    assert shown in capsys.readouterr().out
    cpu = generate_tool.open_backend(out, meta, "reference", None, None)
    assert len(cpu.dn.graph.kept) == 12

    def unread(path):
        raise AssertionError(f"read {path}")  # 10 s for a real vocabulary

    monkeypatch.setattr("runtime.build.open_gguf", unread)  # an identical build: reused unread
    assert build_tool.main([*args, "--output", str(out)]) == 0
    assert capsys.readouterr().err.endswith(f"Reusing {out} (identical build; --force rebuilds).\n")


def test_from_gguf_needs_a_gguf_model(tmp_path, capsys):
    folder = tiny_model_dir("llama")
    args = [str(folder), "--target", "sm89", "--quant", "from-gguf", "--output", str(tmp_path)]
    assert build_tool.main(args) == 1
    assert capsys.readouterr().err == (
        f"error: --quant from-gguf keeps a GGUF file's own quantization, but {folder} is not a "
        "GGUF file; pass a .gguf file (or a folder holding one), or choose another --quant.\n"
    )
    with pytest.raises(OptionsError) as err:
        build_network(Checkpoint.open(folder), NetworkOptions(max_seq_len=8, quant="from-gguf"))
    assert str(err.value) == (
        "from-gguf needs the GGUF file's own quantization (weights.gguf_quant.GGUFQuantized), "
        "not a plain checkpoint."
    )
    with pytest.raises(OptionsError) as err:
        NetworkOptions(max_seq_len=8, quant="from-gguf", quant_lm_head=True).validate(
            Checkpoint.open(folder).config
        )
    assert str(err.value) == (
        "quant_lm_head does not apply to from-gguf, which keeps the GGUF quantization of the "
        "linear layers only (the embedding and LM head stay unquantized)."
    )


def test_from_gguf_of_the_bundled_model_names_its_gguf_file(tmp_path, monkeypatch, capsys):
    """The bundled model is a GGUF (README), but `--quant from-gguf` of `bundled` said
    "bundled is not a GGUF file; pass a .gguf file", without saying which."""
    gguf_file = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    monkeypatch.setattr("runtime.build.resolve_model", lambda *a, **k: tiny_model_dir("llama"))
    monkeypatch.setattr("weights.bundled.bundled_gguf_path", lambda cache_dir: gguf_file)
    args = ["bundled", "--target", "sm89", "--quant", "from-gguf", "--output", str(tmp_path)]
    assert build_tool.main(args) == 1
    assert capsys.readouterr().err == (
        "error: --quant from-gguf takes a GGUF file, and bundled names the folder converted "
        f"from one; pass that file instead ({gguf_file}: python -m tools.build {gguf_file} "
        "--quant from-gguf), which is converted once more, into $TRT_NETDEF_CACHE/gguf/.\n"
    )


def test_a_changed_gguf_is_refused(tmp_path):
    path = write_gguf(tiny_model_dir("qwen2"), tmp_path / "q.gguf", "qwen2", ALL_Q8_0)
    ckpt = Checkpoint.open(gguf_model_dir(path, tmp_path / "cache", progress=False))
    write_gguf(tiny_model_dir("qwen3"), path, "qwen3", ALL_Q8_0)  # another model, same name
    with pytest.raises(WeightsError) as err:
        GGUFQuantized.open(ckpt, path, tmp_path / "cache")
    assert str(err.value) == (
        f"{path} has changed since {ckpt.model_dir} was converted from it; build it again."
    )
