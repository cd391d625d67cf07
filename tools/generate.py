"""Stream text from an engine artifact, or from a Hugging Face folder on the CPU.

    python -m tools.generate ARTIFACT --prompt "Why is the sky blue?" --chat
    python -m tools.generate MODEL_DIR --backend reference --prompt "Once upon a time"

Without --prompt it is an interactive chat that keeps the conversation (a base model, with
no chat template, continues each typed line as plain text instead), dropping its oldest
exchanges when it outgrows the cache. Lines may be piped in: stdout then holds the replies
alone (the `> ` prompt, on stderr, only for a terminal).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from netdef import NetworkOptions, OptionsError, build_network
from netdef.artifact import (
    METADATA_FILE,
    Metadata,
    check_intact,
    files_sha256,
    fmt_bytes,
    source_fingerprint,
)
from netdef.contract import DEFAULT_DTYPE
from netdef.options import default_max_seq_len
from runtime.backend import Backend
from runtime.calibration import activation_amax, calibration_ids
from runtime.cpu import CpuBackend
from runtime.cuda_buffers import CudaError, gpu_unavailable_reason
from runtime.generate import (
    WHOLE_CONTEXT,
    GenerationError,
    Generator,
    Run,
    larger_max_seq_len,
)
from runtime.reference import ExecutorError
from runtime.sampling import SamplingError, SamplingParams
from runtime.tensorrt_backend import EngineLoadError, TensorRTBackend
from runtime.tokenizer import Tokenizer
from tools.cli import add_model_arguments, flag_named
from weights import Checkpoint, WeightsError, load_config
from weights.bundled import default_cache_dir
from weights.gguf_quant import GGUFQuantized
from weights.hub import is_gguf_source

DEFAULT_NEW_TOKENS = 128  # --max-new-tokens where max_seq_len leaves room for it twice


def no_such_model(path: Path) -> str | None:
    """The error for a model argument that is no model or artifact folder (tools.generate and
    tools.serve), or None: a GGUF file, or a folder holding one and no config.json (which
    tools.build takes), is said to be one rather than a folder without a tokenizer."""
    if is_gguf_source(path) and path.exists():
        what = "is a GGUF file" if path.is_file() else "holds a GGUF file and no config.json"
        return (
            f"{path} {what}; python -m tools.build {path} converts it (into "
            "$TRT_NETDEF_CACHE/gguf/) and builds an artifact: pass that artifact folder, or the "
            "converted folder with --backend reference."
        )
    if path.is_dir():
        return None
    problem = "is a file, not a folder" if path.exists() else "does not exist"
    return (
        f"{path} {problem}; pass an artifact folder from python -m tools.build, or a "
        "Hugging Face model folder with --backend reference."
    )


def artifact_metadata(path: Path, backend: str) -> Metadata | None:
    """The artifact's checked metadata, or None for a model folder, which only the reference
    backend runs: said before the tokenizer is read (a folder that is neither lacks one)."""
    meta = check_intact(path) if (path / METADATA_FILE).is_file() else None
    if meta is None and backend == "tensorrt":
        raise GenerationError(
            f"{path} is not an engine artifact; build one with python -m tools.build, or use "
            "--backend reference."
        )
    return meta


def check_as_built(
    path: Path, meta: Metadata | None, dtype: str | None, max_seq_len: int | None
) -> None:
    """Refuse --dtype and --max-seq-len for an artifact, which runs as built."""
    if meta is not None and (dtype is not None or max_seq_len is not None):
        raise GenerationError(
            f"{path} runs as built ({meta.options['dtype']}, max_seq_len {meta.max_seq_len}); "
            "--dtype and --max-seq-len choose a model folder's network: drop them, or build "
            "another artifact with python -m tools.build."
        )


def open_backend(
    path: Path,
    meta: Metadata | None,
    backend: str,
    dtype: str | None,
    max_seq_len: int | None,
    max_batch: int = 1,
) -> Backend:
    """The engine of an artifact (TensorRT), or the network executed on the CPU (reference)
    for `max_batch` sequences; `meta` is `artifact_metadata`'s. `dtype` and `max_seq_len`
    (None: the defaults) choose a model folder's network; an artifact runs as built."""
    check_as_built(path, meta, dtype, max_seq_len)
    if backend == "tensorrt":
        if reason := gpu_unavailable_reason():
            raise GenerationError(
                f"the TensorRT backend needs cuda-python and a CUDA GPU, but {reason}; on the "
                "CPU, run the artifact's network with --backend reference."
            )
        backend = TensorRTBackend.load(path)
        if backend.jit_cache is not None and not backend.jit_cache.loaded:
            reach = backend.decode_reach  # decode-long's kernels: on its first step
            later = (
                f", and on the first step past {reach:,} tokens (about 13 s more)" if reach else ""
            )
            print(
                "TensorRT-RTX compiles this engine's kernels for this GPU on its first calls "
                f"(about 30 s for a 1B model){later}; they are kept in "
                f"{backend.jit_cache.path} for the next run.",
                file=sys.stderr,
            )
        return backend
    act_amax = None
    if meta is not None:
        ckpt = source_checkpoint(path, meta)
        options = NetworkOptions(**{**meta.options, "max_batch": max_batch})
        if options.quant == "fp8":
            act_amax = fp8_ranges(path, meta, ckpt)
    else:
        ckpt = Checkpoint.open(path)
        seq_len = default_max_seq_len(ckpt.config) if max_seq_len is None else max_seq_len
        options = NetworkOptions(
            dtype=dtype or DEFAULT_DTYPE,
            max_batch=max_batch,
            max_seq_len=seq_len,
            max_prefill=min(seq_len, 512),  # the executor's attention scores stay small
        )
    for caveat in options.caveats(ckpt.config):
        print(f"warning: {caveat}", file=sys.stderr)
    return CpuBackend(build_network(ckpt, options, act_amax=act_amax))


