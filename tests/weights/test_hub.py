"""weights.hub: names to repo ids, and huggingface_hub's real download code against a fake Hub.

Downloads run in a subprocess whose environment holds only what the test sets (HF_HOME,
HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), so huggingface_hub reads them exactly as it would for a
user. The Hub is a loopback HTTP server that answers the few endpoints `snapshot_download`
uses, with the Hub's status codes and `X-Error-Code` headers.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from tests.fixtures.tiny import tiny_model_dir
from weights import Checkpoint, HubError, repo_id_for, resolve_model

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        ("gemma-3-270m", "google/gemma-3-270m"),
        ("gemma-3-270m-it", "google/gemma-3-270m-it"),
        ("gemma-3-1b-it", "google/gemma-3-1b-it"),
        ("gemma-3-1b-pt", "google/gemma-3-1b-pt"),
        ("gemma-3-4b-it", "google/gemma-3-4b-it"),
        ("gemma-3-12b-it", "google/gemma-3-12b-it"),
        ("gemma-3-27b-it", "google/gemma-3-27b-it"),
        ("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct"),
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("qwen2.5-3b-instruct", "Qwen/Qwen2.5-3B-Instruct"),
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
        ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
        ("qwen3-4b", "Qwen/Qwen3-4B"),
        ("qwen3-8b", "Qwen/Qwen3-8B"),
        ("Qwen3-0.6B", "Qwen/Qwen3-0.6B"),  # short names ignore case
        ("google/gemma-3-1b-it", "google/gemma-3-1b-it"),  # repo ids pass unchanged
        ("someone/Their-Model", "someone/Their-Model"),
    ],
)
def test_repo_ids(name, repo_id):
    assert repo_id_for(name) == repo_id


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("gemma-3-1b", " Did you mean 'gemma-3-1b-pt', 'gemma-3-1b-it', 'gemma-3-12b-it'?"),
        ("qwen3-0.6", " Did you mean 'qwen3-0.6b', 'qwen3-1.7b', 'qwen3-8b'?"),
        ("mistral-7b", ""),
        ("a/b/c", ""),
    ],
)
def test_unknown_names(name, hint):
    with pytest.raises(HubError) as err:
        resolve_model(name)
    assert str(err.value) == (
        f"unknown model {name!r}: it is neither a local folder, a short name nor a Hub repo id.{hint} "
        "Pass a short name (see python -m tools.build --help), a Hub repo id like "
        "google/gemma-3-1b-it, or a local folder."
    )


@pytest.mark.parametrize("name", ["/no-such-folder", "./no-such-folder", "~/no/such"])
def test_missing_paths_are_not_looked_up_on_the_hub(name):
    """'./nothere' has one '/' and went to huggingface_hub as a repo id: a traceback."""
    with pytest.raises(HubError) as err:
        resolve_model(name)
    assert str(err.value) == (
        f"{name} does not exist; pass a folder with config.json and the safetensors, a .gguf "
        "file, a short name (see python -m tools.build --help) or a Hub repo id."
    )


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_name_is_not_the_current_folder(name, tmp_path, monkeypatch):
    """Path("") is the current folder: an unset shell variable built whatever it held."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubError) as err:
        resolve_model(name)
    assert str(err.value) == (
        "the model name is empty (an unset shell variable?); pass a short name (see python "
        "-m tools.build --help), a Hub repo id, a model folder or a .gguf file."
    )


def test_a_name_no_repo_id_can_be():
    with pytest.raises(HubError) as err:
        resolve_model("someone/two words")
    assert str(err.value).startswith("'someone/two words' is not a Hub repo id: Repo id must use")


def test_a_file_is_not_a_model_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(HubError) as err:
        resolve_model(str(weights))
    assert str(err.value).startswith(f"{weights} is a file, not a model folder; pass a folder")


