"""Load on the live server: tokens/s, time to first token and inter-token latency per number
of concurrent streams.

    python -m tools.bench.serve ARTIFACT --json docs/bench/serve-h200.json          # GPU
    python -m tools.bench.serve MODEL_DIR --backend reference --max-batch 16 --json out.json
    python -m tools.bench.serve --url http://127.0.0.1:8000/v1 --model NAME         # running

Without --url it starts `python -m tools.serve` on a free loopback port (its --backend,
--max-batch, --dtype, --max-seq-len) and stops it at the end. For each level of --streams,
that many clients each send --rounds streaming completions back to back (a prompt of
--prompt-tokens random token ids, seeded per request; greedy, or sampled with --temperature,
--top-k and --top-p and a seed per request; --max-tokens new tokens).
Time to first token is from sending a request to its first text chunk; inter-token latency
is the gap between consecutive chunks (one per token); tokens/s is the level's generated
tokens (from each response's usage) over its wall time. The openai client drives it
(`pip install openai`; the test extra has it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from netdef.contract import DEFAULT_DTYPE, MODEL_DTYPES
from runtime.sampling import SamplingError, SamplingParams
from tools.bench.__main__ import int_list
from tools.bench.report import json_path_error, machine, versions
from tools.cli import at_least, flag_named, path_arg
from weights.folders import staged_file

if TYPE_CHECKING:
    import openai


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


async def one_level(
    client: openai.AsyncOpenAI, model: str, streams: int, args: argparse.Namespace, vocab: int
) -> dict:
    ttft, itl, tokens = [], [], 0

    async def client_loop(k: int) -> None:
        nonlocal tokens
        for r in range(args.rounds):
            rng = np.random.default_rng(1000 * k + r)
            prompt = rng.integers(10, vocab, args.prompt_tokens).tolist()
            start = time.perf_counter()
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=1000 * k + r,
                extra_body={"top_k": args.top_k} if args.top_k else None,
                stream=True,
                stream_options={"include_usage": True},
            )
            last = None
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                if last is None:
                    ttft.append(now - start)
                else:
                    itl.append(now - last)
                last = now

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(streams)))
    wall = time.perf_counter() - t0
    return {
        "streams": streams,
        "requests": streams * args.rounds,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "itl_ms": {"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(args: argparse.Namespace) -> list[str]:
    """python -m tools.serve's arguments for the model and options (all but --port)."""
    cmd = [str(args.model_path), "--backend", args.backend]
    cmd += ["--max-queue", str(max(args.streams) * 2)]
    if args.backend == "reference":
        cmd += ["--max-batch", str(args.max_batch or 16)]
        for flag, value in (("--dtype", args.dtype), ("--max-seq-len", args.max_seq_len)):
            if value is not None:  # a model folder's network; an artifact runs as built
                cmd += [flag, str(value)]
    return cmd


def server_refusal(args: argparse.Namespace) -> str | None:
    """What python -m tools.serve would refuse the model for (no such folder, no artifact
    for TensorRT, no tokenizer, --dtype for an artifact, no GPU for TensorRT), or None: said
    here before a server starts, rather than by it and then again as 'the server did not
    start'."""
    from runtime.cuda_buffers import gpu_unavailable_reason
    from tools.generate import no_such_model
    from tools.serve import parse_args as serve_args
    from weights import WeightsError

    config = serve_args(server_args(args))[1]
    if problem := no_such_model(config.model):
        return problem
    try:
        config.check()
    except (ValueError, WeightsError) as e:
        return flag_named(e)
    if args.backend == "tensorrt" and (reason := gpu_unavailable_reason()):
        return (
            f"the TensorRT backend needs cuda-python and a CUDA GPU, but {reason}; on the CPU, "
            "measure the artifact's network with --backend reference."
        )
    return None


