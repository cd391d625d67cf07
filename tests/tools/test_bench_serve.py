"""tools.bench.serve's refusals: bad options before a server starts, and a server's error or an
unreachable URL as one line (the load test itself is in test_serve_http.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from runtime.cuda_buffers import gpu_unavailable_reason
from tests.tools.cli import free_port, run_build, with_tokenizer
from tools.bench import serve as bench
from tools.cli import Terminated


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds must be at least 1."),
        (["--max-tokens", "0"], "--max-tokens must be at least 1."),
        (["--prompt-tokens", "0"], "--prompt-tokens must be at least 1."),
        (["--max-batch", "0"], "--max-batch must be at least 1."),
        (["--max-seq-len", "-1"], "--max-seq-len must be at least 1."),
        (["--top-k", "-1"], "--top-k: top_k=-1 must be >= 0 (0 disables it)."),
        (["--temperature", "-1"], "--temperature: temperature=-1.0 must be >= 0 (0 is greedy)."),
        (["--temperature", "nan"], "--temperature: temperature=nan must be a finite number."),
        (["--top-p", "0"], "--top-p: top_p=0.0 must be in (0, 1]."),
        (["--json", "/no/such/folder/out.json"], "--json: /no/such/folder is not a folder."),
        (["--json", "/"], "--json: / is a folder; name the file to write, e.g. /bench.json."),
    ],
)
def test_bad_options_are_refused_before_a_server_starts(args, message, capsys):
    """--rounds 0 gave a TypeError after the run; the sampling ones an openai traceback from
    the server's 400; --max-batch 0 was taken."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--url", "http://127.0.0.1:8000/v1", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m tools.bench.serve: error: {message}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "pass an artifact or model folder to serve, or --url of a running server."),
        (
            ["art", "--url", "http://127.0.0.1:8000/v1"],
            "art starts a server and --url measures one already running; pass only one of them.",
        ),
    ],
)
def test_a_folder_or_a_url_is_needed_and_only_one(args, message, capsys):
    """Both cases said "give an artifact or model folder, or --url of a running server (not
    both).", which read as if both were wrong at once."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m tools.bench.serve: error: {message}"
    )


@pytest.fixture
def no_server(monkeypatch):
    """Any python -m tools.serve started fails the test: what is refused, is before it."""

    def popen(cmd: list[str]):
        raise AssertionError(f"a server was started: {cmd}")

    monkeypatch.setattr(bench.subprocess, "Popen", popen)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "nope",
            "{model} does not exist; pass an artifact folder from python -m tools.build, or a "
            "Hugging Face model folder with --backend reference.",
        ),
        (
            "notes.txt",
            "{model} is a file, not a folder; pass an artifact folder from python -m "
            "tools.build, or a Hugging Face model folder with --backend reference.",
        ),
        (
            "tiny",
            "{model} is not an engine artifact; build one with python -m tools.build, or use "
            "--backend reference.",
        ),
    ],
)
def test_a_model_the_server_would_refuse_is_one_line_before_it_starts(
    model, message, tiny_dir, tmp_path, no_server, capsys
):
    """The server said it, then the benchmark 'error: the server did not start (exit code
    1).', after seconds of the server's imports."""
    with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    (tmp_path / "notes.txt").write_text("mine")
    model = tmp_path / model
    assert bench.main([str(model), "--streams", "1"]) == 1
    assert capsys.readouterr().err == f"error: {message.format(model=model)}\n"


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="this machine has a GPU")
def test_an_artifact_without_a_gpu_is_one_line_before_a_server_starts(
    tiny_dir, tmp_path, no_server, capsys
):
    """The server said the TensorRT backend needs a GPU, then the benchmark 'error: the
    server did not start (exit code 1).'"""
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    artifact = tmp_path / "a"
    args = [str(model), "--target", "sm89", "--max-seq-len", "32", "--output", str(artifact)]
    assert run_build([*args, "--quiet"], capsys)[0] == 0
    assert bench.main([str(artifact), "--streams", "1"]) == 1
    assert capsys.readouterr().err == (
        f"error: the TensorRT backend needs cuda-python and a CUDA GPU, but "
        f"{gpu_unavailable_reason()}; on the CPU, measure the artifact's network with "
        "--backend reference.\n"
    )


