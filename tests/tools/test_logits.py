"""python -m tools.logits refusing what is no Hugging Face model folder, with what to pass
instead (its logits against transformers: tests/tools/test_cli.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_gguf import write_gguf
from tests.tools.cli import run_build, tiny_build_args
from tools import logits as logits_tool
from weights.gguf_import import gguf_model_dir


def logits_error(model: str, tmp_path) -> str:
    with pytest.raises(SystemExit) as e:
        logits_tool.main([model, "--ids", "1,2", "--out", str(tmp_path / "x.npy")])
    assert not (tmp_path / "x.npy").exists()
    return str(e.value)


def test_a_missing_path_or_a_file_is_said_so(tiny_dir, tmp_path):
    """'/nope/config.json does not exist', 'FILE is a file: point to a Hugging Face model
    folder that holds config.json (or download the model, or convert a .gguf file, ...)'."""
    assert logits_error(str(tmp_path / "nope"), tmp_path) == (
        f"error: {tmp_path / 'nope'} does not exist; pass a Hugging Face model folder "
        "(config.json + safetensors)."
    )
    config = tiny_dir("llama") / "config.json"
    assert logits_error(str(config), tmp_path) == (
        f"error: {config} is a file, not a folder; pass a Hugging Face model folder "
        "(config.json + safetensors)."
    )


def test_an_artifact_names_the_folder_it_was_built_from(tiny_dir, tmp_path, capsys):
    """It said 'ARTIFACT has no model.safetensors or model.safetensors.index.json; point to a
    Hugging Face folder with safetensors weights.'"""
    artifact = tmp_path / "a"
    assert run_build(tiny_build_args(tiny_dir, artifact, "--quiet"), capsys)[0] == 0
    assert logits_error(str(artifact), tmp_path) == (
        f"error: {artifact} is an engine artifact; tools.logits runs a model folder's network "
        f"on the CPU: pass the folder it was built from, {tiny_dir('qwen3').resolve()}."
    )


def test_a_gguf_model_names_its_conversion(tiny_dir, tmp_path, monkeypatch, capsys):
    """It said 'FILE is a file: point to a Hugging Face model folder ...', and of a folder
    holding the GGUF 'FOLDER/config.json does not exist'."""
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "g"
    folder.mkdir()
    gguf = write_gguf(tiny_dir("llama"), folder / "tiny.gguf", "llama")
    for given in (gguf, folder):
        assert logits_error(str(given), tmp_path).startswith(
            f"error: {given} is a GGUF model; python -m tools.build {given} converts it into "
            f"{tmp_path / 'cache' / 'gguf'}/tiny-"
        )
    converted = gguf_model_dir(gguf, tmp_path / "cache", progress=False)
    assert logits_error(str(gguf), tmp_path) == (
        f"error: {gguf} is a GGUF model; pass its Hugging Face conversion, {converted}."
    )
    out = tmp_path / "x.npy"
    assert logits_tool.main([str(converted), "--ids", "1,2", "--out", str(out)]) == 0
    assert capsys.readouterr().err.endswith(f"Saved float32 logits [2, 512] to {out}.\n")


def test_an_out_under_a_file_is_said_so(tiny_dir, tmp_path, capsys):
    """It said 'the folder FILE does not exist; create it first', of a file that exists."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out in (notes / "x.npy", notes / "sub" / "x.npy"):
        with pytest.raises(SystemExit) as e:
            logits_tool.main([str(tiny_dir("llama")), "--ids", "1,2", "--out", str(out)])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"python -m tools.logits: error: --out {out}: {notes} is a file, not a folder; name "
            "a file in an existing folder"
        )
    with pytest.raises(SystemExit):  # a folder that is missing still says so
        logits_tool.main([str(tiny_dir("llama")), "--ids", "1", "--out", str(tmp_path / "a/x")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m tools.logits: error: --out {tmp_path / 'a/x'}: the folder {tmp_path / 'a'} "
        "does not exist; create it first"
    )
    assert notes.read_text() == "mine"
