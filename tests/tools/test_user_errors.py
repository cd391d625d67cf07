"""Bad input through the real commands: one clear line, exit status 1, nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from netdef.artifact import METADATA_FILE
from tests.tools.cli import free_port, run_build, tiny_build_args, with_tokenizer
from tools import eval as eval_tool
from tools import generate as generate_tool
from tools import inspect as inspect_tool
from tools import logits as logits_tool
from tools import serve as serve_tool


def edited_model(tiny_dir, tmp_path: Path, config: object) -> Path:
    """The tiny llama's weights under a config.json holding `config`."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny_dir("llama") / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def llama_config(tiny_dir) -> dict:
    return json.loads((tiny_dir("llama") / "config.json").read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: [c],
            "{config} holds a JSON list, not an object of config fields; re-download the model.",
        ),
        (
            lambda c: {**c, "hidden_size": "sixty-four"},
            "config field hidden_size='sixty-four' is not supported: it must be a positive integer.",
        ),
        (
            lambda c: {**c, "num_attention_heads": 0},
            "config field num_attention_heads=0 is not supported: it must be a positive integer.",
        ),
    ],
    ids=["list", "text-size", "zero-heads"],
)
def test_a_malformed_config_is_one_line(edit, message, tiny_dir, tmp_path, capsys):
    model = edited_model(tiny_dir, tmp_path, edit(llama_config(tiny_dir)))
    out_dir = tmp_path / "artifact"
    code, out, err = run_build(tiny_build_args(lambda _: model, out_dir), capsys)
    assert (code, out) == (1, "")
    assert err == "error: " + message.format(config=model / "config.json") + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_corrupt_tokenizer_fails_before_the_build(tiny_dir, tmp_path, capsys):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    (model / "tokenizer.json").write_text('{"model": ')
    code, _, err = run_build(tiny_build_args(lambda _: model, tmp_path / "artifact"), capsys)
    assert code == 1
    assert err.startswith(f"error: {model / 'tokenizer.json'} cannot be read (")
    assert err.endswith("); re-download the model's tokenizer files.\n") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert generate_tool.main([str(model), "--backend", "reference", "--prompt", "w1"]) == 1
    assert capsys.readouterr().err == err


@pytest.fixture
def artifact(tiny_dir, tmp_path, capsys) -> Path:
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    out_dir = tmp_path / "artifact"
    assert run_build(tiny_build_args(lambda _: model, out_dir, "--quiet"), capsys)[0] == 0
    capsys.readouterr()
    return out_dir


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "cannot be read as JSON (Expecting value: line 1 column 1 (char 0))"),
        (
            '{"format_version": 2}',
            "lacks config, options, profiles, io, backend, build_key, model, build, kv_cache",
        ),
    ],
    ids=["not-json", "missing-keys"],
)
def test_broken_metadata_is_one_line(text, problem, artifact, capsys):
    (artifact / METADATA_FILE).write_text(text)
    expected = (
        f"error: {artifact / METADATA_FILE} {problem}; rebuild it with python -m tools.build "
        "--force.\n"
    )
    assert inspect_tool.main([str(artifact)]) == 1
    assert capsys.readouterr().err == expected
    assert generate_tool.main([str(artifact), "--backend", "reference", "--prompt", "x"]) == 1
    assert capsys.readouterr().err == expected


def test_metadata_without_a_build_record(artifact, capsys):
    meta = json.loads((artifact / METADATA_FILE).read_text())
    del meta["model"]
    (artifact / METADATA_FILE).write_text(json.dumps(meta))
    assert inspect_tool.main([str(artifact)]) == 1
    assert capsys.readouterr().err == (
        f"error: {artifact / METADATA_FILE} lacks model; rebuild it with python -m tools.build "
        "--force.\n"
    )


