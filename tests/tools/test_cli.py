"""The command-line checks anyone can run: tools.logits and tools.generate on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools import build as build_tool
from tools import bundled as bundled_tool
from tools import eval as eval_tool
from tools import generate as generate_tool
from tools import gpu_check as gpu_check_tool
from tools import inspect as inspect_tool
from tools import logits as logits_tool
from tools import serve as serve_tool
from tools.bench import __main__ as bench_main
from tools.bench import serve as bench_serve


def test_logits_cli_matches_transformers(tiny_dir, hf_model, tmp_path, capsys):
    path = tiny_dir("gemma3")
    seqs = [[5, 17, 301, 44, 9, 250, 3, 77, 12, 400], [8, 3, 99, 41, 7, 6]]
    out = tmp_path / "logits.npy"
    args = [str(path), "--prefill", "4", "--out", str(out)]
    for s in seqs:
        args += ["--ids", ",".join(map(str, s))]
    assert logits_tool.main(args) == 0
    out_text, err = capsys.readouterr()
    assert out_text == ""  # nothing but progress (stderr) and errors
    assert err.endswith(
        f"Saved float32 logits [2, 10, 512] to {out} (NaN past a shorter sequence's end).\n"
    )
    logits = np.load(out)
    assert logits.shape == (2, 10, 512) and logits.dtype == np.float32
    model = hf_model(path, torch.float32)
    for b, s in enumerate(seqs):
        with torch.no_grad():
            ref = model(torch.tensor([s])).logits[0].numpy()
        assert np.abs(logits[b, : len(s)] - ref).max() <= 1e-3 * np.abs(ref).max()
        assert np.isnan(logits[b, len(s) :]).all()


def test_logits_cli_single_sequence_shape(tiny_dir, tmp_path, capsys):
    out = tmp_path / "one"  # np.save adds .npy: the message names the file written
    assert logits_tool.main([str(tiny_dir("qwen2")), "--ids", "1,2,3,4", "--out", str(out)]) == 0
    assert np.load(tmp_path / "one.npy").shape == (4, 512)
    assert capsys.readouterr().err.endswith(
        f"Saved float32 logits [4, 512] to {tmp_path / 'one.npy'}.\n"
    )


def test_logits_cli_rejects_bad_ids(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        logits_tool.main(
            [str(tiny_dir("llama")), "--ids", "1,2,512,900", "--out", str(tmp_path / "x.npy")]
        )
    assert str(err.value) == (
        "error: token ids [512, 900] in the prompt are outside the vocabulary [0, 512)."
    )
    with pytest.raises(SystemExit) as err:  # of several --ids, the error says which (from 0)
        logits_tool.main(
            [
                str(tiny_dir("llama")),
                "--ids",
                "1,2",
                "--ids=-3,7,-3",
                "--out",
                str(tmp_path / "x.npy"),
            ]
        )
    assert (
        str(err.value) == "error: token ids [-3] in prompt 1 are outside the vocabulary [0, 512)."
    )
    with pytest.raises(SystemExit) as err:  # argparse said "--ids: expected one argument"
        logits_tool.main(
            [str(tiny_dir("llama")), "--ids", "-1,3", "--out", str(tmp_path / "x.npy")]
        )
    assert str(err.value) == (
        "error: token ids [-1] in the prompt are outside the vocabulary [0, 512)."
    )
    with pytest.raises(SystemExit):
        logits_tool.main([str(tiny_dir("llama")), "--ids", "1,x", "--out", str(tmp_path / "x.npy")])
    assert "--ids takes comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 0 was read as "all of them"
        logits_tool.main(
            [
                str(tiny_dir("llama")),
                "--ids",
                "1,2,3",
                "--prefill",
                "0",
                "--out",
                str(tmp_path / "x.npy"),
            ]
        )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m tools.logits: error: --prefill 0 must be between 1 and the longest sequence (3)"
    )
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    ("main", "args", "argument"),
    [
        (inspect_tool.main, [""], "ARTIFACT"),
        (logits_tool.main, ["", "--ids", "1", "--out", "x.npy"], "MODEL_DIR"),
        (logits_tool.main, ["m", "--ids", "1", "--out", ""], "--out"),
        (bundled_tool.main, ["--cache-dir", ""], "--cache-dir"),
        (bench_serve.main, [""], "ARTIFACT_OR_MODEL"),
        (bench_serve.main, ["--url", "http://127.0.0.1:8000/v1", "--json", ""], "--json"),
        (build_tool.main, ["bundled", "--output", ""], "--output"),
        (build_tool.main, ["bundled", "--calib-file", ""], "--calib-file"),
        (eval_tool.main, ["", "--text", "t.txt"], "model_dir"),
        (eval_tool.main, ["m", "--text", ""], "--text"),
        (generate_tool.main, ["", "--prompt", "hi"], "model"),
        (serve_tool.main, [""], "model"),
        (bench_main.main, ["--make-random", "gemma-3-270m", "--out", ""], "--out"),
        (bench_main.main, ["m", "--json", ""], "--json"),
    ],
)
def test_an_empty_path_is_refused(main, args, argument, tmp_path, monkeypatch, capsys):
    """An unset shell variable ("$ARTIFACT") was the current folder: tools.bundled converted
    the model into it, tools.logits --out "" wrote '..npy' there, and the others said '. is
    a folder' or named the current folder, not what was passed."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m {main.__module__.removesuffix('.__main__')}: error: argument {argument}: "
        "the path is empty (an unset shell variable?)."
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("main", "lines"),
    [
        (inspect_tool.main, ["usage: python -m tools.inspect [-h] [--json] ARTIFACT"]),
        (
            logits_tool.main,
            [
                "  MODEL_DIR             Hugging Face model folder (config.json + safetensors)",
                "                        default: float32",
                "  --out OUT             the .npy file to write (.npy is added where missing)",
            ],
        ),
        (
            gpu_check_tool.main,
            ["  --launches LAUNCHES  steps timed per launch mode (default 1000)"],
        ),
        (
            bench_serve.main,
            [
                "  ARTIFACT_OR_MODEL     artifact, or model folder with --backend reference",
                "                        the server's backend (default: tensorrt)",
                "  --top-p TOP_P         default 1: none",
            ],
        ),
    ],
)
def test_help_names_arguments_as_the_docs_do_and_says_defaults(main, lines, monkeypatch, capsys):
    """The positionals were 'artifact', 'model_dir' and 'model_path' (README and the
    docstrings say ARTIFACT, MODEL_DIR), and tools.logits --dtype, tools.gpu_check
    --launches, tools.bench.serve --backend and --top-p had no default in --help."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line not in out] == []


def test_generate_cli_streams_transformers_greedy_text(gemma3_270m_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The three primary colors are"
    tok = AutoTokenizer.from_pretrained(gemma3_270m_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=10, do_sample=False)
    expected = tok.decode(full[0, ids.shape[1] :], skip_special_tokens=True)
    args = [
        str(gemma3_270m_dir),
        "--backend",
        "reference",
        "--dtype",
        "float32",
        "--max-seq-len",
        "64",
    ]
    assert generate_tool.main([*args, "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "10 generated (length)" in err and "ms/token" in err


def test_generate_cli_chat_without_template_is_one_clear_error(gemma3_270m_dir, capsys):
    args = [
        str(gemma3_270m_dir),
        "--backend",
        "reference",
        "--max-seq-len",
        "32",
        "--chat",
        "--prompt",
        "Hi",
    ]
    assert generate_tool.main(args) == 1
    assert capsys.readouterr().err == (
        f"error: The model in {gemma3_270m_dir} has no chat template; send plain text prompts, or add "
        "a chat_template to its tokenizer_config.json.\n"
    )


def test_generate_cli_needs_an_artifact_for_tensorrt(gemma3_270m_dir, tmp_path, capsys):
    from tools import serve as serve_tool

    # a folder without a tokenizer either was refused for that, not for what it is
    for folder in (gemma3_270m_dir, tmp_path):
        expected = (
            f"error: {folder} is not an engine artifact; build one with python -m tools.build, "
            "or use --backend reference.\n"
        )
        assert generate_tool.main([str(folder), "--prompt", "x"]) == 1
        assert capsys.readouterr().err == expected
    assert serve_tool.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == expected


def test_logits_cli_sequence_longer_than_the_model_allows(tiny_dir, tmp_path):
    """It said "choose a smaller --max-seq-len", an option tools.logits does not have."""
    ids = ",".join(["7"] * 300)
    with pytest.raises(SystemExit) as err:
        logits_tool.main([str(tiny_dir("llama")), "--ids", ids, "--out", str(tmp_path / "x.npy")])
    assert str(err.value) == (
        "error: a sequence of 300 ids is longer than the model's context (256 positions); "
        "pass at most 256 ids per --ids."
    )


def test_generate_cli_interactive_chat_keeps_the_conversation(
    gemma3_270m_dir, tmp_path, monkeypatch, capsys
):
    """No --prompt: a chat loop; each turn is rendered with every earlier turn and reply."""
    import json

    from runtime.tokenizer import Tokenizer
    from tests.fixtures.templates import GEMMA3_TEMPLATE

    folder = tmp_path / "chat-model"
    folder.mkdir()
    for f in gemma3_270m_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "tokenizer_config.json").unlink()
    config = json.loads((gemma3_270m_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": GEMMA3_TEMPLATE})
    )

    seen: list[list[dict]] = []
    real = Tokenizer.encode_chat
    monkeypatch.setattr(
        Tokenizer, "encode_chat", lambda self, m, **kw: seen.append(list(m)) or real(self, m, **kw)
    )
    lines = iter(["Hello there", "And again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = [
        str(folder),
        "--backend",
        "reference",
        "--dtype",
        "float32",
        "--max-seq-len",
        "128",
        "--max-new-tokens",
        "4",
    ]
    assert generate_tool.main(args) == 0
    assert [m["role"] for m in seen[0]] == ["user"]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "Hello there" and seen[1][2]["content"] == "And again"
    assert seen[1][1]["content"] and seen[1][1]["content"] in capsys.readouterr().out


@pytest.mark.parametrize("chat", [[], ["--chat"]], ids=["plain", "chat"])
def test_generate_cli_interactive_on_a_base_model_says_so_and_continues_text(
    chat, tiny_dir, tmp_path, monkeypatch, capsys
):
    """No chat template: said before the first line, and each line is continued as text."""
    from tests.tools.cli import with_tokenizer

    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    lines = iter(["w5 w6", "w7", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = [str(model), "--backend", "reference", "--max-seq-len", "32", "--max-new-tokens", "3"]
    assert generate_tool.main([*args, *chat]) == 0
    err = capsys.readouterr().err
    assert err.startswith(  # 3 layers x 32 slots x 1 KV head x 16 x (key, value) x 2 bytes
        "KV caches: 6.0 KiB for 1 sequence(s) of up to 32 tokens\n"
        f"{model} is a base model (no chat template), so each line is continued as plain text, "
        "without the earlier lines (empty line or Ctrl-D to quit).\n"
    )
    assert "[2 prompt tokens, 3 generated" in err and "[1 prompt tokens, 3 generated" in err


def tiny_chat_model(tiny_dir, folder):
    """The tiny llama with a word-level tokenizer and Gemma-3's chat template (BOS "w2")."""
    import json

    from tests.fixtures.templates import GEMMA3_TEMPLATE
    from tests.tools.cli import with_tokenizer

    model = with_tokenizer(tiny_dir("llama"), folder)
    config = {"chat_template": GEMMA3_TEMPLATE, "bos_token": "w2", "eos_token": "w1"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_generate_cli_piped_chat_outgrowing_the_cache_goes_on(tiny_dir, tmp_path):
    """Piped lines: the conversation outgrew max_seq_len and the session ended with status
    1; the `> ` prompts went to stdout between the replies. Now the oldest exchanges are
    dropped (said on stderr), a line too long by itself is refused, and stdout holds the
    replies alone."""
    import subprocess
    import sys

    from tests.tools.cli import ROOT

    model = tiny_chat_model(tiny_dir, tmp_path / "model")
    long_line = " ".join(f"w{i}" for i in range(10, 60))
    lines = ["w5 w6", "w7 w8 w9", long_line, "w10", "w11 w12"]
    args = ["--backend", "reference", "--max-seq-len", "48", "--max-new-tokens", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "tools.generate", str(model), *args],
        cwd=ROOT,
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr.splitlines()
    assert "> " not in done.stdout and "> " not in done.stderr
    assert len(done.stdout.splitlines()) == 4  # one reply per line but the long one
    assert sum(" generated (length); prefill " in e for e in err) == 4
    assert (
        "error: the prompt has 62 tokens; with max_new_tokens=8 that exceeds the engine's "
        "max_seq_len=48. Shorten the prompt, lower max_new_tokens, use an engine with a larger "
        "max_seq_len (--max-seq-len, up to the model's context, 256), or allow truncation. "
        "(--truncate keeps the prompt's last tokens, after its BOS.)"
    ) in err
    assert "(the conversation outgrew max_seq_len=48: dropped its oldest 1 exchange(s))" in err


def test_generate_cli_prompts_on_stderr_when_typed(tiny_dir, tmp_path, monkeypatch, capsys):
    """A terminal gets a `> ` before each line, on stderr: stdout holds the replies alone."""
    from tests.tools.cli import with_tokenizer

    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    lines = iter(["w5 w6", "w7", ""])
    # input() writes its prompt to stdout
    monkeypatch.setattr("builtins.input", lambda prompt="": print(prompt, end="") or next(lines))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    args = [str(model), "--backend", "reference", "--max-seq-len", "32", "--max-new-tokens", "3"]
    assert generate_tool.main(args) == 0
    out, err = capsys.readouterr()
    assert err.count("> ") == 3 and "> " not in out


def test_generate_cli_ends_the_text_s_line_when_interrupted(capsys):
    """A SIGTERM mid-stream printed 'terminated.' glued to the text ('...hunterterminated.')
    where stdout and stderr share a terminal or file."""
    from runtime.generate import Delta

    def cut_short():
        yield Delta(0, "a great hunter")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_tool.stream(cut_short())
    assert capsys.readouterr().out == "a great hunter\n"