def test_local_folders_pass_through(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen3-0.6b").mkdir()  # a folder wins over the short name it looks like
    assert resolve_model("qwen3-0.6b") == Path("qwen3-0.6b")


# Downloads --------------------------------------------------------------------------------------

RESOLVE = """
import json, sys
from weights import HubError, resolve_model
try:
    print(json.dumps({"path": str(resolve_model(sys.argv[1], progress=False, **json.loads(sys.argv[2])))}))
except HubError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.fixture
def resolve(tmp_path):
    """`resolve(name, env={...}, **kwargs)`: resolve_model in a fresh process with an empty
    HF_HOME and no HF_* variables but those given; returns {"path": ...} or {"error": ...}."""
    hf_home = tmp_path / "hf_home"

    def run(name: str, env: dict[str, str] | None = None, **kwargs) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        clean.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", **(env or {}))
        done = subprocess.run(
            [sys.executable, "-c", RESOLVE, name, json.dumps(kwargs)],
            env=clean,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(done.stdout.splitlines()[-1])

    run.hf_home = hf_home
    return run


class FakeHub:
    """huggingface.co as `snapshot_download` sees it: repo info, the file tree and file
    downloads of repos served from local folders, and the Hub's errors."""

    _api = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+))")
    _file = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.token: str | None = None  # when set, repos are gated and need this token
        self.failure: int | None = None  # when set, every request gets this status
        self.requests: list[tuple[str, str, str | None]] = []

    def answer(self, req: http.server.BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(req.path).path)
        auth = req.headers.get("Authorization")
        self.requests.append((req.command, path, auth))
        api, file = self._api.fullmatch(path), self._file.fullmatch(path)
        if self.failure:
            return self._send(req, self.failure, b"{}")
        if not (api or file) or (api or file)[1] not in self.repos:
            return self._error(req, 404, "RepoNotFound", "Repository not found")
        if self.token and auth and auth != f"Bearer {self.token}":
            return self._error(req, 401, None, "Invalid credentials in Authorization header")
        if self.token and not auth:
            return self._error(req, 401, "GatedRepo", "Access to this model is restricted.")
        folder = self.repos[(api or file)[1]]
        revision = (api[2] or api[3]) if api else file[2]
        if revision not in ("main", COMMIT):
            return self._error(req, 404, "RevisionNotFound", "Invalid rev id")
        blobs = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        if api and api[2]:
            info = {"id": api[1], "sha": COMMIT, "siblings": [{"rfilename": n} for n in blobs]}
            return self._send(req, 200, json.dumps(info).encode())
        if api:
            tree = [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in blobs.items()
            ]
            return self._send(req, 200, json.dumps(tree).encode())
        if file[3] not in blobs:
            return self._error(req, 404, "EntryNotFound", "Entry not found")
        blob = blobs[file[3]]
        etag = f'"{hashlib.sha1(blob).hexdigest()}"'
        self._send(req, 200, blob, {"X-Repo-Commit": COMMIT, "ETag": etag})

    def _error(self, req, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        self._send(req, status, json.dumps({"error": message}).encode(), headers)

    @staticmethod
    def _send(req, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub
    timeout = 10  # seconds per connection: a stuck client cannot hold a thread

    def do_GET(self) -> None:
        self.hub.answer(self)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def tiny_repo(fake_hub, tmp_path) -> str:
    """someone/tiny-qwen3 on the fake Hub: the tiny qwen3 folder plus files not to download."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_model_dir("qwen3"), folder)
    (folder / "README.md").write_text("# tiny qwen3\n")
    (folder / "pytorch_model.bin").write_bytes(b"not wanted")
    fake_hub.repos["someone/tiny-qwen3"] = folder
    return "someone/tiny-qwen3"


def test_download_through_the_fake_hub(fake_hub, tiny_repo, resolve):
    got = resolve(tiny_repo, env={"HF_ENDPOINT": fake_hub.endpoint})
    snapshot = resolve.hf_home / "hub" / "models--someone--tiny-qwen3" / "snapshots" / COMMIT
    assert got == {"path": str(snapshot)}
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    downloaded, original = Checkpoint.open(snapshot), Checkpoint.open(tiny_model_dir("qwen3"))
    downloaded.validate()
    for name in original.config.tensor_shapes():
        np.testing.assert_array_equal(downloaded.tensor(name), original.tensor(name))

    asked = len(fake_hub.requests)
    offline = resolve(tiny_repo, env={"HF_ENDPOINT": fake_hub.endpoint, "HF_HUB_OFFLINE": "1"})
    assert offline == got and len(fake_hub.requests) == asked  # from the cache, nothing asked


def test_gated_repo_needs_a_token(fake_hub, tiny_repo, resolve):
    fake_hub.token = "hf_secret"
    env = {"HF_ENDPOINT": fake_hub.endpoint}
    assert resolve(tiny_repo, env=env) == {
        "error": f"{tiny_repo} is gated: accept its licence on https://huggingface.co/{tiny_repo} "
        "with your account, then set HF_TOKEN to a token of that account (or run `hf auth login`)."
    }
    assert "path" in resolve(tiny_repo, env=env, token="hf_secret")
    fake_hub.requests.clear()
    assert "path" in resolve(tiny_repo, env={**env, "HF_TOKEN": "hf_secret"})
    assert {auth for _, path, auth in fake_hub.requests if "tiny-qwen3" in path} == {
        "Bearer hf_secret"
    }


def test_invalid_token(fake_hub, tiny_repo, resolve):
    fake_hub.token = "hf_secret"
    got = resolve(tiny_repo, env={"HF_ENDPOINT": fake_hub.endpoint, "HF_TOKEN": "hf_stale"})
    assert got == {
        "error": f"the Hugging Face Hub refused access to {tiny_repo} (HTTP 401); set HF_TOKEN to "
        "a valid token that may read it (or run `hf auth login`), or unset HF_TOKEN for public models."
    }


def test_repo_not_found(fake_hub, resolve):
    assert resolve("someone/no-such-model", env={"HF_ENDPOINT": fake_hub.endpoint}) == {
        "error": "someone/no-such-model was not found on the Hugging Face Hub; check the name "
        "(private repos also need HF_TOKEN)."
    }


def test_revision_not_found(fake_hub, tiny_repo, resolve):
    assert resolve(tiny_repo, env={"HF_ENDPOINT": fake_hub.endpoint}, revision="v9") == {
        "error": f"{tiny_repo} has no revision 'v9'; pass an existing branch, tag or commit."
    }


def test_hub_failure(fake_hub, resolve):
    fake_hub.failure = 500
    assert resolve("qwen3-0.6b", env={"HF_ENDPOINT": fake_hub.endpoint}) == {
        "error": "the Hugging Face Hub answered HTTP 500 for Qwen/Qwen3-0.6B; try again later, "
        "or pass a local folder."
    }


def test_offline_with_an_empty_cache(resolve):
    assert resolve("gemma-3-1b-it", env={"HF_HUB_OFFLINE": "1"}) == {
        "error": "google/gemma-3-1b-it is not in the local Hugging Face cache and HF_HUB_OFFLINE "
        "is set; unset HF_HUB_OFFLINE to download it, download it beforehand, or pass a local folder."
    }


def test_no_network(resolve):
    with socket.socket() as s:  # a loopback port that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert resolve("qwen3-0.6b", env={"HF_ENDPOINT": endpoint}) == {
        "error": f"cannot reach the Hugging Face Hub at {endpoint} to download Qwen/Qwen3-0.6B, "
        "which is not in the local cache either; check the network connection, or pass a local folder."
    }