def too_long(args: argparse.Namespace) -> str | None:
    """A request of --prompt-tokens and --max-tokens that the server would refuse (the two
    more than its max_seq_len), where that is known without starting it: an artifact's, or
    --max-seq-len's."""
    from netdef.artifact import METADATA_FILE, Metadata, read_metadata

    needed = args.prompt_tokens + args.max_tokens
    if (args.model_path / METADATA_FILE).is_file():
        limit = Metadata.from_dict(read_metadata(args.model_path)).max_seq_len
        which = f"{args.model_path}'s max_seq_len of {limit}"
        fix = "lower them, or build the artifact with a larger --max-seq-len"
    elif args.max_seq_len is not None:
        limit = args.max_seq_len
        which, fix = f"--max-seq-len {limit}", "lower them or raise --max-seq-len"
    else:
        return None
    if needed <= limit:
        return None
    return (
        f"--prompt-tokens {args.prompt_tokens} and --max-tokens {args.max_tokens} need "
        f"{needed} positions, more than {which}; {fix}."
    )


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tools.serve", *server_args(args), "--port", str(port)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    return proc, url + "/v1"
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(
                        f"error: the server did not start (exit code {proc.poll()})."
                    ) from None
                time.sleep(0.5)
    except BaseException:  # a Ctrl-C or SIGTERM while it starts: it is stopped, not left running
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each checked here so that a bad one is refused before a server starts."""
    p = argparse.ArgumentParser(
        prog="python -m tools.bench.serve", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "model_path",
        nargs="?",
        type=path_arg,
        metavar="ARTIFACT_OR_MODEL",
        help="artifact, or model folder with --backend reference (not with --url)",
    )
    p.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the served model name (default: the server's only model)")
    p.add_argument(
        "--backend",
        choices=["tensorrt", "reference"],
        help="the server's backend (default: tensorrt)",
    )
    p.add_argument(
        "--max-batch", type=int, help="reference backend: the server's rows (default 16)"
    )
    p.add_argument(
        "--dtype",
        choices=list(MODEL_DTYPES),
        help=f"a model folder's dtype on the reference backend (default {DEFAULT_DTYPE})",
    )
    p.add_argument(
        "--max-seq-len", type=int, help="a model folder's cache length on the reference backend"
    )
    p.add_argument(
        "--streams",
        type=int_list,
        default=[1, 4, 16, 64],
        help="concurrency levels (default: 1,4,16,64)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="requests per client and level (default: %(default)s)"
    )
    p.add_argument("--prompt-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="default 0: none")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1: none")
    p.add_argument("--json", type=path_arg, help="write the raw results here")
    args = p.parse_args(argv)
    if args.url is None and args.model_path is None:
        p.error("pass an artifact or model folder to serve, or --url of a running server.")
    if args.url is not None and args.model_path is not None:
        p.error(
            f"{args.model_path} starts a server and --url measures one already running; pass "
            "only one of them."
        )
    flags = ("--max-batch", "--max-seq-len", "--rounds", "--prompt-tokens", "--max-tokens")
    at_least(p, args, dict.fromkeys(flags, 1))
    try:  # the sampling flags by the rules a request's are held to
        SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except SamplingError as e:
        p.error(flag_named(e))
    server = {"--backend": args.backend, "--max-batch": args.max_batch}
    server |= {"--dtype": args.dtype, "--max-seq-len": args.max_seq_len}
    given = [flag for flag, value in server.items() if value is not None]
    if args.url is not None and given:
        p.error(
            f"{given[0]} sets up the server this command starts; the one at --url runs as it "
            "was started."
        )
    args.backend = args.backend or ("tensorrt" if args.url is None else None)
    if args.backend == "tensorrt" and (given := [f for f in given if f != "--backend"]):
        p.error(f"{given[0]} applies to the reference backend; an artifact runs as built.")
    if args.json and (problem := json_path_error(args.json)):
        p.error(problem)
    return args


def request_error(e: openai.APIError, url: str) -> str:
    """One line for a request that failed: the server's own message where it sent one."""
    import openai

    if isinstance(e, openai.APIConnectionError):
        return f"error: cannot reach the server at {url}: {e.__cause__ or e.message}"
    said = e.body.get("message") if isinstance(e.body, dict) else None
    status = f" ({e.status_code})" if isinstance(e, openai.APIStatusError) else ""
    return f"error: the server at {url} refused a request{status}: {said or e.message}"


def ms(value: float | None, width: int) -> str:
    """A latency cell: '-' where the level had none (one token per request has no gaps)."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import openai
    except ImportError:
        print("error: this needs the openai client: pip install openai", file=sys.stderr)
        return 1
    if args.url is None and (problem := server_refusal(args) or too_long(args)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    proc = None
    try:
        if args.url is None:
            proc, args.url = start_server(args)
        client = openai.AsyncOpenAI(base_url=args.url, api_key="-", max_retries=0, timeout=3600)
        sync = openai.OpenAI(base_url=args.url, api_key="-", max_retries=0)
        model = args.model or sync.models.list().data[0].id
        vocab = 256 if args.model_path is None else json_vocab(args.model_path)
        levels = []

        async def run() -> None:
            await one_level(
                client, model, 1, argparse.Namespace(**{**vars(args), "rounds": 1}), vocab
            )
            for streams in args.streams:
                level = await one_level(client, model, streams, args, vocab)
                levels.append(level)
                ttft, itl = level["ttft_ms"], level["itl_ms"]
                print(
                    f"{streams:>3} {'stream: ' if streams == 1 else 'streams:'} "
                    f"{level['tokens_per_s']:8.1f} tok/s  TTFT p50 "
                    f"{ms(ttft['p50'], 8)} p99 {ms(ttft['p99'], 8)} ms  ITL p50 "
                    f"{ms(itl['p50'], 7)} p99 {ms(itl['p99'], 7)} ms",
                    flush=True,
                )

        asyncio.run(run())  # the first, unrecorded request warms the server up
    except openai.APIError as e:
        print(request_error(e, args.url), file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    if args.json:
        report = {
            "kind": "serve",
            "model": model,
            "backend": args.backend,
            "max_batch": args.max_batch,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
            "rounds": args.rounds,
            "machine": machine(),
            "versions": versions(),
            "levels": levels,
        }
        with staged_file(args.json) as tmp:  # a Ctrl-C mid-write leaves no partial report
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def json_vocab(path: Path) -> int:
    """The vocabulary size in the folder's config.json (an artifact keeps the model's)."""
    for name in ("config.json", "metadata.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            data = data.get("config", data)
            data = data.get("text_config", data)
            if "vocab_size" in data:
                return int(data["vocab_size"])
    return 256


if __name__ == "__main__":
    from tools.cli import run

    run(main)
