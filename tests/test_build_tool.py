"""`python -m tools.build` end to end on the CPU, with the real TensorRT-RTX builder."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from netdef import load_backend
from netdef.artifact import ENGINE_FILE, METADATA_FILE, read_metadata
from tools import build as build_tool
from tools import inspect as inspect_tool
from weights import HubError, load_config, repo_id_for, resolve_model

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
    assert "decode" in text and "prefill" in text
    assert "past_key_0" in text and "logits" in text
    assert inspect_tool.main([str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_metadata(out_dir)
    assert inspect_tool.main([str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("gemma-3-1b-it", "google/gemma-3-1b-it"),
        ("gemma-3-270m-it", "google/gemma-3-270m-it"),
        ("gemma-3-4b-it", "google/gemma-3-4b-it"),
        ("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
        ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
        ("google/gemma-3-1b-it", "google/gemma-3-1b-it"),
    ],
)
def test_short_names(name, repo):
    assert repo_id_for(name) == repo


def test_unknown_short_name_suggests_close_ones():
    with pytest.raises(HubError) as err:
        repo_id_for("gemma-3-1b")
    assert str(err.value) == (
        "unknown model 'gemma-3-1b': it is neither a local folder, a short name nor a Hub repo id. "
        "Did you mean 'gemma-3-1b-pt', 'gemma-3-1b-it', 'gemma-3-12b-it'? Pass a short name (see python -m tools.build --help), "
        "a Hub repo id like google/gemma-3-1b-it, or a local folder."
    )


def test_offline_with_an_empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubError) as err:
        resolve_model("gemma-3-1b-it", progress=False)
    assert str(err.value) == (
        "google/gemma-3-1b-it is not in the local Hugging Face cache and cannot be downloaded (offline mode or no "
        "network); connect and unset HF_HUB_OFFLINE, or pass a local folder."
    )


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the Hub answers for a gated or a missing repo."""

    status, code = 403, "GatedRepo"

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.code)
        self.send_header("X-Error-Message", "Access to this model is restricted")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "restricted"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A loopback HTTP server standing in for huggingface.co; yields a function to set its answer."""
    import huggingface_hub.constants as hf_constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def answer(status: int, code: str) -> None:
        _FakeHub.status, _FakeHub.code = status, code

    yield answer
    server.shutdown()
    server.server_close()


def test_gated_repo_without_token(fake_hub):
    fake_hub(403, "GatedRepo")
    with pytest.raises(HubError) as err:
        resolve_model("llama-3.2-1b-instruct", progress=False)
    assert str(err.value) == (
        "meta-llama/Llama-3.2-1B-Instruct is gated: accept its licence on "
        "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct with your account, then set HF_TOKEN to a "
        "token of that account (or run `hf auth login`)."
    )


def test_repo_not_found(fake_hub):
    fake_hub(404, "RepoNotFound")
    with pytest.raises(HubError) as err:
        resolve_model("someone/no-such-model", progress=False)
    assert str(err.value) == (
        "someone/no-such-model was not found on the Hugging Face Hub; check the name (private repos also need HF_TOKEN)."
    )


def test_no_network(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants as hf_constants

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError) as err:
        resolve_model("qwen3-0.6b", progress=False)
    assert "Qwen/Qwen3-0.6B" in str(err.value)
    assert str(err.value).endswith("pass a local folder.")