def test_requests_longer_than_the_context_are_refused_before_a_server_starts(
    tiny_dir, tmp_path, no_server, capsys
):
    """The defaults (128 prompt tokens, 64 new ones) on a 64-position cache: the server
    started, then refused the warm-up request (a 400 naming max_tokens, not the flags)."""
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    artifact = tmp_path / "a"
    args = [str(model), "--target", "sm89", "--max-seq-len", "64", "--output", str(artifact)]
    assert run_build([*args, "--quiet"], capsys)[0] == 0
    assert bench.main([str(model), "--backend", "reference", "--max-seq-len", "64"]) == 1
    assert capsys.readouterr().err == (
        "error: --prompt-tokens 128 and --max-tokens 64 need 192 positions, more than "
        "--max-seq-len 64; lower them or raise --max-seq-len.\n"
    )
    assert bench.main([str(artifact), "--backend", "reference", "--max-tokens", "8"]) == 1
    assert capsys.readouterr().err == (
        f"error: --prompt-tokens 128 and --max-tokens 8 need 136 positions, more than "
        f"{artifact}'s max_seq_len of 64; lower them, or build the artifact with a larger "
        "--max-seq-len.\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--url", "http://127.0.0.1:8000/v1", "--dtype", "float32"],
            "--dtype sets up the server this command starts; the one at --url runs as it was "
            "started.",
        ),
        (
            ["--url", "http://127.0.0.1:8000/v1", "--backend", "reference"],
            "--backend sets up the server this command starts; the one at --url runs as it was "
            "started.",
        ),
        (
            ["art", "--max-seq-len", "128"],
            "--max-seq-len applies to the reference backend; an artifact runs as built.",
        ),
        (
            ["art", "--max-batch", "4"],
            "--max-batch applies to the reference backend; an artifact runs as built.",
        ),
    ],
)
def test_server_options_that_would_be_ignored_are_refused(args, message, capsys):
    """They were dropped silently: with --url the running server's settings held (and the
    report said backend 'tensorrt' whatever it ran), and on TensorRT the artifact's."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m tools.bench.serve: error: {message}"
    )
    assert bench.parse_args(["--url", "http://127.0.0.1:8000/v1"]).backend is None
    assert bench.parse_args(["art"]).backend == "tensorrt"


def test_an_unreachable_url_is_one_line(capsys):
    """It was a 31-frame APIConnectionError traceback."""
    url = f"http://127.0.0.1:{free_port()}/v1"  # a port nothing listens on
    assert bench.main(["--url", url, "--streams", "1"]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot reach the server at {url}: [Errno 111] Connection refused\n"
    )


def test_a_request_the_server_refuses_is_its_message(tiny_dir, tmp_path, capsys):
    """A model the server does not serve: the server's own words, not a traceback (a prompt
    too long for the context, this test's case before, is now refused before the server
    starts: test_requests_longer_than_the_context_are_refused_before_a_server_starts)."""
    tiny = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    args = [str(tiny), "--backend", "reference", "--max-seq-len", "64", "--streams", "1"]
    assert bench.main([*args, "--model", "nope", "--prompt-tokens", "4", "--max-tokens", "4"]) == 1
    tail = " refused a request (404): the model 'nope' does not exist; this server serves 'tiny'.\n"
    assert re.fullmatch(
        r"error: the server at http://127\.0\.0\.1:\d+/v1" + re.escape(tail),
        capsys.readouterr().err,
    )


def test_one_token_per_request_has_no_inter_token_latency(tiny_dir, tmp_path, capsys):
    """It printed nothing and died on formatting the missing ITL percentiles (None); one
    stream is '1 stream:', in the column of 'streams:' (it was '1 streams:')."""
    tiny = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    args = [str(tiny), "--backend", "reference", "--max-seq-len", "64", "--streams", "1"]
    once = ["--rounds", "1", "--prompt-tokens", "4", "--max-tokens", "1"]
    assert bench.main([*args, *once, "--json", str(tmp_path / "r.json")]) == 0
    row = r"  1 stream:  +[\d.]+ tok/s  TTFT p50 +[\d.]+ p99 +[\d.]+ ms  "
    assert re.fullmatch(row + r"ITL p50       - p99       - ms\n", capsys.readouterr().out)
    [level] = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert level["streams"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "tiny"]  # no partial file


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_a_server_still_starting_is_stopped_with_the_benchmark(stop, monkeypatch):
    """A Ctrl-C or SIGTERM (tools.cli raises both as KeyboardInterrupt) while the server was
    starting left it running on its own: python -m tools.serve outlived the benchmark."""
    started, real_popen = [], subprocess.Popen

    def popen(cmd: list[str]) -> subprocess.Popen:  # a server that never gets ready
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return started[-1]

    def urlopen(*args, **kwargs):
        raise stop

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(bench.urllib.request, "urlopen", urlopen)
    try:
        with pytest.raises(stop):
            bench.start_server(bench.parse_args(["art"]))
        assert started[0].poll() == -15  # terminated, and waited for
    finally:
        started[0].kill()
        started[0].wait()
