"""--cpu: the NumPy executor (runtime.cpu.CpuBackend) against transformers on the CPU, batch 1."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench import BenchError
from tools.bench.host import host_overhead, host_table, server_host_overhead
from tools.bench.report import Report, format_table, stats
from tools.bench.timing import prompt_ids, transformers_available


def cpu_rounds(
    prefill: Callable[[], None],
    step: Callable[[int], None],
    n_steps: int,
    warmup: int,
    rounds: int,
) -> dict[str, Any]:
    """Rounds of one prefill then `n_steps` decode steps; min/median over rounds of the
    prefill ms and of the mean decode ms per token."""
    pre, dec = [], []
    for _ in range(warmup + rounds):
        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        for s in range(n_steps):
            step(s)
        t2 = time.perf_counter()
        pre.append((t1 - t0) * 1e3)
        dec.append((t2 - t1) * 1e3 / n_steps)
    return {"prefill": stats(pre[warmup:]), "decode_per_token": stats(dec[warmup:])}


def with_rates(result: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    result["prefill_tokens_per_s"] = prompt_len / result["prefill"]["median_ms"] * 1e3
    result["decode_tokens_per_s"] = 1e3 / result["decode_per_token"]["median_ms"]
    return result


def executor_cpu(
    model_dir: Path, dtype: str, prompt: np.ndarray, decode: np.ndarray, warmup: int, rounds: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The NumPy executor (runtime.cpu.CpuBackend) of the model's network, batch 1; and the
    logits of the prompt's last token."""
    from netdef import NetworkOptions, build_network, load_tensorrt
    from runtime.cpu import CpuBackend
    from runtime.readout import ALL_LOGITS
    from weights import Checkpoint

    p, n = len(prompt), len(decode)
    t0 = time.perf_counter()
    options = NetworkOptions(dtype=dtype, max_batch=1, max_seq_len=p + n, max_prefill=p)
    model = CpuBackend(build_network(Checkpoint.open(model_dir), options, load_tensorrt()))
    model.reset(1)
    setup_s = time.perf_counter() - t0
    zero = np.zeros(1, np.int32)
    state: dict[str, np.ndarray] = {}

    def prefill() -> None:
        last = np.array([p - 1], np.int32)
        out = model.forward(prompt[None], np.arange(p, dtype=np.int32)[None], last, ALL_LOGITS)
        state["logits"] = out["logits"][0]

    def step(s: int) -> None:
        model.forward(decode[None, s : s + 1], np.array([[p + s]], np.int32), zero, ALL_LOGITS)

    result = cpu_rounds(prefill, step, n, warmup, rounds)
    return with_rates(dict(result, setup_s=setup_s), p), state["logits"]


