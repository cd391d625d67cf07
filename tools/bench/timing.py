"""The shapes a GPU run measures (Plan) and the loops that time them: over any
runtime.backend.Backend, and over transformers (torch is imported only there)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netdef.slots import prompt_chunks
from runtime.readout import ALL_LOGITS, ARGMAX
from tools.bench import BenchError
from tools.bench.report import stats

DEFAULT_PROMPT_LENS = (128, 512, 2048)
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_CONTEXT = 128  # tokens in the cache before the timed decode steps
HF_MODES = ("eager", "static-compile")


def fit_to_engine(
    requested: Sequence[int] | None, default: Sequence[int], maximum: int, what: str
) -> list[int]:
    """Sorted unique sizes. Explicit ones must fit the engine's `maximum`; defaults are clipped
    to it (128, 512, 2048 with a max of 1024 -> 128, 512, 1024)."""
    if requested:
        if too_big := sorted(v for v in set(requested) if v > maximum):
            raise BenchError(
                f"{what} {too_big} exceed the engine's maximum of {maximum}; "
                "ask for less or rebuild the engine with larger limits."
            )
        return sorted(set(requested))
    return sorted({min(v, maximum) for v in default})


@dataclass(frozen=True)
class Plan:
    """The shapes one GPU run measures."""

    prompt_lens: list[int]  # prefill, batch 1
    batches: list[int]  # decode
    context: int  # cached tokens before the first timed decode step
    steps: int  # decode steps per round

    @property
    def attended(self) -> int:
        """Cache slots the middle decode step attends to (its own included)."""
        return self.context + (self.steps + 1) // 2


def plan_shapes(
    prompt_lens: Sequence[int] | None,
    batches: Sequence[int] | None,
    context: int | None,
    steps: int,
    *,
    max_batch: int,
    max_prefill: int,
    max_seq_len: int,
) -> Plan:
    """Requested or default shapes, checked against (defaults clipped to) the engine's limits."""
    if steps < 1 or steps > max_seq_len:
        raise BenchError(f"--steps {steps} must be between 1 and max_seq_len={max_seq_len}.")
    if context is None:
        context = max(0, min(DEFAULT_CONTEXT, max_seq_len - steps))
    elif context < 0 or context + steps > max_seq_len:
        raise BenchError(
            f"--context {context} + --steps {steps} exceed the engine's max_seq_len={max_seq_len}."
        )
    return Plan(
        fit_to_engine(
            prompt_lens, DEFAULT_PROMPT_LENS, min(max_prefill, max_seq_len), "--prompt-lens"
        ),
        fit_to_engine(batches, DEFAULT_BATCHES, max_batch, "--batches"),
        context,
        steps,
    )


# ---- timing loops over any runtime.backend.Backend ----


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, length] (ids 0-3 are left out: special tokens in most vocabularies)."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(4, vocab - 1), vocab, size=(batch, length), dtype=np.int32)


def wall_ms(backend: Any, ids: np.ndarray, positions: np.ndarray, last: np.ndarray) -> float:
    """Wall-clock milliseconds of one greedy call (only next_token is copied back, as greedy
    generation does)."""
    t0 = time.perf_counter()
    backend.forward(ids, positions, last, ARGMAX)
    return (time.perf_counter() - t0) * 1e3


def timed_call(backend: Any, ids: np.ndarray, positions: np.ndarray, last: np.ndarray) -> float:
    """Milliseconds of one greedy call: CUDA events where the backend keeps `last_call_ms`
    (TensorRTBackend), else wall clock."""
    wall = wall_ms(backend, ids, positions, last)
    return float(backend.last_call_ms) if hasattr(backend, "last_call_ms") else wall


def fill_cache(backend: Any, ids: np.ndarray, batch: int, length: int) -> None:
    """Prefill `length` tokens of `batch` sequences, in the chunks the generate loop uses."""
    for start, end in prompt_chunks(length, backend.max_prefill, backend.rings):
        pos = np.broadcast_to(np.arange(start, end, dtype=np.int32), (batch, end - start))
        last = np.full(batch, end - start - 1, np.int32)
        backend.forward(ids[:batch, start:end], pos, last, ALL_LOGITS)


