"""tools.bench: the CPU modes end to end on tiny fixtures, and the GPU mode's pure parts.

No assertion here depends on how fast anything ran: timings are only checked to be positive
(or, with a stand-in backend that reports fixed call times, to be exactly those numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from runtime.cpu import CpuBackend
from runtime.cuda_buffers import gpu_unavailable_reason
from tests.fixtures.tiny_quant import tiny_quant_dir
from tools.bench import BenchError, gpu
from tools.bench.__main__ import int_list, main, parse_args
from tools.bench.cgroup import CGROUP_ROOT, MemoryCgroup, own_cgroup
from tools.bench.gpu import gpu_tables, jit_cache_words, new_shapes_table
from tools.bench.host import SERVER_SETTINGS, SETTINGS
from tools.bench.random_model import random_config, write_random_checkpoint
from tools.bench.report import busy_warning, fmt, fmt_bytes, format_table
from tools.bench.roofline import (
    decode_read_bytes,
    floor_ms,
    kv_read_bytes,
    roofline_rows,
    weight_read_bytes,
)
from tools.bench.timing import (
    HF_MODES,
    Plan,
    measure_decode,
    measure_new_shapes,
    measure_prefill,
    plan_shapes,
    prompt_ids,
    transformers_gpu,
)
from weights import Checkpoint, load_config, parse_config


def positive(*values) -> bool:
    return all(isinstance(v, int | float) and v > 0 and math.isfinite(v) for v in values)


# ---- CPU modes, end to end ----


def test_build_mode_writes_per_build_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "build.json"
    model = str(tiny_dir("llama"))
    assert main(["--build", model, "--max-seq-len", "64", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "engine builds (tensorrt_rtx, target sm89, bfloat16, max_seq_len 64" in table
    report = json.loads(out.read_text())
    assert report["kind"] == "build"
    assert {"python", "numpy", "tensorrt_rtx"} <= set(report["versions"])
    assert report["machine"]["cpu_count"] >= 1
    (build,) = report["builds"]
    assert build["model"] == model and build["options"]["target"] == "sm89"
    assert positive(
        build["wall_s"],
        build["build_s"],
        build["network_s"],
        build["builder_s"],
        build["peak_rss_bytes"],
        build["checkpoint_bytes"],
        build["engine_bytes"],
        build["peak_rss_x_checkpoint"],
    )
    assert build["build_s"] < build["wall_s"]  # the child process does more than build()
    assert build["checkpoint_bytes"] == (tiny_dir("llama") / "model.safetensors").stat().st_size
    # RSS at the phases (the builder call instrumented), and the polled builder peak.
    assert {"imported", "before_network", "before_builder", "after_builder"} <= set(build["rss"])
    assert positive(*(build["rss"][p]["VmRSS"] for p in build["rss"]))
    assert build["rss"]["before_builder"]["VmRSS"] <= build["peak_rss_bytes"]
    assert positive(build["polled_peak_in_builder"]["rss"], build["polls"])


def test_build_mode_refuses_a_missing_model_before_any_build(tiny_dir, tmp_path, capsys):
    """Each model was resolved in its own child build: one that named nothing failed with the
    child's traceback, after the models before it had been built and measured."""
    missing = tmp_path / "nope"
    args = ["--build", str(tiny_dir("llama")), str(missing), "--json", str(tmp_path / "b.json")]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"error: {missing} does not exist; pass a folder with config.json and the safetensors, "
        "a .gguf file, a short name (see python -m tools.build --help) or a Hub repo id.\n"
    )
    assert not (tmp_path / "b.json").exists()


def test_profiles_help_names_the_sets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--profiles SET --build only: 'decode,prefill,chunk', 'decode,prefill', 'dynamic' "
        "(default: the first)"
    ) in help_text


def test_build_rounds_run_round_robin_and_report_each_models_median(tiny_dir, tmp_path, capsys):
    out = tmp_path / "build.json"
    models = [str(tiny_dir("llama")), str(tiny_dir("qwen3"))]
    args = ["--build", *models, "--max-seq-len", "64", "--rounds", "2", "--json", str(out)]
    assert main(args) == 0
    builds = json.loads(out.read_text())["builds"]
    assert [(b["round"], b["model"]) for b in builds] == [
        (1, models[0]),
        (1, models[1]),
        (2, models[0]),
        (2, models[1]),
    ]
    medians = capsys.readouterr().out.split("over 2 rounds, run round-robin")[1]
    for model in models:
        walls = sorted(b["wall_s"] for b in builds if b["model"] == model)
        name = model.rsplit("/", 1)[-1]
        row = next(line for line in medians.splitlines() if line.startswith(name))
        assert row.split()[1:5] == ["2", fmt(sum(walls) / 2), fmt(walls[0]), fmt(walls[1])]


def test_own_cgroup_reads_v1_and_v2(tmp_path):
    v1 = "9:name=systemd:/\n4:memory:/process_api/c5c9\n0::/\n"
    assert own_cgroup(v1, tmp_path) == (tmp_path / "memory/process_api/c5c9", False)
    assert own_cgroup("0::/user.slice/session-2.scope\n", tmp_path) == (
        tmp_path / "user.slice/session-2.scope",
        True,
    )
    with pytest.raises(BenchError) as e:
        own_cgroup("3:cpu:/\n", tmp_path)
    assert str(e.value) == (
        "--memory-limit needs a memory cgroup this user can create (root, with cgroup v1's "
        "memory controller or cgroup v2 with memory delegated); run without --memory-limit "
        "otherwise (no memory controller in /proc/self/cgroup)."
    )


