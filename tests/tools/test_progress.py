"""Long phases show progress: the TensorRT builder's nested phases, tools.eval's networks."""

from __future__ import annotations

import re

from tests.tools.cli import run_build, tiny_build_args, with_tokenizer
from tools import eval as eval_tool


def test_the_builder_bar_names_the_nested_phase_and_its_step(tiny_dir, tmp_path, capsys):
    code, _, err = run_build(tiny_build_args(tiny_dir, tmp_path / "a"), capsys)
    assert code == 0
    # e.g. "TensorRT: Building engine:   0%|   | 0/6 [00:00<?, ?it/s, Cloning network graph 3/243]"
    assert re.search(r"TensorRT: Building engine:[^\r\n]*, [A-Z][a-z ]+ \d+/\d+\]", err), err


def test_eval_shows_a_bar_per_network(tiny_dir, tmp_path, capsys):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 97 + 5}" for i in range(40)))
    args = [str(model), "--text", str(text), "--quant", "int8-wo", "--chunk", "8", "--json"]
    assert eval_tool.main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"bfloat16 network: 100%[^\r\n]*5/5", err), err
    assert re.search(r"int8-wo network: 100%[^\r\n]*5/5", err), err
