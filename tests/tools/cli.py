"""Helpers of the tools tests: run python -m tools.build in-process, the usual tiny build,
a tiny checkpoint with a tokenizer, tools.generate's text for a prompt, and a live
python -m tools.serve on a loopback port."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from tools import build as build_tool
from tools import generate as generate_tool

ROOT = Path(__file__).resolve().parents[2]
SEQ = 256  # the tiny fixtures' max_position_embeddings


def run_build(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # not what making a fixture printed
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


def generate_text(model: Path, prompt: str, tokens: int, capsys, *extra: str) -> str:
    """tools.generate's output for the prompt (greedy, float32 reference)."""
    args = [str(model), "--backend", "reference", "--dtype", "float32", "--max-seq-len", str(SEQ)]
    assert (
        generate_tool.main([*args, *extra, "--prompt", prompt, "--max-new-tokens", str(tokens)])
        == 0
    )
    return capsys.readouterr().out.removesuffix("\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(port: int, path: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(port: int) -> dict:
    return json.loads(get(port, "/health")[1])


def metric(port: int, name: str) -> float:
    """A series' value from /metrics (0 when absent)."""
    for line in get(port, "/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class LiveServer:
    """`python -m tools.serve MODEL ARGS` on a free loopback port, up until /health answers."""

    def __init__(self, model: Path, *args: str, startup_s: float = 180.0):
        self.port = free_port()
        cmd = [sys.executable, "-m", "tools.serve", str(model), "--backend", "reference"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(lambda: self.proc.poll() is not None or health(self.port), startup_s)
        except BaseException:
            self.stop()
            raise
        assert self.proc.poll() is None, self.proc.stdout.read()
        import openai  # here, so the GPU tests can use the helpers above without it

        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
