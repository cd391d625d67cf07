"""Helpers of the tools tests: run python -m tools.build in-process, the usual tiny build,
and a tiny checkpoint with a tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from tools import build as build_tool


def run_build(args: list[str], capsys) -> tuple[int, str, str]:
    code = build_tool.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def tiny_build_args(tiny_dir, out_dir, *extra: str) -> list[str]:
    model = str(tiny_dir("qwen3"))
    return [model, "--target", "sm89", "--max-seq-len", "32", "--output", str(out_dir), *extra]


def with_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a tiny checkpoint folder (weights linked) plus a word-level tokenizer.json."""
    dest.mkdir()
    for f in model_dir.iterdir():
        (dest / f.name).symlink_to(f)
    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    return dest
