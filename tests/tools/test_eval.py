"""python -m tools.eval: quantized networks against the unquantized one, from an artifact or
a model folder, and the accuracy of each mode on the real Gemma-3-270M."""

from __future__ import annotations

import json

import numpy as np
import pytest

from netdef import NetworkOptions, build_network, load_tensorrt
from netdef.quant import (
    CALIBRATION_TEXT,
)
from runtime.cpu import CpuBackend
from runtime.tokenizer import Tokenizer
from tests.fixtures.tiny import tiny_model_dir
from tests.fixtures.tiny_gguf import ALL_Q8_0, write_gguf
from tests.fixtures.tiny_quant import tiny_quant_dir
from tools import build as build_tool
from tools import eval as eval_tool
from weights import Checkpoint

trt = load_tensorrt("tensorrt_rtx")
MOBY_DICK = CALIBRATION_TEXT.parents[2] / "tests" / "data" / "moby_dick_loomings.txt"


def build(args, capsys):
    code = build_tool.main(args)
    out, err = capsys.readouterr()
    return code, out, err


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
    # Other settings were silently replaced by the artifact's; the same ones are taken.
    assert eval_tool.main([str(quantized), *text, "--quant", "fp8", "--dtype", "float32"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {quantized} was built with --dtype bfloat16 --quant int8-wo, and tools.eval "
        "evaluates an artifact as built; drop --dtype float32 --quant fp8, or pass its model "
        f"folder {folder} to choose them."
    )
    assert eval_tool.main([str(quantized), *text, "--quant", "int8-wo", "--quant-lm-head"]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"and tools.eval evaluates an artifact as built; drop --quant-lm-head, or pass its model "
            f"folder {folder} to choose them."
        )
    )
    assert eval_tool.main([str(quantized), *text, "--quant", "int8-wo", "--dtype", "bfloat16"]) == 0
    assert set(json.loads(capsys.readouterr().out)["modes"]) == {"int8-wo"}
    for quant in ([], ["--quant", "int8-wo"]):  # --quant was not said to need the folder
        assert eval_tool.main([str(plain), *text, *quant]) == 1
        assert capsys.readouterr().err.strip() == (
            f"error: {plain} is not quantized, so there is nothing to compare it with; pass its "
            f"model folder {folder} to compare quantization modes (--quant)."
        )


def test_a_damaged_artifact_is_said_to_be_one(tmp_path, capsys):
    """An artifact that lost its engine was taken for a model folder: "has no
    model.safetensors ...; point to a Hugging Face folder with safetensors weights"."""
    artifact = tmp_path / "int8"
    args = [str(tiny_quant_dir("llama")), "--target", "sm89", "--max-seq-len", "64", "--quiet"]
    assert build([*args, "--quant", "int8-wo", "--output", str(artifact)], capsys)[0] == 0
    (artifact / "model.engine").unlink()
    assert eval_tool.main([str(artifact), "--text", str(MOBY_DICK), "--max-tokens", "8"]) == 1
    assert capsys.readouterr().err == (
        f"error: {artifact} has no model.engine; rebuild it with python -m tools.build --force.\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "-5"], "--max-tokens -5: evaluation needs at least two tokens."),
        (["--chunk", "0"], "--chunk 0 must be at least 1."),
        (["--text", "/no/such.txt"], "--text /no/such.txt: no such file."),
        (["--calib-file", "/no/calib.txt"], "--calib-file /no/calib.txt: no such file."),
    ],
)
def test_bad_arguments_are_refused_at_parse_time(flags, message, tmp_path, capsys):
    """--max-tokens -5 evaluated the text less its last five tokens; --chunk 0 was refused
    as max_prefill, a name the user never typed; a missing text file was an OSError's repr."""
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(tiny_quant_dir("llama")), "--text", str(MOBY_DICK), *flags])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"python -m tools.eval: error: {message}"
    )


def test_a_text_that_is_no_utf8_file_names_its_flag(tmp_path, capsys):
    """A folder was "no such file"; bytes that are not UTF-8 were the codec's message, which
    named neither the file nor the flag."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ishmael, né à Nantucket".encode("latin-1"))
    cases = [
        (["--text", str(tmp_path)], f"--text {tmp_path}: is a folder; pass a text file."),
        (
            ["--text", str(latin1)],
            f"--text {latin1}: not UTF-8 (byte 0xe9 at offset 10); save it as UTF-8.",
        ),
        (
            ["--text", str(MOBY_DICK), "--calib-file", str(latin1)],
            f"--calib-file {latin1}: not UTF-8 (byte 0xe9 at offset 10); save it as UTF-8.",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            eval_tool.main([str(tiny_quant_dir("llama")), *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"python -m tools.eval: error: {message}"


def test_an_empty_text_is_refused_naming_it(tmp_path, capsys):
    """An empty --text said only "evaluation needs at least two tokens.", naming neither the
    file nor what to do."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert eval_tool.main([str(tiny_quant_dir("llama")), "--text", str(empty)]) == 1
    assert capsys.readouterr().err == (
        f"error: --text {empty} is 0 token(s) long with the tokenizer's special tokens; "
        "evaluation needs at least two: pass a longer text.\n"
    )