def measure_prefill(
    backend: Any, ids: np.ndarray, lengths: Sequence[int], warmup: int, rounds: int
) -> list[dict[str, Any]]:
    """Per prompt length: one batch-1 prefill call per round, from position 0 (and the
    optimization profile it ran in, where the backend says)."""
    rows = []
    backend.reset(1)
    for n in lengths:
        args = (ids[:1, :n], np.arange(n, dtype=np.int32)[None], np.array([n - 1], np.int32))
        times = [timed_call(backend, *args) for _ in range(warmup + rounds)][warmup:]
        row = {"tokens": n, **stats(times)}
        row["tokens_per_s"] = n / row["median_ms"] * 1e3
        if profile := getattr(backend, "last_profile", None):
            row["profile"] = profile
        rows.append(row)
    return rows


NEW_SHAPES_FROM = 300  # the first prompt length --new-shapes runs (not a default --prompt-lens)


def measure_new_shapes(
    backend: Any, ids: np.ndarray, lengths: Sequence[int], batches: Sequence[int]
) -> dict[str, list[dict[str, Any]]]:
    """Wall ms of calls of shapes the backend has not run yet, each run once more right
    after: what a server pays the first time a prompt length (a batch-1 prefill) or a decode
    batch size comes up. TensorRT-RTX compiles kernels specialized for each new shape
    (EAGER, runtime.tensorrt_backend.runtime_config) and the TensorRT backend captures a
    decode shape's CUDA graph. Run it first on a freshly loaded backend."""
    backend.reset(max(batches))
    prefill = []
    for n in lengths:
        args = (ids[:1, :n], np.arange(n, dtype=np.int32)[None], np.array([n - 1], np.int32))
        prefill.append(
            {"tokens": n, "first_ms": wall_ms(backend, *args), "again_ms": wall_ms(backend, *args)}
        )
    decode, at = [], max(lengths)
    for b in batches:
        args = (ids[:b, at : at + 1], np.full((b, 1), at, np.int32), np.zeros(b, np.int32))
        decode.append(
            {"batch": b, "first_ms": wall_ms(backend, *args), "again_ms": wall_ms(backend, *args)}
        )
    return {"prefill": prefill, "decode": decode}


def measure_decode(
    backend: Any,
    ids: np.ndarray,
    batches: Sequence[int],
    context: int,
    steps: int,
    warmup: int,
    rounds: int,
) -> list[dict[str, Any]]:
    """Per batch size: prefill `context` tokens, then rounds of `steps` decode steps at
    positions context .. context+steps-1 (each round rewrites the same slots). A round's
    figure is its mean ms per step (one token per sequence); min and median over rounds.
    A backend with `auto_graphs` replays each step shape's CUDA graph after its first use.
    With a `timed` backend (CUDA events), one more round runs untimed, as generation does,
    and its median wall-clock step is `wall_ms`: the host's work is wall_ms - median_ms.
    Then a round as greedy generation runs it, each step submitted fed the previous one's
    next_token before the host collects that one (`Backend.submit`): its mean wall-clock
    step is `chained_ms`, and chained_ms - median_ms the host work the GPU still waits for."""
    rows = []
    for b in batches:
        backend.reset(b)
        fill_cache(backend, ids, b, context)
        captured = bool(getattr(backend, "auto_graphs", False))
        last = np.zeros(b, np.int32)
        per_round = []
        for _ in range(warmup + rounds):
            times = [
                timed_call(
                    backend,
                    ids[:b, context + s : context + s + 1],
                    np.full((b, 1), context + s, np.int32),
                    last,
                )
                for s in range(steps)
            ]
            per_round.append(statistics.fmean(times))
        row = {"batch": b, "context": context, "steps": steps, "graph": captured}
        row.update(stats(per_round[warmup:]))
        row["tokens_per_s"] = b / row["median_ms"] * 1e3
        if getattr(backend, "timed", False):
            backend.timed = False
            try:
                wall = [
                    wall_ms(
                        backend,
                        ids[:b, context + s : context + s + 1],
                        np.full((b, 1), context + s),
                        last,
                    )
                    for s in range(steps)
                ]
                first = ids[:b, context : context + 1]
                chained = [chained_step_ms(backend, first, context, steps) for _ in range(4)]
            finally:
                backend.timed = True
            row["wall_ms"] = statistics.median(wall)
            row["host_ms"] = row["wall_ms"] - row["median_ms"]
            row["chained_ms"] = statistics.median(chained[1:])  # the first captures graphs
            row["chained_host_ms"] = row["chained_ms"] - row["median_ms"]
        rows.append(row)
    return rows


