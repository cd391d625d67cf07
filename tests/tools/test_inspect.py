"""python -m tools.inspect's description of an artifact (the fields of a full one:
tests/tools/test_build.py's test_inspect_prints_the_artifact)."""

from __future__ import annotations

from tools import build as build_tool
from tools import inspect as inspect_tool
from tools.bench.random_model import random_config, write_random_checkpoint


def test_one_layer_is_said_in_the_singular(tmp_path, capsys):
    """It said '(gemma3, 1 layers, ...)'."""
    shapes = {"layers": 1, "hidden": 64, "intermediate": 128, "vocab": 512}
    shapes |= {"heads": 2, "kv_heads": 1, "head_dim": 32}
    model = write_random_checkpoint(tmp_path / "m", random_config("gemma-3-270m", **shapes))
    out = tmp_path / "a"
    args = [str(model), "--target", "sm89", "--max-seq-len", "32", "--output", str(out)]
    assert build_tool.main([*args, "--quiet"]) == 0
    capsys.readouterr()
    assert inspect_tool.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"model      {model} (gemma3, 1 layer, hidden 64, vocab 512)\n")
    # one layer's cache tensors are all of them: no '... and the same for each of' line
    assert "\n  past_kv_0         bf16     [-1, 2, 32, 32]\n" in text
    assert "the same for each" not in text