def test_the_default_compares_every_mode_that_applies(capsys):
    """Every mode was run, from-gguf last, which a model folder cannot take: exit 1 after
    minutes of scoring, no table. from-gguf asked for on a model folder is refused before
    any network runs (no progress bar on stderr)."""
    model = str(tiny_quant_dir("llama"))
    text = ["--text", str(MOBY_DICK), "--max-tokens", "16"]
    assert eval_tool.main([model, *text, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["modes"]) == ["int8-wo", "int4-wo", "fp8"]
    assert eval_tool.main([model, *text, "--quant", "int8-wo", "--quant", "from-gguf"]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: --quant from-gguf keeps a GGUF file's own quantization, but {model} is not a "
        "GGUF file; pass a .gguf file (or a folder holding one), or choose another --quant.\n",
    )


def test_a_gguf_file_is_evaluated_with_its_own_blocks_too(tmp_path, monkeypatch, capsys):
    """from-gguf failed every way: the .gguf file had no tokenizer.json, its converted folder
    and a from-gguf artifact were plain checkpoints. The file is converted as tools.build
    converts it, and from-gguf runs on its blocks (all Q8_0: no token changes)."""
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tiny_model_dir("llama"), tmp_path / "q8.gguf", "llama", ALL_Q8_0)
    text = ["--text", str(MOBY_DICK), "--max-tokens", "16", "--json"]
    assert eval_tool.main([str(gguf), *text]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["modes"]) == ["int8-wo", "int4-wo", "fp8", "from-gguf"]
    assert report["modes"]["from-gguf"]["top1_agreement"] == 1.0
    # --quant-lm-head leaves from-gguf (whose LM head stays unquantized) out of the default.
    assert eval_tool.main([str(gguf), *text, "--quant-lm-head"]) == 0
    assert list(json.loads(capsys.readouterr().out)["modes"]) == ["int8-wo", "int4-wo", "fp8"]
    with pytest.raises(SystemExit) as e:
        eval_tool.main([str(gguf), *text, "--quant", "from-gguf", "--quant-lm-head"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m tools.eval: error: --quant-lm-head does not apply to --quant from-gguf, "
        "which keeps the LM head unquantized; evaluate from-gguf in a run without --quant-lm-head."
    )
    (converted,) = (tmp_path / "cache" / "gguf").iterdir()
    assert eval_tool.main([str(converted), *text, "--quant", "from-gguf"]) == 1
    assert capsys.readouterr().err == (
        f"error: --quant from-gguf keeps a GGUF file's own quantization, but {converted} is not "
        "a GGUF file; pass a .gguf file (or a folder holding one), or choose another --quant.\n"
    )
    artifact = tmp_path / "artifact"
    build_args = [str(gguf), "--target", "sm89", "--max-seq-len", "32", "--quant", "from-gguf"]
    assert build([*build_args, "--output", str(artifact), "--quiet"], capsys)[0] == 0
    assert eval_tool.main([str(artifact), *text]) == 0
    assert list(json.loads(capsys.readouterr().out)["modes"]) == ["from-gguf"]


def test_a_text_longer_than_the_context_is_refused(capsys):
    """It was refused as "max_seq_len=6271 ... choose a smaller --max-seq-len", an option
    tools.eval does not have."""
    assert eval_tool.main([str(tiny_quant_dir("llama")), "--text", str(MOBY_DICK)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {MOBY_DICK} is 6271 tokens, longer than the model's context (256 positions); "
        "evaluate its first 256 with --max-tokens 256."
    )


def test_scoring_cuts_its_chunks_at_kv_ring_ends():
    """A chunk that crossed a sliding layer's KV ring end was refused by the executor ("row
    0's positions 32..58 cross the end of a sliding-window ring"): tools.eval stopped
    after 767 tokens of any Gemma-3 model. Scored in chunks of 32 as one token at a time."""
    ckpt = Checkpoint.open(tiny_model_dir("gemma3"))
    ids = np.random.default_rng(0).integers(4, ckpt.config.vocab_size, 60).tolist()

    def scored(chunk: int):
        options = NetworkOptions(
            dtype="float32", max_seq_len=60, max_prefill=chunk, all_logits=True
        )
        model = CpuBackend(build_network(ckpt, options, trt))
        return model.rings, eval_tool.score(model, ids, chunk)

    rings, (nll, top1) = scored(32)
    _, (nll_one, top1_one) = scored(1)
    assert rings == (35,)  # window 4 + 32 - 1: 60 tokens cross it
    np.testing.assert_allclose(nll, nll_one, rtol=1e-5, atol=1e-5)
    assert top1.tolist() == top1_one.tolist()


@pytest.mark.slow
def test_gemma270m_quantized_accuracy(gemma3_270m_dir, capsys):
    """Over 320 tokens of Moby-Dick against the bfloat16 network (fp8 calibrated on 256 tokens
    of the shipped text). Measured when written: int8-wo 98.4% top-1 agreement, perplexity
    +0.4%; fp8 91.5%, +0.8%; int4-wo 52.7%, 2.0x. The agreement moves by a few of the 319
    positions with any change of where the networks round: int8-wo 97.8% at 69f0161, 96.6%
    since prefills attend with the fused attention (2763fff), while the bfloat16 network's
    own agreement with float32 rose from 97.8% to 98.4%. This checkpoint is the bundled Q4_K_M GGUF
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
    assert modes["int8-wo"]["top1_agreement"] >= 0.96
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
