"""Builds and conversions killed outright (kill -9), commands interrupted with Ctrl-C, and two
identical builds at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netdef.artifact import ENGINE_FILE
from tests.tools.cli import run_build, tiny_build_args, with_tokenizer
from weights import gguf_import
from weights.bundled import REQUIRED_FILES, bundled_gguf_path, bundled_model_dir
from weights.gguf_import import GGUFFile

ROOT = Path(__file__).resolve().parents[2]


def start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_once_partial(proc: subprocess.Popen, folder: Path, pattern: str) -> list[Path]:
    """SIGKILL `proc` as soon as a partial matching `pattern` exists in `folder`."""
    while proc.poll() is None:
        if partials := list(folder.glob(pattern)):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return partials
    raise AssertionError(f"finished before a partial appeared: {proc.stderr.read()}")


def test_a_killed_build_is_cleaned_up_by_the_next(tiny_dir, tmp_path):
    out_dir = tmp_path / "a"
    args = tiny_build_args(tiny_dir, out_dir)
    [partial] = kill_once_partial(start("tools.build", *args), tmp_path, ".a.*.partial")
    assert partial.is_dir() and not out_dir.exists()
    done = subprocess.run(
        [sys.executable, "-m", "tools.build", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"Removed what interrupted builds left in {tmp_path}: {partial.name}.\n" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (out_dir / ENGINE_FILE).is_file()


def interrupt_once_partial(proc: subprocess.Popen, folder: Path, pattern: str) -> str:
    """Ctrl-C (SIGINT) to `proc` as soon as a partial matching `pattern` exists in `folder`;
    its stderr after that."""
    while proc.poll() is None:
        if list(folder.glob(pattern)):
            os.kill(proc.pid, signal.SIGINT)
            return proc.communicate(timeout=60)[1]
    raise AssertionError(f"finished before a partial appeared: {proc.stderr.read()}")


def test_ctrl_c_ends_a_build_with_one_line_and_nothing_left(tiny_dir, tmp_path):
    out_dir = tmp_path / "a"
    proc = start("tools.build", *tiny_build_args(tiny_dir, out_dir))
    err = interrupt_once_partial(proc, tmp_path, ".a.*.partial")
    assert proc.returncode == 130
    assert err.endswith("\ninterrupted.\n") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # its staging folder removed, no artifact


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.4])
def test_ctrl_c_while_tensorrt_builds_is_one_line_and_nothing_left(delay, tiny_dir, tmp_path):
    """Ctrl-C once the engine build has started (`delay` s after tools.build says so): the
    KeyboardInterrupt landed inside one of the builder's Python callbacks, where TensorRT
    caught it ("Exception caught in step_complete()"): the build went on and wrote the
    artifact, or failed as "TensorRT could not build the engine", or wrote a truncated
    engine and reported it built. Now the builder is cancelled and nothing is left."""
    proc = start("tools.build", *tiny_build_args(tiny_dir, tmp_path / "a"))
    said = []
    while not said or not said[-1].startswith("Building the engine"):
        said.append(proc.stderr.readline())
        assert said[-1], said
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGINT)
    err = "".join(said) + proc.communicate(timeout=60)[1]
    if proc.returncode == 0:  # the build finished first: it is whole
        assert (tmp_path / "a" / ENGINE_FILE).is_file() and "Engine: " in err, err
        return
    assert proc.returncode == 130, err
    assert err.endswith("\ninterrupted.\n") and "Exception caught" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_ends_a_build_as_ctrl_c_does(tiny_dir, tmp_path):
    """SIGTERM killed the process (-15) and left its staging folder for the next run."""
    proc = start("tools.build", *tiny_build_args(tiny_dir, tmp_path / "a"))
    said = []
    while not said or not said[-1].startswith("KV cache:"):
        said.append(proc.stderr.readline())
        assert said[-1], said
    os.kill(proc.pid, signal.SIGTERM)
    err = "".join(said) + proc.communicate(timeout=60)[1]
    if proc.returncode == 0:  # the build finished first: it is whole
        assert (tmp_path / "a" / ENGINE_FILE).is_file(), err
        return
    assert proc.returncode == 143, err
    assert err.endswith("\nterminated.\n") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_a_command_imports_is_one_line(tiny_dir, tmp_path):
    """A Ctrl-C in a command's first second, while `python -m` still imports it (NumPy,
    ml_dtypes, ...: about a second here), printed an import traceback."""
    proc = start("tools.build", *tiny_build_args(tiny_dir, tmp_path / "a"))
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert (proc.returncode, err) == (130, "interrupted.\n")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_a_command_finished_changes_nothing():
    """A Ctrl-C while the interpreter shuts down (after the command's last line) printed
    "Exception ignored ... KeyboardInterrupt" or ended the process by SIGINT (-2)."""
    code = (
        "import atexit, signal\n"
        "from tools.cli import run\n"
        "atexit.register(signal.raise_signal, signal.SIGINT)\n"
        "run(lambda: print('done') or 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "done\n", "")


@pytest.mark.parametrize("said", ["warning: cut", "a line\n", ""])
def test_interrupted_is_a_line_of_its_own(said):
    """A Ctrl-C between print's text and its newline (a build's warning, CI saw it) or during
    a progress bar glued "interrupted." to that line."""
    code = (
        "import sys\n"
        "from tools.cli import run\n"
        "def main():\n"
        f"    sys.stderr.write({said!r})\n"
        "    raise KeyboardInterrupt\n"
        "run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    expected = said.removesuffix("\n") + "\n" if said else ""
    assert (done.returncode, done.stderr) == (130, expected + "interrupted.\n")


@pytest.mark.parametrize("said", [["warning: ", "cut"], ["a line\n"], ["cut", ""]])
def test_interrupted_is_a_line_of_its_own_after_writelines(said):
    """writelines went to the wrapped stream untracked (LineTracking's __getattr__), so a line
    it left open was glued to "interrupted."."""
    code = (
        "import sys\n"
        "from tools.cli import run\n"
        "def main():\n"
        f"    sys.stderr.writelines({said!r})\n"
        "    raise KeyboardInterrupt\n"
        "run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    expected = "".join(said).removesuffix("\n") + "\n"
    assert (done.returncode, done.stderr) == (130, expected + "interrupted.\n")


def test_ctrl_c_ends_a_serving_benchmark_with_one_line(tmp_path):
    """tools.bench.serve waiting on a server that never answers (it accepts and says
    nothing) is interrupted: one line, status 130, no traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1"
        proc = start("tools.bench.serve", "--url", url, "--model", "m", "--streams", "1")
        server.settimeout(60)
        conn, _ = server.accept()  # the warm-up request is on its way
        with conn:
            os.kill(proc.pid, signal.SIGINT)
            err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert err == "interrupted.\n"


def test_a_killed_random_checkpoint_is_cleaned_up_by_the_next(tmp_path):
    """tools.bench --make-random killed while writing: the next run of the same --out
    removes its partial folder and says so."""
    out = tmp_path / "m"
    proc = start("tools.bench", "--make-random", "gemma-3-270m", "--out", str(out))
    [partial] = kill_once_partial(proc, tmp_path, ".m.*.partial")
    assert partial.is_dir() and not out.exists()
    small = ["--layers", "1", "--hidden", "64", "--intermediate", "128"]
    args = ["--make-random", "gemma-3-270m", "--out", str(out), *small]
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"Removed what interrupted runs left in {tmp_path}: {partial.name}.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_two_identical_builds_at_once_build_once(tiny_dir, tmp_path):
    args = tiny_build_args(tiny_dir, tmp_path / "a")
    procs = [start("tools.build", *args) for _ in range(2)]
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sorted(err.count("\nEngine: ") + err.startswith("Engine: ") for err in errs) == [0, 1]
    assert sum("Reusing" in err for err in errs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no lock or partial left


def test_a_killed_conversion_is_cleaned_up_by_the_next(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = bundled_gguf_path(ROOT / ".cache" / "fixtures")
    for f in (gguf, gguf.with_name(gguf.name + ".sha256.json")):
        (cache / f.name).symlink_to(f)
    proc = start("tools.bundled", "--cache-dir", str(cache))
    [partial] = kill_once_partial(proc, cache, ".gemma-3-270m-*.partial")

    def convert(gguf: GGUFFile, out_dir: Path, progress: bool) -> Path:
        """Stands in for the minute-long conversion, which test_gguf_import covers."""
        out_dir.mkdir()
        for name in REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return out_dir

    monkeypatch.setattr(gguf_import, "write_model_dir", convert)
    folder = bundled_model_dir(cache, progress=False)
    assert f"Removed what interrupted runs left in {cache}: {partial.name}.\n" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [folder.name, gguf.name, gguf.name + ".sha256.json"]
    )


def test_a_closed_stdout_ends_a_command_quietly(tiny_dir, tmp_path, capsys):
    """`| head` closing stdout was a BrokenPipeError traceback; now status 141 (128 +
    SIGPIPE, as git reports it) and nothing on stderr but what came before."""
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "model")
    artifact = tmp_path / "artifact"
    assert run_build(tiny_build_args(lambda _: model, artifact, "--quiet"), capsys)[0] == 0
    generate = [str(model), "--backend", "reference", "--max-seq-len", "32", "--prompt", "w5"]
    for module, args in (
        ("tools.inspect", [str(artifact), "--json"]),
        ("tools.generate", generate),
    ):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first write
        try:
            done = subprocess.run(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(write)
        assert done.returncode == 141, done.stderr
        assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