def chained_step_ms(backend: Any, first: np.ndarray, context: int, steps: int) -> float:
    """Mean wall-clock ms per step of `steps` greedy decode steps at positions context ..,
    the first fed `first` ([B, 1]), each later one submitted fed the step before's
    next_token on the device before the host collects that step, as runtime.generate's
    greedy loop runs them."""
    b = len(first)
    last = np.zeros(b, np.int32)
    t0 = time.perf_counter()
    backend.submit(first, np.full((b, 1), context, np.int32), last, ARGMAX)
    for s in range(1, steps):
        backend.submit(None, np.full((b, 1), context + s, np.int32), last, ARGMAX)
        backend.collect()
    backend.collect()
    return (time.perf_counter() - t0) * 1e3 / steps


# ---- transformers (torch is imported only here) ----


def transformers_gpu(
    model_dir: Path,
    *,
    dtype: str,
    ids: np.ndarray,
    plan: Plan,
    warmup: int,
    rounds: int,
    modes: Sequence[str] = HF_MODES,
    device: str = "cuda",
) -> dict[str, Any]:
    """transformers on the same prompts: prefill = one forward (logits of the last token only),
    decode = `generate` (greedy, exactly steps + 1 new tokens) with a stopping criterion that
    synchronizes and stamps the clock after every token, so the figure excludes the prefill.
    "eager" uses the default dynamic cache; "static-compile" passes cache_implementation=
    "static", with which generate compiles the decode step (torch.compile, on CUDA)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    out: dict[str, Any] = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": device,
        "dtype": dtype,
        "prefill": [],
        "decode": {},
        "errors": {},
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = torch.from_numpy(ids.astype(np.int64)).to(device)

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    with torch.inference_mode():
        for n in plan.prompt_lens:
            x = tokens[:1, :n]
            times = [
                timed(lambda x=x: model(input_ids=x, use_cache=True, logits_to_keep=1))
                for _ in range(warmup + rounds)
            ][warmup:]
            row = {"tokens": n, **stats(times)}
            row["tokens_per_s"] = n / row["median_ms"] * 1e3
            out["prefill"].append(row)

    class Stamps(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    context = max(plan.context, 1)
    for mode in modes:
        rows: list[dict[str, Any]] = []
        out["decode"][mode] = rows
        try:
            for b in plan.batches:
                x = tokens[:b, :context]
                stamps = Stamps()
                kwargs: dict[str, Any] = dict(
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=plan.steps + 1,
                    min_new_tokens=plan.steps + 1,
                    do_sample=False,
                    pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([stamps]),
                )
                if mode == "static-compile":
                    kwargs["cache_implementation"] = "static"
                per_round = []
                for _ in range(max(warmup, 1 if mode == "static-compile" else 0) + rounds):
                    stamps.times.clear()
                    model.generate(x, **kwargs)
                    t = stamps.times
                    per_round.append((t[-1] - t[0]) * 1e3 / (len(t) - 1))
                row = {"batch": b, "context": context, "steps": plan.steps}
                row.update(stats(per_round[-rounds:]))
                row["tokens_per_s"] = b / row["median_ms"] * 1e3
                row["compiled"] = getattr(model, "_compiled_call", None) is not None
                rows.append(row)
        except Exception as e:  # one mode failing (e.g. compile) must not lose the others
            out["errors"][mode] = f"{type(e).__name__}: {e}"
    return out


def transformers_available() -> str | None:
    """None if torch and transformers can be imported (without importing them); else why not."""
    from importlib.util import find_spec

    missing = [m for m in ("torch", "transformers") if find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None