def fp8_ranges(artifact: Path, meta: Metadata, ckpt: Checkpoint) -> dict[str, float]:
    """An fp8 artifact's activation ranges, measured again as its build measured them (the
    engine holds them only as its scales): the same pass over the calibration text its
    metadata names, refused if that text changed since."""
    text = Path(meta.calibration["file"])
    if not text.is_file() or files_sha256([text]) != meta.calibration["sha256"]:
        what = "changed after the build" if text.is_file() else "no longer exists"
        raise GenerationError(
            f"--backend reference measures the fp8 activation ranges of {artifact} again on "
            f"its calibration text {text}, which {what}; rebuild the artifact with python -m "
            "tools.build --force, or run the engine on a GPU (--backend tensorrt)."
        )
    ids = calibration_ids(meta.model_path, text)
    tokens = meta.calibration["tokens"]
    print(f"Calibrating FP8 activation ranges on {tokens} tokens of {text}...", file=sys.stderr)
    return activation_amax(ckpt, ids, meta.options["dtype"])


def source_checkpoint(artifact: Path, meta: Metadata) -> Checkpoint | GGUFQuantized:
    """The weights an artifact was built from, which the CPU executes its network with (the
    engine holds them only in TensorRT's form); refused if they changed since the build.
    A from-gguf build's kept blocks come from the GGUF file its metadata names."""
    source = meta.model_path
    if not (source / "config.json").is_file():
        raise GenerationError(
            f"--backend reference runs the network of {artifact} on the CPU from the weights it "
            f"was built from, but {source} no longer holds them; pass that model folder instead, "
            "or run the engine on a GPU (--backend tensorrt)."
        )
    if source_fingerprint(source) != meta.fingerprint:
        raise GenerationError(
            f"{source} changed after {artifact} was built from it; rebuild the artifact with "
            f"python -m tools.build --force, or pass {source} itself."
        )
    print(
        f"Running the network of {artifact} on the CPU with the weights in {source}.",
        file=sys.stderr,
    )
    ckpt = Checkpoint.open(source)
    if meta.from_gguf is not None:
        return GGUFQuantized.open(ckpt, meta.from_gguf["file"], default_cache_dir())
    return ckpt


def load_tokenizer(path: Path, meta: Metadata | None) -> Tokenizer:
    if meta is not None and not (path / "tokenizer.json").is_file():
        raise GenerationError(
            f"{path} has no tokenizer.json: the model folder it was built from had none; add the "
            "model's tokenizer files to that folder and build again."
        )
    return Tokenizer.from_dir(path)


def start(gen: Generator, prompt, params: SamplingParams, chat: bool, truncate: bool) -> Run:
    """`gen.start` of one prompt; a prompt too long is refused pointing at --truncate."""
    try:
        return gen.start([prompt], params, chat=chat, truncate=truncate)
    except GenerationError as e:
        if "allow truncation" not in str(e):
            raise
        raise GenerationError(
            f"{e} (--truncate keeps the prompt's last tokens, after its BOS.)"
        ) from None