def test_memory_cgroup_says_what_it_needs(tmp_path):
    parent, _ = own_cgroup(Path("/proc/self/cgroup").read_text(), tmp_path)
    with pytest.raises(BenchError) as e:
        MemoryCgroup(2**30, root=tmp_path)  # no cgroup file system there
    assert str(e.value).endswith(
        "run without --memory-limit otherwise (No such file or directory: "
        f"{parent / f'trt-netdef-bench-{os.getpid()}'})."
    )


def _can_make_cgroups() -> bool:
    try:
        MemoryCgroup(2**30).remove()
    except BenchError:
        return False
    return True


@pytest.mark.skipif(not _can_make_cgroups(), reason="needs root and a writable memory cgroup")
def test_build_under_a_memory_limit(tiny_dir, tmp_path, capsys):
    model = tiny_dir("llama")
    ckpt = (model / "model.safetensors").stat().st_size
    out = tmp_path / "build.json"
    # The child alone (Python and TensorRT) takes some 400 MiB; the tiny checkpoint is 0.3 MiB.
    args = ["--build", str(model), "--max-seq-len", "64", "--json", str(out)]
    assert main([*args, "--memory-limit", "4000"]) == 0
    assert "memory limit" in capsys.readouterr().out
    (build,) = json.loads(out.read_text())["builds"]
    limit = build["memory_limit"]
    assert limit["x_checkpoint"] == 4000 and limit["bytes"] == int(4000 * ckpt)
    assert 0 < limit["peak_bytes"] <= limit["bytes"] and limit["oom_kills"] == 0
    assert main([*args, "--memory-limit", "100"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: building {model} was killed at the memory limit of 100.0x its checkpoint "
        f"({fmt_bytes(100 * ckpt)}, page cache included): it needs more memory than that."
    )
    parent, _ = own_cgroup(Path("/proc/self/cgroup").read_text(), CGROUP_ROOT)
    assert not list(parent.glob("trt-netdef-bench-*"))  # each build's cgroup is removed


@pytest.mark.skipif(not _can_make_cgroups(), reason="needs root and a writable memory cgroup")
def test_a_batched_gemma_3_1b_shaped_build_fits_in_1_6x_its_checkpoint(tmp_path, capsys):
    """Issue 17 item 11 at the shape it was set for, with the MLP's [in, out] copies that a
    --max-batch 16 network holds: the build finishes in a memory cgroup of 1.6x the
    checkpoint, page cache included. With those copies in anonymous memory (not spilled to
    a file) it was killed at this cap (docs/benchmarks.md, 2026-12-06)."""
    model = write_random_checkpoint(tmp_path / "g1b", random_config("gemma-3-1b"))
    out = tmp_path / "build.json"
    args = ["--build", str(model), "--target", "sm89", "--max-batch", "16"]
    assert main([*args, "--memory-limit", "1.6", "--json", str(out)]) == 0, capsys.readouterr()
    (build,) = json.loads(out.read_text())["builds"]
    limit = build["memory_limit"]
    assert limit["x_checkpoint"] == 1.6 and limit["oom_kills"] == 0
    assert 0 < limit["peak_bytes"] <= limit["bytes"]


def test_cpu_mode_needs_the_positions_within_the_context(capsys):
    """max_seq_len is --prompt-len + --decode-tokens: it said "choose a smaller --max-seq-len"."""
    args = ["--cpu", str(tiny_quant_dir("llama")), "--prompt-len", "250", "--decode-tokens", "16"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --prompt-len 250 and --decode-tokens 16 need 266 positions, more than the "
        "model's context (256); choose a shorter --prompt-len or fewer --decode-tokens."
    )


def test_cpu_mode_executor_against_transformers_and_host_work(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    args = [str(tiny_quant_dir("llama")), "--prompt-len", "8", "--decode-tokens", "3"]
    args += ["--device-ms", "0.5"]
    assert main(["--cpu", *args, "--rounds", "2", "--warmup", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "executor / transformers" in printed
    assert "generate loop host work per decode step" in printed
    report = json.loads(out.read_text())
    assert report["kind"] == "cpu"
    assert report["settings"] == {
        "prompt_len": 8,
        "decode_tokens": 3,
        "warmup": 0,
        "rounds": 2,
        "batch": 1,
    }
    for key in ("executor", "transformers"):
        r = report[key]
        assert r["prefill"]["rounds"] == r["decode_per_token"]["rounds"] == 2
        assert r["prefill"]["min_ms"] <= r["prefill"]["median_ms"]
        assert positive(
            r["prefill"]["min_ms"],
            r["decode_per_token"]["median_ms"],
            r["prefill_tokens_per_s"],
            r["decode_tokens_per_s"],
            r["setup_s"],
        )
    assert positive(report["ratio"]["prefill"], report["ratio"]["decode"])
    host = report["host"]
    assert (host["vocab"], host["steps"], host["device_ms"]) == (512, 64, 0.5)
    assert [(r["setting"], r["batch"]) for r in host["rows"]] == [
        (name, b) for name, _, _ in SETTINGS for b in (1, 4, 16)
    ]
    assert all(r["rounds"] == r["device_waits"]["rounds"] == 2 for r in host["rows"])
    assert all(r["min_ms"] > 0 for r in host["rows"])
    server = report["server_host"]
    assert (server["prompt_tokens"], server["steps"], server["device_ms"]) == (1024, 64, 0.5)
    assert [(r["setting"], r["streams"]) for r in server["rows"]] == [
        (name, n) for name, _ in SERVER_SETTINGS for n in (1, 4, 16)
    ]
    assert all(r["rounds"] == r["device_waits"]["rounds"] == 2 for r in server["rows"])
    assert all(r["min_ms"] > 0 for r in server["rows"])
    assert "after an emulated device step of 0.5 ms" in printed
    assert "server host work per decode step" in printed


# ---- --make-random ----

SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "512"]


def test_make_random_writes_a_valid_checkpoint(tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["--make-random", "gemma-3-1b", "--out", str(out), *SMALL, "--head-dim", "16"]) == 0
    assert str(out) in capsys.readouterr().out
    ckpt = Checkpoint.open(out)
    ckpt.validate()  # every tensor present, shape and dtype as config.json implies
    config = ckpt.config
    assert (config.family, config.num_layers, config.hidden_size, config.head_dim) == (
        "gemma3",
        2,
        64,
        16,
    )
    # Everything not overridden is gemma-3-1b's.
    assert (config.num_heads, config.num_kv_heads, config.max_position_embeddings) == (4, 1, 32768)
    assert [layer.sliding_window for layer in config.layers] == [512, 512]
    assert config.attention_scale == 256**-0.5
    assert [p.name for p in tmp_path.iterdir()] == ["random"]  # no partial folder left beside
    q = np.asarray(ckpt.tensor("layers.0.self_attn.q_proj.weight"), np.float32)
    assert ckpt.tensor("layers.0.self_attn.q_proj.weight").dtype == ml_dtypes.bfloat16
    assert 0.015 < q.std() < 0.025 and np.abs(q).max() <= 0.02 * 3**0.5 * 1.01
    assert not np.asarray(ckpt.tensor("layers.1.input_layernorm.weight"), np.float32).any()


def test_make_random_help_names_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--make-random PRESET write a random checkpoint with a real model's shapes: "
        "gemma-3-1b, gemma-3-270m, gemma-3-4b, llama-3.2-1b"
    ) in help_text


def test_make_random_never_writes_over_a_users_files(tmp_path, capsys):
    """Each --out was written into before: a model's folder had its config.json and weights
    replaced; a file, or a folder under one, gave a traceback."""
    user = tmp_path / "my-model"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "model.safetensors").write_bytes(b"real weights")
    (tmp_path / "notes").write_text("keep")
    for out, message in (
        (
            user,
            f"{user} is not empty (it holds config.json, model.safetensors); nothing was "
            "written: choose another --out, or empty that folder yourself.",
        ),
        (
            tmp_path / "notes",
            f"{tmp_path / 'notes'} exists and is not a folder; choose another --out (nothing "
            "was changed).",
        ),
        (
            tmp_path / "notes" / "sub",
            f"could not write {tmp_path / 'notes' / 'sub'}: File exists: {tmp_path / 'notes'} "
            "(nothing was left there).",
        ),
    ):
        assert main(["--make-random", "gemma-3-270m", "--out", str(out), *SMALL]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model", "notes"]
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "model.safetensors"]
    assert (user / "config.json").read_text() == '{"mine": true}'
    assert (user / "model.safetensors").read_bytes() == b"real weights"
    assert (tmp_path / "notes").read_text() == "keep"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "-1", "--seed must be at least 0."),
        ("--layers", "0", "--layers must be at least 1."),
        ("--kv-heads", "0", "--kv-heads must be at least 1."),
        ("--head-dim", "-16", "--head-dim must be at least 1."),
    ],
)
def test_make_random_refuses_bad_numbers_before_writing(flag, value, message, tmp_path, capsys):
    """--seed -1 gave a traceback and left a folder holding only config.json; --kv-heads 0 and
    --head-dim 0 wrote a checkpoint of other shapes than asked."""
    out = tmp_path / "random"
    with pytest.raises(SystemExit) as e:
        main(["--make-random", "gemma-3-270m", "--out", str(out), *SMALL, flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m tools.bench: error: {message}"
    assert not any(tmp_path.iterdir())


def test_make_random_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = write_random_checkpoint(tmp_path, random_config("gemma-3-1b", **_small()))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def _small() -> dict[str, int]:
    return {"layers": 2, "hidden": 64, "intermediate": 128, "vocab": 512, "head_dim": 16}


def test_gemma_3_1b_preset_is_the_real_shape():
    config = parse_config(random_config("gemma-3-1b"))
    assert config.summary() == (
        "gemma3: 26 layers (22 sliding (window [512]) + 4 global), hidden 1152, mlp 6912 "
        "(gelu_tanh), heads 4/1 kv x 256, vocab 262144, bfloat16"
    )
    assert {layer.rope.theta for layer in config.layers} == {1e6, 1e4}
    assert config.max_position_embeddings == 32768 and config.tie_word_embeddings
    assert sum(math.prod(s) for s in config.tensor_shapes().values()) == 999_885_952
    with pytest.raises(BenchError, match="unknown preset"):
        random_config("gemma-9")


# ---- GPU mode: pure helpers ----


def test_roofline_bytes_untied_llama(tiny_dir):
    config = load_config(tiny_dir("llama"))  # vocab 512, hidden 64, mlp 128, 3 layers, 4/1 x 16
    per_layer = 64 * 64 + 16 * 64 + 16 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    weights = 3 * per_layer + 512 * 64 + 64 + 2 * 64  # + lm_head, final norm, 2 looked-up rows
    assert weight_read_bytes(config, "bfloat16", batch=2) == 2 * weights
    assert weight_read_bytes(config, "float32", batch=2) == 4 * weights
    # 3 global layers x 10 slots x (key + value) x 1 kv head x 16 x 2 bytes, per sequence
    assert kv_read_bytes(config, "bfloat16", batch=2, attended=10) == 2 * 3 * 10 * 2 * 16 * 2


def test_roofline_bytes_tied_gemma_with_sliding_layers(tiny_dir):
    # tied; 4 layers: sliding 4, sliding 4, global, sliding 4; 4/2 heads x 16
    config = load_config(tiny_dir("gemma3"))
    d, f, q, kv = 64, 128, 4 * 16, 2 * 16
    per_layer = 2 * (q * d + kv * d) + 3 * f * d
    norms = 4 * (4 * 4 * d + 4 * 2 * 16 + d)  # float32: 4 per layer, q/k norms, final
    assert weight_read_bytes(config, "bfloat16", 3) == 2 * (4 * per_layer + 512 * d) + norms
    per_slot = 2 * 2 * 16 * 2
    got = decode_read_bytes(config, "bfloat16", batch=3, attended=10, cache_len=64)
    assert got["kv"] == 3 * (4 + 4 + 10 + 4) * per_slot
    assert got["kv_as_built"] == 3 * (4 + 4 + 64 + 4) * per_slot  # 10 -> 256 -> cache_len 64
    wide = decode_read_bytes(config, "bfloat16", batch=1, attended=300, cache_len=4096)
    assert wide["kv_as_built"] == (4 + 4 + 512 + 4) * per_slot
    assert got["total"] == got["weights"] + got["kv"]
    assert floor_ms(2e9, 2000.0) == pytest.approx(1.0)


def test_roofline_rows_ratio_to_floor(tiny_dir):
    config = load_config(tiny_dir("llama"))
    plan = Plan([16], [1, 4], context=20, steps=8)
    assert plan.attended == 24
    rows = roofline_rows(
        config, "bfloat16", plan, 1.0, {"engine x": {1: 0.5}, "hf": {4: 2.0}}, cache_len=64
    )
    assert [r["batch"] for r in rows] == [1, 4]
    one = rows[0]
    assert one["bytes"] == decode_read_bytes(config, "bfloat16", 1, 24, 64)
    assert one["floor_ms"] == pytest.approx(one["bytes"]["total"] / 1e6)
    assert one["engine x"]["x_floor"] == pytest.approx(0.5 / one["floor_ms"])
    assert "hf" not in one and rows[1]["hf"]["median_ms"] == 2.0
    assert rows[1]["floor_as_built_ms"] > rows[1]["floor_ms"]


def test_shapes_default_to_the_engine_and_explicit_ones_must_fit():
    plan = plan_shapes(None, None, None, 32, max_batch=8, max_prefill=1024, max_seq_len=4096)
    assert plan == Plan([128, 512, 1024], [1, 4, 8], 128, 32)
    small = plan_shapes(None, None, None, 32, max_batch=1, max_prefill=64, max_seq_len=64)
    assert small == Plan([64], [1], 32, 32)
    full = plan_shapes(None, None, None, 32, max_batch=16, max_prefill=4096, max_seq_len=4096)
    assert full == Plan([128, 512, 2048], [1, 4, 16], 128, 32)
    assert plan_shapes([7, 3, 7], [2], 0, 4, max_batch=2, max_prefill=8, max_seq_len=8) == (
        Plan([3, 7], [2], 0, 4)
    )
    with pytest.raises(BenchError, match=r"--prompt-lens \[2048\] exceed .* maximum of 1024"):
        plan_shapes([128, 2048], None, None, 32, max_batch=8, max_prefill=1024, max_seq_len=4096)
    with pytest.raises(BenchError, match=r"--batches \[16\]"):
        plan_shapes(None, [16], None, 32, max_batch=8, max_prefill=64, max_seq_len=64)
    with pytest.raises(BenchError, match="--context 40"):
        plan_shapes(None, None, 40, 32, max_batch=8, max_prefill=64, max_seq_len=64)
    with pytest.raises(BenchError, match="--steps"):
        plan_shapes(None, None, None, 65, max_batch=8, max_prefill=64, max_seq_len=64)


def test_option_parsing_defaults_and_errors(capsys):
    args = parse_args(["artifact"])
    assert (args.prompt_lens, args.batches, args.context, args.steps) == (None, None, None, 32)
    assert args.compare_profiles and not args.compare_transformers and not args.no_engine
    assert (args.warmup, args.rounds, args.dtype, args.bandwidth_mib) == (None, None, None, 512)
    args = parse_args(["m", "--prompt-lens", "64,256", "--batches", "1,2", "--no-compare-profiles"])
    assert (args.prompt_lens, args.batches, args.compare_profiles) == ([64, 256], [1, 2], False)
    assert parse_args(["--build", "a", "b"]).models == ["a", "b"]
    assert parse_args(["m", "--hf-modes", "eager"]).hf_modes == ["eager"]
    assert (args.new_shapes, parse_args(["m", "--new-shapes", "16"]).new_shapes) == (0, 16)
    assert int_list("1, 4,16") == [1, 4, 16]
    for bad in ("x", "0,4", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)
    for argv in ([], ["a", "b"], ["--make-random", "gemma-3-1b"], ["m", "--hf-modes", "x"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    for argv in (
        ["m", "--rounds", "0"],
        ["m", "--memory-limit", "2"],
        ["--build", "m", "--memory-limit", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "--memory-limit takes a positive multiple of the checkpoint, with --build" in (
        capsys.readouterr().err
    )
    for flag, value, need in (
        ("--steps", "0", "at least 1."),
        ("--context", "-3", "at least 0."),
        ("--new-shapes", "-1", "at least 0."),
        ("--max-batch", "0", "at least 1."),
        ("--max-seq-len", "0", "at least 1."),
        ("--bandwidth-mib", "0", "at least 1."),
    ):
        with pytest.raises(SystemExit):
            parse_args(["m", flag, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"python -m tools.bench: error: {flag} must be {need}"


def test_format_table():
    table = format_table(
        ["name", "ms", "x"], [["a", 1.23456, None], ["long name", 1234.5, 0.5]], "title"
    )
    assert table.splitlines() == [
        "title",
        "name         ms      x",
        "---------  ----  -----",
        "a          1.23      -",
        "long name  1234  0.500",
    ]
    assert [fmt(v) for v in (12.345, 0.01234, 7, None, True)] == [
        "12.3",
        "0.012",
        "7",
        "-",
        "True",
    ]
    assert fmt_bytes(3 * 2**30) == "3.00 GiB" and fmt_bytes(2**20) == "1.0 MiB"


def _row(key, n, ms, **extra):
    return {key: n, "min_ms": ms, "median_ms": ms, "rounds": 3, **extra}


def _gpu_report(engines: bool) -> dict:
    decode = {"context": 128, "steps": 32}
    report = {
        "device": {"name": "GPU", "compute_capability": "9.0", "memory_bytes": 1},
        "bandwidth": {
            "d2d_copy_gbs": 1500.0,
            "memory_gbs": 3000.0,
            "h2d_gbs": 50.0,
            "d2h_gbs": 50.0,
        },
        "model": {"summary": "gemma3: ...", "dtype": "bfloat16"},
        "engines": {},
        "transformers": {
            "prefill": [_row("tokens", 128, 8.0, tokens_per_s=16000.0)],
            "decode": {
                "eager": [_row("batch", 1, 20.0, tokens_per_s=50.0, **decode)],
                "static-compile": [_row("batch", 1, 5.0, tokens_per_s=200.0, **decode)],
            },
            "errors": {},
        },
        "roofline": [
            {
                "batch": 1,
                "attended_slots": 144,
                "bytes": {"weights": 2 * 2**30, "kv": 2**20, "total": 2 * 2**30 + 2**20},
                "floor_ms": 0.5,
                "transformers eager": {"median_ms": 20.0, "x_floor": 40.0},
            }
        ],
    }
    if engines:
        for name, ms, profile in (
            ("decode,prefill,chunk", 1.0, "prefill"),
            ("dynamic", 2.0, "dynamic"),
        ):
            report["engines"][name] = {
                "load_s": 2.09,
                "jit_cache_read_bytes": 4_672_066,
                "prefill": [_row("tokens", 128, 2 * ms, profile=profile)],
                "decode": [_row("batch", 1, ms, tokens_per_s=1000 / ms, **decode)],
            }
    else:
        report["engine_skipped"] = "--no-engine: the TensorRT engine was not measured"
    return report


def test_gpu_tables_with_engines_and_transformers():
    text = gpu_tables(_gpu_report(engines=True))
    assert "profiles: the decode,prefill,chunk engine vs one dynamic profile" in text
    lines = text.splitlines()
    assert any(line.split() == ["decode", "batch", "1", "1.00", "2.00", "2.00"] for line in lines)
    assert any(
        line.split() == ["prefill", "128", "tokens", "2.00", "4.00", "2.00"] for line in lines
    )
    assert "engine vs HF eager" in text and "NOT MEASURED" not in text
    assert "\nengine load: 2.09 s, with 4.5 MiB of kernels from the JIT cache\n" in text
    # prefill row: engine 2 ms in the prefill profile, HF eager 8 ms -> 4x
    row = ["128", "2.00", "2.00", "-", "prefill", "8.00", "8.00", "16000", "4.00"]
    assert any(line.split() == row for line in lines)


def test_gpu_tables_without_engine():
    text = gpu_tables(_gpu_report(engines=False))
    assert "TensorRT engine: NOT MEASURED (--no-engine" in text
    assert "HF eager / HF static-compile" in text and "profiles:" not in text
    decode = next(
        line for line in text.splitlines() if line.startswith("    1") or line.startswith("1 ")
    )
    assert decode.split()[-1] == "4.00"  # eager 20 ms / static-compile 5 ms
    assert "x floor" in text and "40.0" in text


# ---- the timing loops ----


class FixedTimeBackend:
    """Records calls; each one 'takes' S ms (reported like TensorRTBackend.last_call_ms)."""

    max_batch, max_seq_len, max_prefill, rings = 4, 64, 16, ()
    vocab_size = 8  # the width of its logits

    def __init__(self, auto_graphs: bool = True):
        self.calls, self.resets = [], []
        self.last_call_ms = 0.0
        self.auto_graphs = auto_graphs

    def reset(self, batch):
        self.resets.append(batch)

    def forward(self, ids, positions, last, readout, draws=None):
        assert (
            ids.dtype == np.int32 and ids.shape == positions.shape and last.shape == ids.shape[:1]
        )
        self.calls.append((ids.shape, positions[:, 0].tolist(), last.tolist()))
        self.last_call_ms = float(ids.shape[1])
        logits = np.zeros((ids.shape[0], 8), np.float32)
        return {"logits": logits, "next_token": logits.argmax(-1)}


def test_measure_loops_use_backend_event_times_and_positions():
    backend = FixedTimeBackend()
    ids = prompt_ids(100, 4, 40)
    assert ids.shape == (4, 40) and ids.min() >= 4 and ids.max() < 100
    rows = measure_prefill(backend, ids, [3, 16], warmup=1, rounds=2)
    assert rows == [
        {"tokens": 3, "min_ms": 3.0, "median_ms": 3.0, "rounds": 2, "tokens_per_s": 1000.0},
        {"tokens": 16, "min_ms": 16.0, "median_ms": 16.0, "rounds": 2, "tokens_per_s": 1000.0},
    ]
    assert backend.calls[0] == ((1, 3), [0], [2]) and len(backend.calls) == 6

    backend = FixedTimeBackend()
    rows = measure_decode(backend, ids, [1, 4], context=20, steps=3, warmup=1, rounds=2)
    assert [(r["batch"], r["median_ms"], r["tokens_per_s"], r["graph"]) for r in rows] == [
        (1, 1.0, 1000.0, True),
        (4, 1.0, 4000.0, True),
    ]
    assert backend.resets == [1, 4]
    # context 20 with max_prefill 16: chunks at 0 and 16, then 3 rounds of positions 20..22
    first = backend.calls[: 2 + 9]
    assert [c[:2] for c in first[:2]] == [((1, 16), [0]), ((1, 4), [16])]
    assert [c[1][0] for c in first[2:]] == [20, 21, 22] * 3
    assert all(c[2] == [0, 0, 0, 0] for c in backend.calls[-9:])
    no_graph = FixedTimeBackend(auto_graphs=False)
    assert not measure_decode(no_graph, ids, [2], 0, 2, 0, 1)[0]["graph"]
    assert [c[1] for c in no_graph.calls] == [[0, 0], [1, 1]]


def test_new_shapes_run_once_and_again_on_the_cpu_executor(tiny_dir):
    """Each new prompt length (batch 1, from position 0) and each decode batch size runs
    twice in a row, fed the given ids; the table shows each kind's first and repeated calls."""
    from netdef import NetworkOptions, build_network, load_tensorrt

    ckpt = Checkpoint.open(tiny_dir("llama"))
    options = NetworkOptions(dtype="float32", max_batch=3, max_seq_len=32, max_prefill=8)
    model = CpuBackend(build_network(ckpt, options, load_tensorrt("tensorrt_rtx")))
    calls = []
    forward = model.forward

    def spy(ids, positions, last, readout):
        calls.append((ids.tolist(), positions.tolist(), last.tolist()))
        return forward(ids, positions, last, readout)

    model.forward = spy
    ids = prompt_ids(ckpt.config.vocab_size, 3, 8)
    new = measure_new_shapes(model, ids, range(5, 7), range(1, 4))
    assert [r["tokens"] for r in new["prefill"]] == [5, 6]
    assert [r["batch"] for r in new["decode"]] == [1, 2, 3]
    assert positive(
        *(r[k] for r in new["prefill"] + new["decode"] for k in ("first_ms", "again_ms"))
    )
    prefill = [(ids[:1, :n].tolist(), [list(range(n))], [n - 1]) for n in (5, 6) for _ in "12"]
    decode = [(ids[:b, 6:7].tolist(), [[6]] * b, [0] * b) for b in (1, 2, 3) for _ in "12"]
    assert calls == prefill + decode
    table = new_shapes_table(new, jit_cache_words({"jit_cache_read_bytes": None}))
    assert "prefill, 2 prompt lengths 5..6" in table and "decode, 3 batch sizes 1..3" in table
    assert "(wall ms; loaded with no JIT cache)" in table
    kept = new_shapes_table(new, jit_cache_words({"jit_cache_read_bytes": 3 << 20}))
    assert "(wall ms; loaded with 3.0 MiB of kernels from the JIT cache)" in kept


def test_measure_loops_on_the_cpu_executor(tiny_dir):
    from netdef import NetworkOptions, build_network, load_tensorrt

    ckpt = Checkpoint.open(tiny_dir("qwen3"))
    options = NetworkOptions(dtype="float32", max_batch=2, max_seq_len=32, max_prefill=8)
    model = CpuBackend(build_network(ckpt, options, load_tensorrt("tensorrt_rtx")))
    ids = prompt_ids(ckpt.config.vocab_size, 2, 32)
    pre = measure_prefill(model, ids, [4, 8], warmup=0, rounds=1)
    dec = measure_decode(model, ids, [1, 2], context=12, steps=2, warmup=0, rounds=2)
    assert [r["tokens"] for r in pre] == [4, 8] and [r["batch"] for r in dec] == [1, 2]
    assert not any(r["graph"] for r in dec)  # the CPU backend has no graphs
    assert positive(*(r[k] for r in pre + dec for k in ("min_ms", "median_ms", "tokens_per_s")))

    class Timed:
        """The executor as a `timed` backend (each call 'takes' 1 ms of GPU time), noting
        where its decode steps' input ids come from."""

        timed, last_call_ms = True, 1.0

        def __getattr__(self, name):
            return getattr(model, name)

        def submit(self, ids, *args):
            fed.append("host" if ids is not None else "device")
            model.submit(ids, *args)

    fed = []
    (row,) = measure_decode(Timed(), ids, [2], context=12, steps=3, warmup=0, rounds=1)
    assert row["median_ms"] == 1.0 and positive(row["wall_ms"], row["chained_ms"])
    assert row["chained_host_ms"] == row["chained_ms"] - 1.0
    assert fed == ["host", "device", "device"] * 4  # four chained rounds: the first uncounted


def test_transformers_timing_structure_on_cpu(tiny_dir):
    plan = Plan([4, 8], [1, 2], context=6, steps=3)
    ids = prompt_ids(512, 2, 12)
    out = transformers_gpu(
        tiny_dir("llama"), dtype="float32", ids=ids, plan=plan, warmup=0, rounds=1, device="cpu"
    )
    assert out["errors"] == {} and [r["tokens"] for r in out["prefill"]] == [4, 8]
    assert set(out["decode"]) == set(HF_MODES)
    for rows in out["decode"].values():
        assert [r["batch"] for r in rows] == [1, 2]
        assert positive(*(r["median_ms"] for r in rows))
        assert not any(r["compiled"] for r in rows)  # transformers compiles on CUDA only


# ---- on a GPU (python -m pytest -m gpu): the loops through TensorRTBackend's CUDA path ----


@pytest.mark.gpu
def test_measure_loops_through_the_tensorrt_backend_on_a_gpu():
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")
    from netdef.artifact import Metadata
    from runtime.standin import CopyContext, fake_engine
    from runtime.tensorrt_backend import TensorRTBackend

    meta, desc = fake_engine(max_batch=4, max_prefill=16, max_seq_len=64)
    with TensorRTBackend(
        Metadata.from_dict(meta), desc, CopyContext(), auto_graphs=True, timed=True
    ) as backend:
        ids = prompt_ids(64, 4, 40)
        new = measure_new_shapes(backend, ids, range(10, 13), range(1, 5))
        assert set(backend.graphs) == {(b, (), ("next_token",)) for b in (1, 2, 3, 4)}
        pre = measure_prefill(backend, ids, [8, 16], warmup=1, rounds=3)
        dec = measure_decode(backend, ids, [1, 4], context=20, steps=4, warmup=1, rounds=3)
        # (batch, position input shapes (none here), outputs copied): graphs replayed
        assert {(1, (), ("next_token",)), (4, (), ("next_token",))} <= set(backend.graphs)
    assert all(r["graph"] for r in dec)
    assert positive(
        *(r[k] for r in new["prefill"] + new["decode"] for k in ("first_ms", "again_ms"))
    )
    assert [r["profile"] for r in pre] == ["prefill", "chunk"]  # 16 tokens: max_prefill
    assert positive(*(r[k] for r in pre + dec for k in ("min_ms", "median_ms", "tokens_per_s")))


@pytest.mark.gpu
def test_profile_reads_the_kernels_of_a_prefill_and_each_decode_batch_on_a_gpu():
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")
    pytest.importorskip("torch", reason="--profile reads kernels through torch.profiler")
    from netdef.artifact import Metadata
    from runtime.standin import CopyContext, fake_engine
    from runtime.tensorrt_backend import TensorRTBackend
    from tools.bench.profile import profile_engine

    meta, desc = fake_engine(max_batch=4, max_prefill=16, max_seq_len=64)
    with TensorRTBackend(Metadata.from_dict(meta), desc, CopyContext()) as backend:
        ids = prompt_ids(64, 4, 40)
        out = profile_engine(backend, ids, context=20, prompt_len=16, batches=[1, 4], repeats=2)
        assert not backend.auto_graphs and len(backend.graphs) == 2  # batches 1 and 4
    assert [(d["batch"], d["context"]) for d in out["decode"]] == [(1, 20), (4, 20)]
    assert out["prefill"]["tokens"] == 16
    for call in [*out["decode"], out["prefill"]]:  # the stand-in's copies are what CUPTI sees
        assert call["kernel_us"] > 0 and call["launches"] > 0 and call["sequence"]
        assert 0 <= call["idle_us"] < call["span_us"]
    for step in out["decode"]:  # also replayed as the CUDA graph its first call captured
        graph = step["graph"]
        assert graph["launches"] == step["launches"] and 0 <= graph["idle_us"] < graph["span_us"]


def test_gpu_mode_orchestration_without_engine(tiny_dir, tmp_path, monkeypatch, capsys):
    """`python -m tools.bench MODEL --no-engine --compare-transformers` end to end, with the
    CUDA pieces stubbed and transformers on the CPU: report sections, JSON and tables."""
    import runtime.cuda_buffers as cb

    monkeypatch.setattr(cb, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(cb, "device_info", lambda: cb.DeviceInfo(0, "Stub GPU", 9, 0, 1 << 34))
    monkeypatch.setattr(
        cb,
        "bandwidth",
        lambda mib, repeats=5: {"H2D": 50.0, "D2H": 50.0, "D2D": 1000.0},
    )
    on_cpu = transformers_gpu
    monkeypatch.setattr(gpu, "transformers_gpu", lambda *a, **k: on_cpu(*a, **k, device="cpu"))
    out = tmp_path / "gpu.json"
    argv = [str(tiny_dir("gemma3")), "--no-engine", "--compare-transformers", "--steps", "4"]
    argv += ["--rounds", "1", "--warmup", "0", "--dtype", "float32", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "TensorRT engine: NOT MEASURED" in text and "roofline" in text
    report = json.loads(out.read_text())
    assert report["kind"] == "gpu" and report["engines"] == {}
    assert report["bandwidth"]["memory_gbs"] == 2000.0
    # tiny gemma3: max_position_embeddings 256 -> prompt lengths clipped to 128 and 256
    assert report["settings"]["prompt_lens"] == [128, 256]
    assert report["settings"]["batches"] == [1, 4, 16] and report["settings"]["context"] == 128
    assert [r["tokens"] for r in report["transformers"]["prefill"]] == [128, 256]
    assert [r["batch"] for r in report["roofline"]] == [1, 4, 16]
    for row in report["roofline"]:
        assert set(row) >= {"floor_ms", "floor_as_built_ms", "transformers eager"}
        assert positive(row["floor_ms"], row["transformers eager"]["x_floor"])


def test_busy_machine_warning():
    assert busy_warning({"load_average_at_start": 0.4, "cpu_count": 2}) is None
    assert busy_warning({"cpu_count": 2}) is None
    note = busy_warning({"load_average_at_start": 1.5, "cpu_count": 2})
    assert note.startswith("note: the 1-minute load average was 1.50 on 2 CPUs")


def test_profile_tables_print_the_top_kernels_of_all_kept():
    from tools.bench.profile import TOP_KERNELS, profile_tables
    from tools.bench.report import format_table

    kernels = [
        {"kernel": f"k{i}", "us": 20.0 - i, "launches": 1.0, "share": (20 - i) / 210}
        for i in range(20)
    ]
    step = {"context": 128, "kernel_us": 210.0, "launches": 20.0, "kernels": kernels}
    profile = {
        "decode": [{"batch": 1, **step}, {"batch": 16, **step}],
        "prefill": {"tokens": 64, "kernel_us": 210.0, "launches": 20.0, "kernels": kernels[:3]},
    }
    profile["decode"][0]["sequence"] = [
        {"kernel": "cudnn_generated_matMul_fort_ffma_grouped_sm50_kernel0_0", "us": 150.0},
        {"kernel": "_gemm_mha_v2_0x26", "us": 20.0},  # fused attention: not a matmul here
        {"kernel": "__myl_CastTopk_0xf3", "us": 28.0},
        {"kernel": "__myl_LogAdd_0x12", "us": 3.5},
    ]
    graph = {"kernel_us": 208.0, "launches": 20.0, "span_us": 251.4, "idle_us": 43.4}
    profile["decode"][0] |= {"span_us": 230.2, "idle_us": 20.2, "graph": graph}
    decode, batched, prefill = profile_tables(profile, format_table)
    assert decode.splitlines()[-3:] == [
        "the GPU ran it in 230 us, 20 of them between kernels and copies",
        "as a CUDA graph replay (as timed): 208 us of kernels in 20 launches, run in 251 us, "
        "43 of them between kernels and copies",
        "after the LM head (the sampling outputs): 3 launches, 52 us, 24.5% of the step",
    ]
    assert decode.splitlines()[0] == (
        f"profile, decode step (batch 1, 128 cached tokens): 210 us of kernels in 20 launches "
        f"(top {TOP_KERNELS} of 20 kernels)"
    )
    assert batched.splitlines()[0].startswith("profile, decode step (batch 16, 128 cached tokens)")
    assert "after the LM head" not in batched  # no launch sequence kept
    assert "k14 " in decode and "k15 " not in decode
    assert prefill.splitlines()[0].endswith("(top 3 of 3 kernels)")


def test_timeline_is_a_calls_span_less_what_ran():
    from tools.bench.profile import timeline

    first = [(0.0, "a", 1.0), (2.0, "b", 1.0), (5.0, "c", 1.0)]
    overlapping = [(10.0, "a", 2.0), (11.0, "b", 3.0), (16.0, "c", 1.0)]  # b on an aux stream
    inside = [(10.0, "a", 4.0), (11.0, "b", 1.0), (16.0, "c", 1.0)]
    assert timeline(overlapping) == (7.0, 2.0)  # 10..17, idle 14..16
    assert timeline(inside) == (7.0, 2.0)
    assert timeline(first) == (6.0, 3.0)
    assert timeline([]) == (0.0, 0.0)


def test_last_call_keeps_the_last_calls_kernels_in_launch_order():
    from tools.bench.profile import last_call

    launched = [(30.0, "b", 2.0), (0.0, "a", 1.0), (10.0, "b", 2.5), (20.0, "a", 1.5)]
    assert last_call(launched, repeats=2) == [(20.0, "a", 1.5), (30.0, "b", 2.0)]
    assert last_call(launched[:1], repeats=2) == []  # fewer launches than calls: none whole


def test_gpu_mode_without_a_gpu_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """Status 2 came from matching the message's words (tools.bench.NoGpu now)."""
    from runtime import cuda_buffers

    monkeypatch.setattr(cuda_buffers, "gpu_unavailable_reason", lambda: "no CUDA device is present")
    assert main([str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == (
        "error: GPU mode needs cuda-python and a CUDA GPU, but no CUDA device is present.\n"
    )


@pytest.mark.gpu
def test_an_artifact_of_another_format_is_one_error_line_on_a_gpu(tmp_path, capsys):
    """tools.bench did not catch ArtifactError: an old artifact was a traceback."""
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")
    from netdef.artifact import ENGINE_FILE, METADATA_FILE
    from netdef.contract import FORMAT_VERSION

    old = tmp_path / "old"
    old.mkdir()
    (old / ENGINE_FILE).write_bytes(b"")
    (old / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION - 1}))
    assert main([str(old), "--no-compare-profiles", "--bandwidth-mib", "16"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {old} has artifact format {FORMAT_VERSION - 1}, but this trt-netdef reads "
        f"format {FORMAT_VERSION}; rebuild it with python -m tools.build --force."
    )


def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys):
    """--json in a missing folder, or naming a folder, was a FileNotFoundError or
    IsADirectoryError traceback after the whole run had been measured."""
    model = str(tmp_path)  # never opened: refused first
    cases = [
        (tmp_path / "no" / "r.json", f"--json: {tmp_path / 'no'} is not a folder."),
        (tmp_path, f"--json: {tmp_path} is a folder; name the file to write, e.g. "
         f"{tmp_path / 'bench.json'}."),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            parse_args(["--build", model, "--json", str(path)])
        assert e.value.code == 2
        assert (
            capsys.readouterr().err.splitlines()[-1] == f"python -m tools.bench: error: {message}"
        )