def transformers_cpu(
    model_dir: Path, dtype: str, prompt: np.ndarray, decode: np.ndarray, warmup: int, rounds: int
) -> dict[str, Any]:
    """transformers on the CPU, the same calls: a prefill forward (last token's logits only),
    then one forward per token through the returned cache."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    setup_s = time.perf_counter() - t0
    x = torch.from_numpy(prompt.astype(np.int64))[None]
    toks = torch.from_numpy(decode.astype(np.int64))
    state: dict[str, Any] = {}
    # transformers 5.24 renamed `past_key_values` (input and output) to `cache`.
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill() -> None:
        state["out"] = model(input_ids=x, use_cache=True, logits_to_keep=1)

    def step(s: int) -> None:
        state["out"] = model(
            input_ids=toks[s : s + 1][None],
            **{cache: state["out"][cache]},
            use_cache=True,
            logits_to_keep=1,
        )

    with torch.inference_mode():
        result = cpu_rounds(prefill, step, len(decode), warmup, rounds)
    result = with_rates(dict(result, setup_s=setup_s), len(prompt))
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    result["torch_threads"] = torch.get_num_threads()
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return result


def run_cpu(args: argparse.Namespace, report: Report) -> None:
    from weights import load_config, resolve_model

    model_dir = resolve_model(args.models[0])
    config = load_config(model_dir)
    dtype = args.dtype or "float32"
    warmup, rounds = args.warmup if args.warmup is not None else 1, args.rounds or 3
    need, context = args.prompt_len + args.decode_tokens, config.max_position_embeddings
    if need > context:  # the network's max_seq_len is their sum
        raise BenchError(
            f"--prompt-len {args.prompt_len} and --decode-tokens {args.decode_tokens} need "
            f"{need} positions, more than the model's context ({context}); choose a shorter "
            "--prompt-len or fewer --decode-tokens."
        )
    ids = prompt_ids(config.vocab_size, 1, need)[0]
    prompt, decode = ids[: args.prompt_len], ids[args.prompt_len :]
    report["model"] = {"dir": str(model_dir), "summary": config.summary(), "dtype": dtype}
    report["settings"] = {
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "warmup": warmup,
        "rounds": rounds,
        "batch": 1,
    }
    print(f"timing the NumPy executor on {model_dir} ...", file=sys.stderr)
    report["executor"], logits = executor_cpu(model_dir, dtype, prompt, decode, warmup, rounds)
    report.save()
    if not (model_dir / "tokenizer.json").is_file():
        report["host"] = {"skipped": f"no tokenizer.json in {model_dir}"}
    else:
        print("timing the generate loop's host work ...", file=sys.stderr)
        report["host"] = host_overhead(
            model_dir, logits, [1, 4, 16], 64, warmup, rounds, args.device_ms
        )
        report.save()
        print("timing the server's host work ...", file=sys.stderr)
        report["server_host"] = server_host_overhead(
            model_dir, logits, [1, 4, 16], 64, warmup, rounds, args.device_ms
        )
    report.save()
    if why := transformers_available():
        report["transformers"] = {"skipped": why}
    else:
        print("timing transformers ...", file=sys.stderr)
        report["transformers"] = transformers_cpu(model_dir, dtype, prompt, decode, warmup, rounds)
        ex, hf = report["executor"], report["transformers"]
        report["ratio"] = {
            "prefill": ex["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
            "decode": ex["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        }
    report.save()


def cpu_tables(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = []
    for name, key in (
        ("NumPy executor", "executor"),
        ("transformers (torch eager)", "transformers"),
    ):
        r = report.get(key, {})
        if "prefill" not in r:
            rows.append([name] + [None] * 6)
            continue
        rows.append(
            [
                name,
                r["prefill"]["min_ms"],
                r["prefill"]["median_ms"],
                r["prefill_tokens_per_s"],
                r["decode_per_token"]["min_ms"],
                r["decode_per_token"]["median_ms"],
                r["decode_tokens_per_s"],
            ]
        )
    if "ratio" in report:
        rows.append(
            [
                "executor / transformers",
                None,
                None,
                report["ratio"]["prefill"],
                None,
                None,
                report["ratio"]["decode"],
            ]
        )
    title = (
        f"CPU, {report['model']['summary']}; run in {report['model']['dtype']}: prefill "
        f"{s['prompt_len']} tokens, then {s['decode_tokens']} decode steps, batch 1; "
        f"{s['rounds']} rounds after {s['warmup']} warm-up"
    )
    table = format_table(
        [
            "",
            "prefill min ms",
            "prefill median ms",
            "prefill tok/s",
            "decode min ms/tok",
            "decode median ms/tok",
            "decode tok/s",
        ],
        rows,
        title,
    )
    if report.get("transformers", {}).get("skipped"):
        table += f"\ntransformers: skipped ({report['transformers']['skipped']})"
    host = report.get("host", {})
    if "rows" in host:
        table += "\n\n" + host_table(host)
    elif "skipped" in host:
        table += f"\nhost work per step: skipped ({host['skipped']})"
    if "server_host" in report:
        table += "\n\n" + host_table(report["server_host"])
    return table