def stream(run: Run) -> str:
    """Print the run's text as it comes, then its figures on stderr; the text."""
    try:
        for delta in run:
            print(delta.text, end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: 'interrupted.' goes on a line of its own
        print(flush=True)
        raise
    print()
    c = run.completions[0]
    print(
        f"[{c.stats.prompt_tokens} prompt tokens, {c.stats.completion_tokens} generated ({c.finish_reason}); "
        f"prefill {c.stats.prefill_ms:.0f} ms, decode {c.stats.decode_ms_per_token:.1f} ms/token]",
        file=sys.stderr,
    )
    return c.text


def drop_oldest_turns(gen: Generator, messages: list[dict], params: SamplingParams) -> int:
    """Drop the oldest exchanges (a user message and its reply) until the conversation and
    max_new_tokens fit the cache, the latest message always kept; how many were dropped."""
    limit = gen.backend.max_seq_len - params.max_new_tokens
    dropped = 0
    while len(messages) > 2 and len(gen.tokenizer.encode_chat(messages)) > limit:
        del messages[:2]
        dropped += 1
    return dropped


def chat_loop(gen: Generator, params: SamplingParams, truncate: bool) -> None:
    """A conversation; a base model (no chat template) continues each line as plain text.
    A conversation that outgrows the cache drops its oldest exchanges, and says so; a line
    that does not fit by itself is refused and the session goes on. The `> ` prompt goes to
    stderr, and only where stdin is a terminal: piped lines give only the replies on stdout."""
    chat = bool(gen.tokenizer.chat_templates)
    if chat:
        print("Chat (empty line or Ctrl-D to quit).", file=sys.stderr)
    else:
        print(
            f"{gen.tokenizer.source} is a base model (no chat template), so each line is "
            "continued as plain text, without the earlier lines (empty line or Ctrl-D to quit).",
            file=sys.stderr,
        )
    messages: list[dict] = []
    typed = sys.stdin.isatty()
    while True:
        if typed:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = input().strip()
        except EOFError:
            break
        if not line:
            break
        prompt: str | list[dict] = line
        dropped = 0
        if chat:
            prompt = [*messages, {"role": "user", "content": line}]
            dropped = drop_oldest_turns(gen, prompt, params)
        try:
            run = start(gen, prompt, params, chat, truncate)
        except GenerationError as e:  # this line is too long by itself: the session goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(
                f"(the conversation outgrew max_seq_len={gen.backend.max_seq_len}: dropped its "
                f"oldest {dropped} exchange(s))",
                file=sys.stderr,
            )
        reply = stream(run)
        if chat:
            messages = [*prompt, {"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.generate", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        help="text to continue (or the user message with --chat); omit for interactive chat",
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default {DEFAULT_NEW_TOKENS}, or half of max_seq_len where that is less",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep a too-long prompt's last tokens (after its BOS) instead of refusing it",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1: no top-p filter")
    p.add_argument("--top-k", type=int, default=0, help="default 0: no top-k filter")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1: none")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = p.parse_args(argv)
    try:
        params = SamplingParams(
            max_new_tokens=DEFAULT_NEW_TOKENS
            if args.max_new_tokens is None
            else args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except SamplingError as e:
        p.error(flag_named(e))
    try:
        if problem := no_such_model(args.model):
            raise GenerationError(problem)
        meta = artifact_metadata(args.model, args.backend)
        tokenizer = load_tokenizer(args.model, meta)
        if args.chat and args.prompt is not None:  # no chat template: refused before any work
            tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        check_as_built(args.model, meta, args.dtype, args.max_seq_len)
        # Known before the backend opens (seconds for a model folder's network on the CPU):
        # an artifact's as built, a model folder's as --max-seq-len or its context say.
        if meta is None:
            config = load_config(args.model)  # its weights: open_backend
            context, seq_len = config.max_position_embeddings, args.max_seq_len
            if seq_len is None:
                seq_len = default_max_seq_len(config)
        else:
            context, seq_len = meta.data["config"]["max_position_embeddings"], meta.max_seq_len
        if args.max_new_tokens is None:  # the default leaves room for a prompt
            half = max(1, seq_len // 2)
            params = replace(params, max_new_tokens=min(DEFAULT_NEW_TOKENS, half))
        if 1 <= seq_len <= params.max_new_tokens:  # a bad --max-seq-len: open_backend says so
            larger = larger_max_seq_len(seq_len, context)
            if larger is None:
                fix = f"{WHOLE_CONTEXT}; ask for fewer than {seq_len} new tokens."
            else:
                rebuild = "build the artifact again with" if meta else "use"
                fix = f"; ask for fewer new tokens, or {rebuild} {larger}."
            raise GenerationError(
                f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in "
                f"max_seq_len={seq_len}{fix}"
            )
        gen = Generator(
            open_backend(args.model, meta, args.backend, args.dtype, args.max_seq_len), tokenizer
        )
        try:
            print(
                f"KV caches: {fmt_bytes(gen.backend.kv_bytes)} for {gen.backend.max_batch} "
                f"sequence(s) of up to {gen.backend.max_seq_len} tokens",
                file=sys.stderr,
            )
            if args.prompt is None:
                chat_loop(gen, params, args.truncate)
            else:
                stream(start(gen, args.prompt, params, args.chat, args.truncate))
        finally:
            gen.backend.close()
    except (
        ValueError,  # ArtifactError, TokenizerError and GenerationError among them
        WeightsError,
        OptionsError,
        GenerationError,
        EngineLoadError,
        CudaError,
        ExecutorError,  # a network the CPU could not run (a RuntimeError)
    ) as e:
        print(f"error: {flag_named(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