def test_the_tensorrt_backend_without_a_gpu_is_one_line(artifact, capsys):
    """This machine has no CUDA GPU (and may lack cuda-python): said before anything loads."""
    from runtime.cuda_buffers import gpu_unavailable_reason

    assert generate_tool.main([str(artifact), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: the TensorRT backend needs cuda-python and a CUDA GPU, but "
        f"{gpu_unavailable_reason()}; on the CPU, run the artifact's network with --backend "
        "reference.\n"
    )
    assert err.count("needs") == 1  # it said "needs cuda-python ... (... needs cuda-python ...)"


def test_an_unwritable_output_fails_before_the_build(tiny_dir, capsys):
    """/sys refuses new folders even to root: a read-only place any Linux test machine has."""
    out_dir = Path("/sys/trt-netdef-artifact")
    code, _, err = run_build(tiny_build_args(tiny_dir, out_dir), capsys)
    assert code == 1
    assert err == (
        f"error: cannot write {out_dir} (Permission denied); choose a writable --output, "
        "or set TRT_NETDEF_CACHE to a writable folder (and check the free disk space).\n"
    )


def test_logits_out_in_a_missing_folder_fails_before_computing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nonexistent" / "x.npy"
    with pytest.raises(SystemExit) as e:
        logits_tool.main([str(tiny_dir("llama")), "--ids", "1,2", "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: --out {out}: the folder {out.parent} does not exist; create it first\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_logits_out_naming_a_folder_fails_before_computing(tiny_dir, tmp_path, capsys):
    """--out FOLDER wrote FOLDER.npy beside the folder."""
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(SystemExit) as e:
        logits_tool.main([str(tiny_dir("llama")), "--ids", "1,2", "--out", str(folder)])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: --out {folder}: {folder} is a folder; name the file to write in it, e.g. "
        f"--out {folder / 'logits.npy'}\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and not any(folder.iterdir())


# Hints that name what the user can do --------------------------------------------------------


def generate_cli(model: Path, *args: str) -> list[str]:
    return [str(model), "--backend", "reference", "--dtype", "float32", *args]


def test_a_too_long_prompt_points_at_truncate(tiny_dir, tmp_path, capsys):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    args = generate_cli(model, "--max-seq-len", "8", "--max-new-tokens", "2")
    prompt = ["--prompt", " ".join(f"w{i}" for i in range(10, 20))]
    assert generate_tool.main([*args, *prompt]) == 1
    assert capsys.readouterr().err.endswith(
        "or allow truncation. (--truncate keeps the prompt's last tokens, after its BOS.)\n"
    )
    assert generate_tool.main([*args, *prompt, "--truncate"]) == 0
    assert "[6 prompt tokens, 2 generated (length)" in capsys.readouterr().err


def test_too_many_new_tokens_blames_the_flag(tiny_dir, tmp_path, capsys, monkeypatch):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    args = generate_cli(model, "--max-seq-len", "64", "--max-new-tokens", "2000", "--prompt", "w5")
    assert generate_tool.main(args) == 1
    assert capsys.readouterr().err == (
        "error: --max-new-tokens 2000 leaves no room for a prompt in max_seq_len=64; ask for "
        "fewer new tokens, or use a larger max_seq_len (--max-seq-len, up to the model's "
        "context, 256).\n"
    )
    # Said before the network is built (9 s for Gemma-3-270M at its 32K context on the CPU),
    # for the model's own context when --max-seq-len is not given (where a larger one is
    # refused: no rebuild is suggested), and an artifact's.
    artifact = tmp_path / "artifact"
    build = [str(model), "--target", "sm89", "--max-seq-len", "32", "--quiet"]
    assert run_build([*build, "--output", str(artifact)], capsys)[0] == 0

    def opened(*args):
        raise AssertionError("the backend was opened")

    monkeypatch.setattr(generate_tool, "open_backend", opened)
    args = ["--backend", "reference", "--max-new-tokens", "2000", "--prompt", "w5"]
    assert generate_tool.main([str(model), *args]) == 1
    assert capsys.readouterr().err == (
        "error: --max-new-tokens 2000 leaves no room for a prompt in max_seq_len=256, the "
        "model's whole context; ask for fewer than 256 new tokens.\n"
    )
    assert generate_tool.main([str(artifact), *args]) == 1
    assert capsys.readouterr().err == (
        "error: --max-new-tokens 2000 leaves no room for a prompt in max_seq_len=32; ask for "
        "fewer new tokens, or build the artifact again with a larger max_seq_len (--max-seq-len, "
        "up to the model's context, 256).\n"
    )


def test_the_default_new_tokens_leave_room_for_a_prompt(tiny_dir, tmp_path, capsys):
    # --max-new-tokens unset: up to 128, or half of a shorter cache (here 16 of 32)
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    assert generate_tool.main(generate_cli(model, "--max-seq-len", "32", "--prompt", "w5")) == 0
    assert "[1 prompt tokens, 16 generated (length)" in capsys.readouterr().err


def test_an_artifact_refuses_the_flags_of_a_model_folder(tiny_dir, tmp_path, capsys):
    """--dtype and --max-seq-len were ignored with an artifact (--max-seq-len 0 included)."""
    model = with_tokenizer(tiny_dir("qwen3"), tmp_path / "model")
    artifact = tmp_path / "artifact"
    assert (
        run_build(
            [str(model), "--target", "sm89", "--max-seq-len", "32", "--output", str(artifact)],
            capsys,
        )[0]
        == 0
    )
    expected = (
        f"error: {artifact} runs as built (bfloat16, max_seq_len 32); --dtype and --max-seq-len "
        "choose a model folder's network: drop them, or build another artifact with python -m "
        "tools.build.\n"
    )
    for flags in (["--dtype", "float32"], ["--max-seq-len", "0"]):
        args = [str(artifact), "--backend", "reference", *flags, "--prompt", "w5"]
        assert generate_tool.main(args) == 1
        assert capsys.readouterr().err.endswith(expected)


def test_an_executor_failure_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """A layer the CPU executor fails on (as TopK did on NaN logits) was a traceback."""
    from runtime.reference import Executor

    def fails(self, layer, inputs):
        raise ValueError("cannot reshape array of size 0 into shape (1,1,1)")

    monkeypatch.setattr(Executor, "_rotary", fails)  # a layer every network has
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    args = generate_cli(model, "--max-seq-len", "32", "--max-new-tokens", "2", "--prompt", "w5")
    assert generate_tool.main(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: layer '")
    assert err.endswith(
        "(ROTARY_EMBEDDING) failed: cannot reshape array of size 0 into shape (1,1,1); the reference "
        "executor (runtime/reference.py) should run every layer it accepts: please report it."
    )
    with pytest.raises(SystemExit) as e:
        logits_tool.main([str(model), "--ids", "5,6", "--out", str(tmp_path / "x.npy")])
    assert str(e.value).startswith("error: layer '") and str(e.value).endswith("please report it.")


def test_a_bad_cache_length_names_the_flag(tiny_dir, tmp_path, capsys):
    """It said "max_seq_len=0 must be at least 1." without naming the flag it came from."""
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    assert generate_tool.main(generate_cli(model, "--max-seq-len", "0", "--prompt", "w5")) == 1
    assert capsys.readouterr().err == "error: --max-seq-len: max_seq_len=0 must be at least 1.\n"
    serve = [str(model), "--backend", "reference", "--max-seq-len", "0", "--port", str(free_port())]
    assert serve_tool.main(serve) == 1
    assert capsys.readouterr().err == "error: --max-seq-len: max_seq_len=0 must be at least 1.\n"
    code, out, err = run_build(
        tiny_build_args(tiny_dir, tmp_path / "a", "--max-batch", "0"), capsys
    )
    assert (code, out, err) == (1, "", "error: --max-batch: max_batch=0 must be at least 1.\n")


def test_a_bad_seed_names_the_flag(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        generate_tool.main(generate_cli(tiny_dir("llama"), "--seed", "-1", "--prompt", "x"))
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith("error: --seed: seed=-1 must be in [0, 2**32).\n")


def test_a_missing_model_folder_says_so(tmp_path, capsys):
    missing = tmp_path / "nope"
    expected = (
        f"error: {missing} does not exist; pass an artifact folder from python -m tools.build, "
        "or a Hugging Face model folder with --backend reference.\n"
    )
    assert generate_tool.main([str(missing), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == expected
    assert serve_tool.main([str(missing)]) == 1
    assert capsys.readouterr().err == expected
    # tools.inspect said "not an engine artifact", tools.eval "has no tokenizer.json"
    assert inspect_tool.main([str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"error: {missing} does not exist; pass a folder written by python -m tools.build.\n"
    )
    # A file, not a folder: a GGUF file is pointed to tools.build, any other file named one.
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for run in (
        lambda: generate_tool.main([str(gguf), "--backend", "reference", "--prompt", "x"]),
        lambda: serve_tool.main([str(gguf), "--backend", "reference"]),
    ):
        assert run() == 1 and capsys.readouterr().err == (
            f"error: {gguf} is a GGUF file; python -m tools.build {gguf} converts it (into "
            "$TRT_NETDEF_CACHE/gguf/) and builds an artifact: pass that artifact folder, or the "
            "converted folder with --backend reference.\n"
        )
    text = tmp_path / "text.txt"
    text.write_text("Call me Ishmael.")
    assert generate_tool.main([str(text), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == (
        f"error: {text} is a file, not a folder; pass an artifact folder from python -m "
        "tools.build, or a Hugging Face model folder with --backend reference.\n"
    )
    assert eval_tool.main([str(missing), "--text", str(text)]) == 1
    assert capsys.readouterr().err == (
        f"error: {missing} does not exist; pass an artifact folder from python -m tools.build "
        "or a Hugging Face model folder.\n"
    )


def test_a_folder_holding_a_gguf_file_is_said_to_be_one(tmp_path, capsys):
    """tools.build takes a folder holding one .gguf (README); tools.generate and tools.serve
    said such a folder "has no tokenizer.json", as if it were a broken model folder."""
    folder = tmp_path / "llama-3.2-1b"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    for run in (
        lambda: generate_tool.main([str(folder), "--backend", "reference", "--prompt", "x"]),
        lambda: serve_tool.main([str(folder), "--backend", "reference"]),
    ):
        assert run() == 1 and capsys.readouterr().err == (
            f"error: {folder} holds a GGUF file and no config.json; python -m tools.build "
            f"{folder} converts it (into $TRT_NETDEF_CACHE/gguf/) and builds an artifact: pass "
            "that artifact folder, or the converted folder with --backend reference.\n"
        )


def test_profiles_help_names_three_sets(capsys):
    from tools import build as build_tool

    with pytest.raises(SystemExit):
        build_tool.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--profiles SET optimization profiles, one of three sets: 'decode,prefill,chunk' (the "
        "default: one for decode steps, one for prompt chunks, one for a single sequence's "
        "full chunks of --max-prefill tokens, whose fixed shape gets faster kernels), "
        "'decode,prefill' (the first two: a faster build) or 'dynamic' (one profile for every "
        "call)"
    ) in help_text


def test_artifacts_get_the_umask_permissions(artifact):
    umask = os.umask(0)
    os.umask(umask)
    assert artifact.stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_readme_cpu_snippet_runs(tiny_dir, tmp_path, capsys):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [snippet] = [b for b in readme.split("```python\n")[1:] if "import CpuBackend" in b]
    code = snippet.split("```")[0].replace('"MODEL_DIR"', repr(str(model)))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_inspect_of_a_model_says_to_build_it(tiny_dir, tmp_path, capsys):
    """A model folder or GGUF file (what tools.build takes) was "not an engine artifact (no
    model.engine and metadata.json)", with no fix; an artifact folder lacking its engine gets
    check_intact's rebuild advice."""
    gguf = tmp_path / "my models" / "model.gguf"  # the command it prints quotes the space
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    for path, what, typed in (
        (tiny_dir("llama"), "a model folder", str(tiny_dir("llama"))),
        (gguf.parent, "a model folder", f"'{gguf.parent}'"),
        (gguf, "a GGUF file", f"'{gguf}'"),
    ):
        assert inspect_tool.main([str(path)]) == 1
        assert capsys.readouterr().err == (
            f"error: {path} is {what}, not an engine artifact; python -m tools.build {typed} "
            "builds one (it prints the artifact folder to pass here).\n"
        )
    assert inspect_tool.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not an engine artifact (no metadata.json); build one with python "
        "-m tools.build.\n"
    )
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert inspect_tool.main([str(text)]) == 1
    assert capsys.readouterr().err == (
        f"error: {text} is a file, not a folder; pass a folder written by python -m tools.build.\n"
    )


def test_inspect_of_an_artifact_without_its_engine(artifact, capsys):
    (artifact / "model.engine").unlink()
    assert inspect_tool.main([str(artifact)]) == 1
    assert capsys.readouterr().err == (
        f"error: {artifact} has no model.engine; rebuild it with python -m tools.build --force.\n"
    )
