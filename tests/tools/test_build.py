"""`python -m tools.build` end to end on the CPU, with the real TensorRT-RTX builder."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from netdef import load_tensorrt
from netdef.artifact import (
    ARTIFACT_FILES,
    ENGINE_FILE,
    METADATA_FILE,
    build_key,
    check_intact,
    files_sha256,
    fmt_bytes,
    read_metadata,
    staging,
    write_metadata,
)
from netdef.contract import FORMAT_VERSION, NETWORK_VERSION
from runtime import build as pipeline
from tests.tools.cli import run_build, tiny_build_args, with_tokenizer
from tools import build as build_tool
from tools import generate as generate_tool
from tools import inspect as inspect_tool
from weights import load_config

trt = load_tensorrt("tensorrt_rtx")


@pytest.mark.parametrize("family", ["gemma3", "gemma3_mm", "llama", "qwen2", "qwen3"])
def test_builds_a_complete_artifact(family, tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "artifact"
    args = [
        str(tiny_dir(family)),
        "--backend",
        "tensorrt_rtx",
        "--target",
        "sm89",
        "--max-seq-len",
        "64",
    ]
    tuned = ["--max-batch", "2", "--decode-opt", "2"]
    code, out, err = run_build([*args, *tuned, "--output", str(out_dir)], capsys)
    assert code == 0, err
    assert out.strip() == str(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["config.json", "generation_config.json", ENGINE_FILE, METADATA_FILE]
    )
    meta = read_metadata(out_dir)
    engine_bytes = (out_dir / ENGINE_FILE).stat().st_size
    assert meta["build"]["engine_bytes"] == engine_bytes > 0
    assert meta["backend"] == {"module": "tensorrt_rtx", "version": trt.__version__}
    assert meta["target"] == "sm89"
    assert meta["options"]["max_seq_len"] == 64 and meta["options"]["max_batch"] == 2
    assert meta["options"]["decode_opt"] == 2
    assert [p["name"] for p in meta["profiles"]] == ["decode", "prefill", "chunk"]
    assert meta["profiles"][0]["shapes"]["input_ids"] == [[1, 1], [2, 1], [2, 1]]  # tuned for 2
    # The metadata's config is the checkpoint's, field for field.
    config = load_config(tiny_dir(family))
    assert meta["config"]["family"] == config.family
    assert len(meta["config"]["layers"]) == config.num_layers
    assert [t["name"] for t in meta["io"]["inputs"]][:3] == [
        "input_ids",
        "position_ids",
        "last_token_index",
    ]
    assert meta["weights_sha256"] == files_sha256(sorted(tiny_dir(family).glob("*.safetensors")))
    assert "Network definition" in err and "Engine:" in err
    per_sequence = sum(meta["kv_cache"]["slots"]) * 2 * config.num_kv_heads * config.head_dim * 2
    assert per_sequence == meta["kv_cache"]["bytes_per_sequence"]
    assert (
        f"\nKV cache: {fmt_bytes(2 * per_sequence)} of GPU memory once loaded (2 x "
        f"{fmt_bytes(per_sequence)} per sequence at max_seq_len 64); --max-seq-len and "
        "--max-batch set it.\n"
    ) in err


def test_second_identical_build_is_reused(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    args = [
        str(tiny_dir("qwen3")),
        "--backend",
        "tensorrt_rtx",
        "--target",
        "sm89",
        "--max-seq-len",
        "32",
    ]
    code, first, _ = run_build(args, capsys)
    assert code == 0
    artifact = first.strip()
    assert artifact.startswith(str(tmp_path / "cache" / "engines"))

    def must_not_build(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(pipeline, "build_engine", must_not_build)
    code, second, err = run_build(args, capsys)
    assert code == 0 and second.strip() == artifact
    assert "Reusing" in err
    # Other spellings of the same target are the same build.
    for spelling in ("SM89", "8.9", "89"):
        code, again, _ = run_build([*args[:4], spelling, *args[5:]], capsys)
        assert code == 0 and again.strip() == artifact
    assert read_metadata(Path(artifact))["target"] == "sm89"
    # The model through a link (was another folder name, so built again) or a relative path.
    (tmp_path / "my link").symlink_to(args[0])
    code, linked, _ = run_build([str(tmp_path / "my link"), *args[1:]], capsys)
    assert code == 0 and linked.strip() == artifact
    monkeypatch.chdir(Path(args[0]).parent)
    code, relative, _ = run_build([Path(args[0]).name, *args[1:]], capsys)
    assert code == 0 and relative.strip() == artifact
    # Other options are another artifact.
    monkeypatch.undo()
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    code, third, _ = run_build([*args[:-1], "48"], capsys)
    assert code == 0 and third.strip() != artifact


def test_a_float16_gemma_build_warns_once_in_one_line(tiny_dir, tmp_path, capsys):
    args = [str(tiny_dir("gemma3")), "--target", "sm89", "--max-seq-len", "32", "--quiet"]
    code, _, err = run_build([*args, "--dtype", "float16", "--output", str(tmp_path / "a")], capsys)
    assert code == 0 and err.startswith(  # then: the fixture has no tokenizer.json
        "warning: Gemma-3 activations overflow float16; expect inf/NaN logits. Use bfloat16.\n"
        "warning: "
    )
    assert err.count("overflow float16") == 1 and "UserWarning" not in err


def test_a_newer_network_is_built_anew_and_older_artifacts_stay_intact(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    args = [str(tiny_dir("qwen3")), "--target", "sm89", "--max-seq-len", "32", "--quiet"]
    code, first, _ = run_build(args, capsys)
    older = Path(first.strip())
    assert code == 0 and read_metadata(older)["network_version"] == NETWORK_VERSION
    monkeypatch.setattr(pipeline, "NETWORK_VERSION", NETWORK_VERSION + 1)
    code, second, err = run_build(args, capsys)
    newer = Path(second.strip())
    assert code == 0 and "Reusing" not in err and newer != older
    assert read_metadata(newer)["network_version"] == NETWORK_VERSION + 1
    assert check_intact(older).build_key != check_intact(newer).build_key
    # An artifact from before network_version existed: no field, its key made without one.
    meta = read_metadata(older)
    del meta["network_version"]
    meta["build_key"] = build_key(meta)
    write_metadata(older, meta)
    assert check_intact(older).build_key == meta["build_key"] != check_intact(newer).build_key
    capsys.readouterr()
    assert inspect_tool.main([str(older)]) == 0
    assert (
        f"\nformat     artifact {FORMAT_VERSION}, network - (built before network versions)\n"
        in (capsys.readouterr().out)
    )


def test_failed_build_leaves_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    def crash(*args, **kwargs):
        (args[1]).write_bytes(b"half an engine")
        raise RuntimeError("builder crashed")

    monkeypatch.setattr(pipeline, "build_engine", crash)
    out_dir = tmp_path / "artifact"
    with pytest.raises(RuntimeError, match="builder crashed"):
        build_tool.main(
            [
                str(tiny_dir("llama")),
                "--target",
                "sm89",
                "--max-seq-len",
                "32",
                "--output",
                str(out_dir),
            ]
        )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_spilling_weights_is_one_error_and_leaves_nothing(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    """The MLP's transposed copies are written to the staging folder; no room there is the
    same one-line error as any other unwritable output, and the staging folder goes."""

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out_dir = tmp_path / "artifact"
    args = [str(tiny_dir("llama")), "--target", "sm89", "--max-seq-len", "32", "--max-batch", "2"]
    code, _, err = run_build([*args, "--output", str(out_dir)], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == (  # after the progress lines
        f"error: cannot write {out_dir} (No space left on device); choose a writable --output, "
        "or set TRT_NETDEF_CACHE to a writable folder (and check the free disk space)."
    )
    assert list(tmp_path.iterdir()) == []


def test_rtx_needs_a_target(tiny_dir, capsys):
    code, _, err = run_build([str(tiny_dir("llama")), "--backend", "tensorrt_rtx"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: TensorRT-RTX builds ahead of time for one GPU generation: pass --target "
        "(sm75, sm80, sm86, sm89, sm120 or sm121), e.g. --target sm89 for an RTX 40-series GPU."
    )


def test_rtx_refuses_a_timing_cache_before_the_build(tiny_dir, tmp_path, capsys):
    args = [str(tiny_dir("llama")), "--target", "sm89", "--timing-cache", str(tmp_path / "t")]
    code, _, err = run_build([*args, "--output", str(tmp_path / "a")], capsys)
    assert code == 1 and not (tmp_path / "a").exists() and not (tmp_path / "t").exists()
    assert err.strip() == (
        "error: --timing-cache applies to --backend tensorrt only: TensorRT-RTX does not "
        "autotune, so a timing cache has no effect on its engines; drop --timing-cache."
    )


def test_unknown_target(tiny_dir, capsys):
    code, _, err = run_build([str(tiny_dir("llama")), "--target", "sm90"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: unknown compute capability target 'sm90'; choose one of sm75, sm80, sm86, sm89, sm120, sm121."
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch: max_batch=0 must be at least 1."),
        (["--max-seq-len", "0"], "--max-seq-len: max_seq_len=0 must be at least 1."),
        (
            ["--max-prefill", "0"],
            "--max-prefill: max_prefill=0 must be between 1 and max_seq_len=256.",
        ),
    ],
)
def test_sizes_below_one_are_refused(args, message, tiny_dir, tmp_path, capsys):
    """A zero is refused, not read as "the default" (--max-prefill 0 built with the default
    chunk) nor divided by (--max-batch 0 reached the user as a ZeroDivisionError)."""
    out_dir = tmp_path / "a"
    code, _, err = run_build(
        [str(tiny_dir("llama")), "--target", "sm89", *args, "--output", str(out_dir)], capsys
    )
    assert code == 1 and not out_dir.exists()
    assert err.strip() == f"error: {message}"


def test_decode_long_needs_a_cache_longer_than_its_split(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "a"
    args = ["--target", "sm89", "--max-seq-len", "64", "--decode-long", "--output", str(out_dir)]
    code, _, err = run_build([str(tiny_dir("gemma3")), *args], capsys)
    assert code == 1 and not out_dir.exists()
    assert err.strip() == (
        "error: decode_long needs max_seq_len above global_opt=4096 (decode takes up to 4096 "
        "global positions already); build without --decode-long or with a longer --max-seq-len."
    )


def test_decode_long_is_on_where_it_applies(tiny_dir, tmp_path):
    """Unasked, a model with global attention layers whose cache is longer than global_opt
    gets the decode-long profile; decode_long=False (--no-decode-long) leaves it out."""
    names = {}
    for decode_long in (None, False):
        out = pipeline.build(
            str(tiny_dir("gemma3")),
            target="sm89",
            max_seq_len=128,
            global_opt=64,
            decode_long=decode_long,
            output=tmp_path / str(decode_long),
        )
        names[decode_long] = [p["name"] for p in read_metadata(out)["profiles"]]
    assert names == {
        None: ["decode", "decode-long", "prefill", "chunk"],
        False: ["decode", "prefill", "chunk"],
    }


def test_inspect_prints_the_artifact(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "a"
    assert (
        build_tool.main(
            [
                str(tiny_dir("gemma3")),
                "--target",
                "sm89",
                "--max-seq-len",
                "32",
                "--output",
                str(out_dir),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert inspect_tool.main([str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "gemma3, 4 layers" in text
    assert "\nquant      none\n" in text
    assert f"\nformat     artifact {FORMAT_VERSION}, network {NETWORK_VERSION}\n" in text
    # 3 sliding layers keep rings of window 4 + default max_prefill 16 - 1 = 19 slots, the
    # global one 32; 2 KV heads x 16 x 2 (key, value) x 2 bytes = 128 bytes a slot.
    assert (
        "\nKV cache   11.1 KiB per sequence, 11.1 KiB per batch of 1 "
        "(layers x slots: 1 x 32, 3 x 19)\n"
    ) in text
    # max_batch 1 and 16 prompt tokens: the decode profile admits 2 sequences (the MLP's
    # weights are then stored once), tuned for 1.
    assert (
        "\nprofiles\n"
        "  decode      batch 1..2 (tuned for 1), tokens 1, global positions 1..32 (tuned for 32)\n"
        "  prefill     batch 1, tokens 1..16 (tuned for 16), global positions 1..32 (tuned for 32)\n"
        "  chunk       batch 1, tokens 16, global positions 1..32 (tuned for 32)\n"
    ) in text
    assert "past_kv_0" in text and "logits" in text
    assert (
        "\nJIT cache  none yet (TensorRT-RTX compiles the kernels on the first run on a GPU)\n"
    ) in text
    kept = tmp_path / "cache" / "jit" / f"{read_metadata(out_dir)['build_key'][:16]}-sm89.bin"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(bytes(3 << 10))  # as JitCache.save leaves it after a run on an sm89 GPU
    assert inspect_tool.main([str(out_dir)]) == 0
    assert f"\nJIT cache  sm89 3.0 KiB ({kept})\n" in capsys.readouterr().out
    assert inspect_tool.main([str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_metadata(out_dir)
    assert inspect_tool.main([str(tmp_path)]) == 1


def test_force_never_deletes_what_the_user_put_in_the_output_folder(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "important.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        code, out, err = run_build(tiny_build_args(tiny_dir, out_dir, *extra), capsys)
        assert code == 1 and out == ""
        assert err == (
            f"error: {out_dir} is not empty and is not an engine artifact (it holds important.txt); "
            "nothing was deleted: choose another --output, or empty that folder yourself.\n"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in out_dir.iterdir()] == ["important.txt"]
    assert (out_dir / "important.txt").read_text() == "keep me"


def test_force_keeps_a_user_file_inside_an_artifact(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "a"
    assert run_build(tiny_build_args(tiny_dir, out_dir), capsys)[0] == 0
    (out_dir / "notes.md").write_text("mine")
    code, _, err = run_build(tiny_build_args(tiny_dir, out_dir, "--force"), capsys)
    assert code == 1 and err == (
        f"error: {out_dir} holds an engine artifact and files of yours (it holds notes.md); "
        "nothing was deleted: choose another --output, or empty that folder yourself.\n"
    )
    assert (out_dir / "notes.md").read_text() == "mine" and (out_dir / ENGINE_FILE).is_file()


def test_an_existing_empty_folder_is_built_into(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    code, out, err = run_build(tiny_build_args(tiny_dir, out_dir), capsys)
    assert code == 0, err
    assert out.strip() == str(out_dir) and (out_dir / ENGINE_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no partial folder left


def test_another_build_is_replaced_only_with_force(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "a"
    assert run_build(tiny_build_args(tiny_dir, out_dir), capsys)[0] == 0
    other = [*tiny_build_args(tiny_dir, out_dir), "--max-batch", "2"]
    code, _, err = run_build(other, capsys)
    assert code == 1
    assert err == (
        f"error: {out_dir} holds another or an incomplete engine artifact; pass --force to replace "
        "it, or choose another --output.\n"
    )
    assert read_metadata(out_dir)["options"]["max_batch"] == 1
    assert run_build([*other, "--force"], capsys)[0] == 0
    assert read_metadata(out_dir)["options"]["max_batch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_ctrl_c_while_an_artifact_is_replaced_leaves_a_whole_one(tmp_path, monkeypatch):
    """staging() deleted the old artifact's files one by one before renaming the new one in:
    a Ctrl-C there (a --force rebuild's last ~20 ms) left neither artifact, or a folder that
    later builds refused as not an artifact."""
    final = tmp_path / "a"
    final.mkdir()
    for name in ARTIFACT_FILES:
        (final / name).write_text("old")
    unlink = Path.unlink

    def unlink_then_ctrl_c(self, *args, **kwargs):
        unlink(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), staging(final) as tmp:
        for name in ARTIFACT_FILES:
            (tmp / name).write_text("new")
        monkeypatch.setattr(Path, "unlink", unlink_then_ctrl_c)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in final.iterdir()} == dict.fromkeys(ARTIFACT_FILES, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_output_that_is_a_file_is_refused_before_the_build(tiny_dir, tmp_path, capsys):
    out_file = tmp_path / "engine.txt"
    out_file.write_text("a file")
    code, _, err = run_build(tiny_build_args(tiny_dir, out_file, "--force"), capsys)
    assert code == 1
    assert err == (
        f"error: {out_file} exists and is not a folder; choose another --output (nothing was "
        "changed).\n"
    )
    assert out_file.read_text() == "a file" and [p.name for p in tmp_path.iterdir()] == [
        "engine.txt"
    ]


def test_a_truncated_engine_is_rebuilt_not_reused(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "a"
    engine = out_dir / ENGINE_FILE
    assert run_build(tiny_build_args(tiny_dir, out_dir), capsys)[0] == 0
    built = engine.stat().st_size
    os.truncate(engine, 1000)
    code, _, err = run_build(tiny_build_args(tiny_dir, out_dir), capsys)
    assert code == 0
    assert (
        f"Rebuilding {out_dir}: {engine} is 1000 bytes but was built as {built} bytes "
        "(truncated or replaced).\n" in err
    )
    assert "Reusing" not in err and engine.stat().st_size == built
    assert "Reusing" in run_build(tiny_build_args(tiny_dir, out_dir), capsys)[2]


def test_the_build_key_covers_the_tokenizer_files(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_dir("qwen3").iterdir():
        (model / f.name).symlink_to(f)
    args = [str(model), "--target", "sm89", "--max-seq-len", "32"]
    warning = (
        f"warning: {model} has no tokenizer.json, so python -m tools.generate cannot use this "
        "artifact; add the model's tokenizer files to that folder and build again.\n"
    )
    code, first, err = run_build(args, capsys)
    assert code == 0 and warning in err
    code, again, err = run_build(args, capsys)  # reused: said again
    assert code == 0 and again == first and warning in err and "Reusing" in err
    artifact = Path(first.strip())
    assert generate_tool.main([str(artifact), "--prompt", "w5"]) == 1
    assert capsys.readouterr().err == (
        f"error: {artifact} has no tokenizer.json: the model folder it was built from had none; "
        "add the model's tokenizer files to that folder and build again.\n"
    )
    shutil.copy(with_tokenizer(tiny_dir("qwen3"), tmp_path / "tok") / "tokenizer.json", model)
    code, second, err = run_build(args, capsys)
    assert code == 0 and "Reusing" not in err and "warning" not in err
    assert second != first and (Path(second.strip()) / "tokenizer.json").is_file()


@pytest.fixture
def tokenized_artifact(tiny_dir, tmp_path, capsys) -> tuple[Path, Path]:
    """(artifact, model folder) of a tiny llama that has a tokenizer."""
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    artifact = tmp_path / "artifact"
    assert run_build(tiny_build_args(lambda _: model, artifact, "--quiet"), capsys)[0] == 0
    return artifact, model


def generate(artifact: Path, capsys) -> tuple[int, str, str]:
    args = [str(artifact), "--backend", "reference", "--prompt", "w5 w6", "--max-new-tokens", "3"]
    code = generate_tool.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_reference_backend_says_which_weights_it_runs_an_artifact_with(tokenized_artifact, capsys):
    artifact, model = tokenized_artifact
    code, out, err = generate(artifact, capsys)
    assert code == 0 and out.strip()
    assert err.startswith(
        f"Running the network of {artifact} on the CPU with the weights in {model}.\n"
    )


def test_reference_backend_refuses_a_damaged_artifact(tokenized_artifact, capsys):
    artifact, _ = tokenized_artifact
    engine = artifact / ENGINE_FILE
    built = engine.stat().st_size
    os.truncate(engine, 1000)
    assert generate(artifact, capsys)[1:] == (
        "",
        f"error: {engine} is 1000 bytes but was built as {built} bytes (truncated or replaced); "
        "rebuild it with python -m tools.build --force.\n",
    )


def test_reference_backend_refuses_edited_metadata(tokenized_artifact, capsys):
    artifact, _ = tokenized_artifact
    meta = read_metadata(artifact)
    meta["options"]["max_seq_len"] = 4
    (artifact / METADATA_FILE).write_text(json.dumps(meta))
    assert generate(artifact, capsys) == (
        1,
        "",
        f"error: {artifact / METADATA_FILE} was edited after the build (it no longer matches its "
        "build_key); rebuild it with python -m tools.build --force.\n",
    )


def test_reference_backend_names_the_missing_source(tokenized_artifact, capsys):
    artifact, model = tokenized_artifact
    model.rename(model.with_name("moved"))
    assert generate(artifact, capsys) == (
        1,
        "",
        f"error: --backend reference runs the network of {artifact} on the CPU from the weights it "
        f"was built from, but {model} no longer holds them; pass that model folder instead, or run "
        "the engine on a GPU (--backend tensorrt).\n",
    )


def test_reference_backend_refuses_changed_source_weights(tokenized_artifact, capsys):
    artifact, model = tokenized_artifact
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    assert generate(artifact, capsys) == (
        1,
        "",
        f"error: {model} changed after {artifact} was built from it; rebuild the artifact with "
        f"python -m tools.build --force, or pass {model} itself.\n",
    )


def test_an_intact_artifact_is_reused_where_no_lock_can_be_taken(tiny_dir, tmp_path, capsys):
    """Reuse only reads, so an artifact in a read-only place serves; here the lock's path is
    taken by a folder, which any lock attempt fails on (as root, permissions cannot)."""
    out_dir = tmp_path / "a"
    assert run_build(tiny_build_args(tiny_dir, out_dir), capsys)[0] == 0
    (tmp_path / ".a.lock").mkdir()
    code, out, err = run_build(tiny_build_args(tiny_dir, out_dir), capsys)
    assert (code, out.strip()) == (0, str(out_dir))
    assert err.endswith(f"\nReusing {out_dir} (identical build; --force rebuilds).\n")
    assert err.count("\n") == 2  # and the fixture's missing tokenizer.json
    code, _, err = run_build(tiny_build_args(tiny_dir, out_dir, "--force"), capsys)
    assert code == 1 and err.startswith(f"error: cannot write {out_dir} (Is a directory); ")


def test_an_artifact_finds_its_weights_from_any_folder(tiny_dir, tmp_path, capsys, monkeypatch):
    """The model path was recorded as typed: built from `tiny` in its parent folder, the
    artifact's reference backend said elsewhere that the weights were gone."""
    (tmp_path / "models").mkdir()
    model = with_tokenizer(tiny_dir("qwen3"), tmp_path / "models" / "tiny")
    out = tmp_path / "artifact"
    monkeypatch.chdir(tmp_path / "models")
    code, _, err = run_build(["tiny", *tiny_build_args(tiny_dir, out)[1:]], capsys)
    assert code == 0, err
    assert read_metadata(out)["model"]["path"] == str(model.resolve())
    monkeypatch.chdir(tmp_path)
    args = ["--backend", "reference", "--prompt", "w5 w9", "--max-new-tokens", "3"]
    assert generate_tool.main([str(out), *args]) == 0, capsys.readouterr().err
    from_artifact = capsys.readouterr().out
    assert generate_tool.main([str(model), *args, "--max-seq-len", "32"]) == 0
    assert capsys.readouterr().out == from_artifact
