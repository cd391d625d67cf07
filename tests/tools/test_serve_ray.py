"""`python -m tools.serve --ray-replicas 2` on a local Ray cluster the server starts and stops
(reference backend, tiny fixture): both replicas answer, each text equals tools.generate's,
and SIGTERM tears the cluster down with exit code 0.

Ray's startup (a local cluster, the Serve controller and proxy, two replicas loading the
model) takes ~30 s on two shared cores; `ray` marks it so `-m "not ray"` can leave it out.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import openai
import pytest

from tests.tools.cli import LiveServer, generate_text, run_build, with_tokenizer
from tools import serve as serve_tool
from tools.serve_ray import remedy, replica_failure, short_of

pytestmark = pytest.mark.ray


def test_two_replicas_serve_the_same_answers(tiny_dir, tmp_path, capsys):
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    prompts = [" ".join(f"w{5 + 11 * i + j}" for j in range(2 + i % 4)) for i in range(8)]
    expected = [generate_text(model, p, 24, capsys) for p in prompts]
    server = LiveServer(
        model,
        "--dtype",
        "float32",
        "--max-seq-len",
        "256",
        "--max-batch",
        "2",
        "--ray-replicas",
        "2",
        "--max-queue",  # the 8 requests fit the replicas' rows and the next ones to prefill;
        "1",  # each replica's engine took only 1 beyond its rows and refused (429) the rest
        startup_s=300,
    )
    try:

        async def read(stream):
            chunks = [c async for c in stream]
            return chunks[0].id.split("-")[1], "".join(c.choices[0].text for c in chunks)

        async def load():
            """The requests opened one after another (each admitted by a replica before the
            next, so Ray's own queue holds at most one), then read together: each replica
            holds 2 running and 2 waiting."""
            client = openai.AsyncOpenAI(base_url=server.client.base_url, api_key="-", max_retries=0)
            streams = [
                await client.completions.create(
                    model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True
                )
                for p in prompts
            ]
            return await asyncio.wait_for(asyncio.gather(*(read(s) for s in streams)), 120)

        answers = asyncio.run(load())
        assert [text for _, text in answers] == expected
        assert len({pid for pid, _ in answers}) == 2  # both replicas took requests
        with pytest.raises(openai.NotFoundError):  # the app's own errors, through the proxy
            server.client.completions.create(model="other", prompt="w5")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()


def test_more_replicas_than_the_cluster_can_place_are_refused(tiny_dir, tmp_path):
    """Ray Serve waited forever, saying nothing, for replicas a local cluster could not place
    (8 TensorRT replicas on a machine without a GPU hung after Ray's start-up lines)."""
    replicas = os.cpu_count() + 1
    model = with_tokenizer(tiny_dir("llama"), tmp_path / "tiny")
    args = [str(model), "--backend", "reference", "--ray-replicas", str(replicas)]
    done = subprocess.run(
        [sys.executable, "-m", "tools.serve", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith(
        f"error: --ray-replicas {replicas} needs {replicas} CPUs (one per replica); the Ray "
        f"cluster has {os.cpu_count()}; start fewer replicas.\n"
    ), done.stderr


def test_a_tensorrt_replica_needs_a_gpu():
    need = {"GPU": 1, "CPU": 1}
    assert short_of({"CPU": 64.0}, need, 8) == (
        "--ray-replicas 8 needs 8 GPUs (one per replica); the Ray cluster has 0"
    )
    assert short_of({"CPU": 8.0, "GPU": 8.0}, need, 8) is None
    assert short_of({"CPU": 8.0}, need, 1) == (
        "--ray-replicas 1 needs 1 GPU (one per replica); the Ray cluster has 0"
    )
    # "start fewer replicas" was the advice for a machine without a GPU too
    assert remedy({"CPU": 64.0}, need) == (
        "Ray sees no GPU on this machine: serve the engine where it does (--ray-address of a "
        "cluster with GPUs), or its network on the CPU with --backend reference"
    )
    assert remedy({"CPU": 64.0, "GPU": 2.0}, need) == "start fewer replicas"
    assert remedy({"CPU": 1.0}, {"GPU": 0, "CPU": 1}) == "start fewer replicas"


def test_what_any_replica_would_refuse_is_said_before_ray_starts(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """A folder without a tokenizer started a Ray cluster (~20 s), whose replicas failed
    one by one in Ray's logs, and the command ended in Ray's traceback: "RuntimeError:
    Deploying application trt-netdef failed: Failed to update the deployments ['llm']"."""

    def ray_started(*args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("tools.serve_ray.run_on_ray", ray_started)
    bare = tiny_dir("llama")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    tiny = with_tokenizer(bare, tmp_path / "tiny")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny / name, no_weights)
    artifact = tmp_path / "artifact"
    args = [str(tiny), "--target", "sm89", "--max-seq-len", "32", "--quiet"]
    assert run_build([*args, "--output", str(artifact)], capsys)[0] == 0
    ray = ["--backend", "reference", "--ray-replicas", "1"]
    cases = {
        f"{artifact} --dtype float32": f"{artifact} runs as built (bfloat16, max_seq_len 32); "
        "--dtype and --max-seq-len choose a model folder's network: drop them, or build "
        "another artifact with python -m tools.build.",
        str(bare): f"{bare} has no tokenizer.json; point at a Hugging Face model folder that "
        "includes its tokenizer files.",
        str(no_weights): f"{no_weights} has no model.safetensors or "
        "model.safetensors.index.json; point to a Hugging Face folder with safetensors weights.",
    }
    for model, message in cases.items():
        assert serve_tool.main([*model.split(), *ray]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"


def test_a_replica_that_fails_to_start_is_one_error_line():
    """What the driver could not check (a GPU's fault, on the replica) is the replica's own
    exception, from serve.status(), not Ray's traceback."""
    failed = SimpleNamespace(
        message="Traceback (most recent call last):\n  File ...\n"
        "runtime.cuda_buffers.CudaError: cudaMalloc failed: out of memory\n"
    )
    status = SimpleNamespace(
        applications={"trt-netdef": SimpleNamespace(deployments={"llm": failed})}
    )
    assert replica_failure(status) == (
        "the Ray Serve replicas failed to start: cudaMalloc failed: out of memory (Ray's logs, "
        "under /tmp/ray/session_latest/logs/serve/, hold the rest)"
    )
    assert replica_failure(SimpleNamespace(applications={})).startswith(
        "the Ray Serve replicas failed to start: no reason given ("
    )
