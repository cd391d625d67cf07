"""`python -m tools.build` end to end on the CPU, with the real TensorRT-RTX builder."""

from __future__ import annotations

import json

import pytest

from netdef import load_backend
from netdef.artifact import ENGINE_FILE, METADATA_FILE, read_metadata
from tools import build as build_tool
from tools import inspect as inspect_tool
from weights import load_config

trt = load_backend("tensorrt_rtx")


def run_build(args: list[str], capsys) -> tuple[int, str, str]:
    code = build_tool.main(args)
    out, err = capsys.readouterr()
    return code, out, err


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
    code, out, err = run_build([*args, "--max-batch", "2", "--output", str(out_dir)], capsys)
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
    assert [p["name"] for p in meta["profiles"]] == ["decode", "prefill"]
    assert meta["profiles"][0]["shapes"]["input_ids"] == [[1, 1], [2, 1], [2, 1]]
    # The metadata's config is the checkpoint's, field for field.
    config = load_config(tiny_dir(family))
    assert meta["config"]["family"] == config.family
    assert len(meta["config"]["layers"]) == config.num_layers
    assert [t["name"] for t in meta["io"]["inputs"]][:3] == [
        "input_ids",
        "position_ids",
        "last_token_index",
    ]
    assert len(meta["weights_sha256"]) == 64
    assert "Network definition" in err and "Engine:" in err


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

    monkeypatch.setattr(build_tool, "build_engine", must_not_build)
    code, second, err = run_build(args, capsys)
    assert code == 0 and second.strip() == artifact
    assert "Reusing" in err
    # Other options are another artifact.
    monkeypatch.undo()
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path / "cache"))
    code, third, _ = run_build([*args[:-1], "48"], capsys)
    assert code == 0 and third.strip() != artifact


def test_failed_build_leaves_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    def crash(*args, **kwargs):
        (args[1]).write_bytes(b"half an engine")
        raise RuntimeError("builder crashed")

    monkeypatch.setattr(build_tool, "build_engine", crash)
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


def test_rtx_needs_a_target(tiny_dir, capsys):
    code, _, err = run_build([str(tiny_dir("llama")), "--backend", "tensorrt_rtx"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: TensorRT-RTX builds ahead of time for one GPU generation: pass --target "
        "(sm75, sm80, sm86, sm89, sm120 or sm121), e.g. --target sm89 for an RTX 40-series GPU."
    )


def test_unknown_target(tiny_dir, capsys):
    code, _, err = run_build([str(tiny_dir("llama")), "--target", "sm90"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: unknown compute capability target 'sm90'; choose one of sm75, sm80, sm86, sm89, sm120, sm121."
    )


def test_inspect_prints_the_artifact(tiny_dir, tmp_path, capsys):
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
    assert "decode" in text and "prefill" in text
    assert "past_key_0" in text and "logits" in text
    assert inspect_tool.main([str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_metadata(out_dir)
    assert inspect_tool.main([str(tmp_path)]) == 1
