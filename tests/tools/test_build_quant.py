"""python -m tools.build with --quant: each mode builds, fp8 calibration is part of the build
key, and the refusals with their exact messages."""

from __future__ import annotations

import numpy as np
import pytest

from netdef import OptionsError, build_network
from netdef.artifact import open_artifact, read_metadata
from netdef.contract import LOGITS
from netdef.options import check_quant_target
from netdef.quant import (
    CALIBRATION_TEXT,
)
from runtime.calibration import activation_amax, calibration_ids
from runtime.cpu import CpuBackend
from runtime.readout import ALL_LOGITS
from tests.fixtures.tiny_quant import tiny_quant_dir
from tools import build as build_tool
from tools import generate as generate_tool
from tools import inspect as inspect_tool
from tools.generate import open_backend
from weights import Checkpoint

MOBY_DICK = CALIBRATION_TEXT.parents[2] / "tests" / "data" / "moby_dick_loomings.txt"


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
        "int4-wo": "int4-wo, blocks of 128 inputs (LM head too)",
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
    monkeypatch.chdir(tmp_path)  # recorded as the absolute path: tools.eval reads it anywhere
    code2, second, _ = build([*args, "--calib-file", other.name], capsys)
    assert code == code2 == 0 and first != second
    assert read_metadata(second.strip())["calibration"]["file"] == str(other)


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


def test_int4_block_fallback_is_recorded_and_shown(tiny_dir, tmp_path, capsys):
    """The 64-wide tiny Llama builds with int4-wo in blocks of 64: metadata.json records the
    block, tools.inspect shows it (the network side: tests/netdef/test_quant.py)."""
    out_dir = tmp_path / "artifact"
    args = [str(tiny_dir("llama")), "--target", "sm89", "--max-seq-len", "32"]
    code, _, err = build([*args, "--quant", "int4-wo", "--output", str(out_dir)], capsys)
    assert code == 0, err
    assert read_metadata(out_dir)["int4_block"] == 64
    assert inspect_tool.main([str(out_dir)]) == 0
    assert "\nquant      int4-wo, blocks of 64 inputs\n" in capsys.readouterr().out


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


def test_an_fp8_artifact_runs_on_the_cpu_with_its_ranges_measured_again(tmp_path, capsys):
    model = tiny_quant_dir("gemma3")
    text = tmp_path / "calib.txt"
    text.write_text(MOBY_DICK.read_text()[:2000])
    artifact = tmp_path / "artifact"
    args = [str(model), "--target", "sm89", "--max-seq-len", "64", "--quant", "fp8", "--quiet"]
    code, _, err = build([*args, "--calib-file", str(text), "--output", str(artifact)], capsys)
    assert code == 0, err
    meta = open_artifact(artifact)
    # The executor's fp8 network has the ranges the build measured on that text.
    backend = open_backend(artifact, meta, "reference", None, None)
    amax = activation_amax(Checkpoint.open(model), calibration_ids(model, text), "bfloat16")
    direct = CpuBackend(build_network(Checkpoint.open(model), backend.dn.options, act_amax=amax))
    call = (np.array([[2, 17, 99, 4]], np.int32), np.arange(4, dtype=np.int32)[None])
    logits = []
    for cpu in (backend, direct):
        cpu.reset(1)
        logits.append(cpu.forward(*call, np.array([3], np.int32), ALL_LOGITS)[LOGITS])
    np.testing.assert_array_equal(logits[0], logits[1])
    assert "Calibrating FP8 activation ranges on" in capsys.readouterr().err
    # A calibration text changed since the build is refused: the ranges would differ.
    text.write_text("Call me Ishmael.")
    assert generate_tool.main([str(artifact), "--backend", "reference", "--prompt", "x"]) == 1
    assert capsys.readouterr().err.endswith(
        f"\nerror: --backend reference measures the fp8 activation ranges of {artifact} again on "
        f"its calibration text {text}, which changed after the build; rebuild the artifact with "
        "python -m tools.build --force, or run the engine on a GPU (--backend tensorrt).\n"
    )
