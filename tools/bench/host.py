"""--cpu, second part: what the generate loop and the server themselves add to every decode
step.

The shared loop (runtime.generate: sampling, the streaming detokenizer, stop handling) and
the server's engine (runtime.serving, its step thread and streams) run over a backend that
answers each call with the model's real next-token logits: at once, so that the time per step
is all the host's work, and again after an emulated device step of DEVICE_MS per call (calls
in series, `collect` waiting for its call to end), so that the time per step beyond
DEVICE_MS is the host work the device waits for: what submitting a step before streaming the
last one hides (issue 18 item 5 asks 50 us at batch 1). Greedy decoding takes the engine's argmax
(next_token); sampling with top_k <= the engine's sample_top_k takes its best K logits and
ids (top_logits, top_ids); other sampling takes the whole logits.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from netdef.contract import INV_TEMPERATURE, LOG_NORMALIZER, LOGITS, NEXT_TOKEN, TOP_IDS, TOP_LOGITS
from runtime.generate import Generator
from runtime.readout import Draws, Outputs, Readout, sampling_feeds
from runtime.sampling import SamplingParams
from runtime.serving import Engine
from runtime.tokenizer import Tokenizer
from tools.bench.report import format_table, stats

ENGINE_TOP_K = 64  # NetworkOptions.sample_top_k's default
GEMMA = SamplingParams(temperature=1.0, top_k=64, top_p=0.95)
QWEN = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
QWEN25 = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
LLAMA = SamplingParams(temperature=0.6, top_p=0.9)
DEVICE_MS = 2.5  # a Gemma-3-1B-shaped decode step on the H200 through the gpu-rig
WHOLE = "the same from the whole logits (engine built with --sample-top-k 0)"
# (name, sampling, the engine's sample_top_k)
SETTINGS = [
    ("greedy (argmax in the engine)", SamplingParams(), ENGINE_TOP_K),
    ("Gemma-3's T 1.0, top-k 64, top-p 0.95 (drawn in the engine)", GEMMA, ENGINE_TOP_K),
    (WHOLE, GEMMA, 0),
    ("T 0.7, top-k 20, top-p 0.8 (drawn in the engine)", QWEN, ENGINE_TOP_K),
    (
        "Qwen2.5's: the same, repetition penalty 1.05 (best 64 from the engine)",
        QWEN25,
        ENGINE_TOP_K,
    ),
    (WHOLE, QWEN25, 0),
    ("Llama 3's T 0.6, top-p 0.9 (best 64, log-normalizer from the engine)", LLAMA, ENGINE_TOP_K),
    (WHOLE, LLAMA, 0),
    ("T 1.0, no filter (whole logits)", SamplingParams(temperature=1.0), ENGINE_TOP_K),
]


class CannedBackend:
    """Answers every call with `logits` for each sequence, their argmax, or their best
    `sample_top_k` (with ids, and the log-normalizer), as an engine built with that
    sample_top_k would: at once, or `device_ms` after the later of its submission and the
    previous call's end (an emulated device running calls in series). A call's draws
    (runtime.readout.sampling_feeds) are taken and not used: its next_token is the argmax,
    which costs the host what a drawn one does."""

    def __init__(
        self,
        logits: np.ndarray,
        max_batch: int,
        max_seq_len: int,
        sample_top_k: int,
        device_ms: float = 0.0,
    ):
        self.logits, self.argmax = logits, np.int32(logits.argmax())
        self.max_batch, self.max_seq_len, self.max_prefill = max_batch, max_seq_len, max_seq_len
        self.model_context = max_seq_len  # as if built for the model's whole context
        self.vocab_size = logits.size  # one logit per token id
        self.rings: tuple[int, ...] = ()  # no sliding-window KV rings
        self.sample_top_k = sample_top_k
        self.has_log_normalizer = sample_top_k > 0
        self.top_ids = np.argsort(-logits, kind="stable")[:sample_top_k].astype(np.int32)
        self.batch = 1
        self.lse: dict[float, np.float32] = {}  # log_normalizer per temperature
        self.pending: deque[tuple[float, Outputs]] = deque()  # submitted calls: (end, outputs)
        self.device_s, self.busy_until = device_ms / 1000, 0.0

    def reset(self, batch: int) -> None:
        pass

    @contextmanager
    def row(self, k: int) -> Iterator[None]:
        yield  # a call on one cache row answers the same

    def forward(
        self, input_ids, position_ids, last, readout: Readout, draws: Draws = None
    ) -> Outputs:
        self.submit(input_ids, position_ids, last, readout, draws)
        return self.collect()

    def submit(self, input_ids, position_ids, last, readout: Readout, draws: Draws = None) -> None:
        if input_ids is not None:
            self.batch = len(input_ids)
        if self.device_s:
            self.busy_until = max(time.perf_counter(), self.busy_until) + self.device_s
        self.pending.append((self.busy_until, self._outputs(self.batch, readout, draws)))

    def collect(self) -> Outputs:
        """The oldest call's outputs once it ends: asleep until 0.3 ms before (a sleep here
        wakes ~0.1 ms late), then spinning."""
        end, out = self.pending.popleft()
        if (wait := end - time.perf_counter() - 3e-4) > 0:
            time.sleep(wait)
        while time.perf_counter() < end:
            pass
        return out

    def _outputs(self, b: int, readout: Readout, draws: Draws) -> Outputs:
        out = {
            LOGITS: self.last_logits,
            NEXT_TOKEN: lambda: np.full(b, self.argmax, np.int32),
            TOP_LOGITS: lambda: np.tile(self.logits[self.top_ids], (b, 1)),
            TOP_IDS: lambda: np.tile(self.top_ids, (b, 1)),
            LOG_NORMALIZER: lambda: np.array(
                [self.log_normalizer(1 / t) for t in sampling_feeds(draws, b)[INV_TEMPERATURE]]
            ),
        }
        return {name: out[name]() for name in readout.outputs}

    def last_logits(self) -> np.ndarray:
        return np.repeat(self.logits[None], self.batch, axis=0)  # a fresh array, as D2H gives

    def log_normalizer(self, temperature: float) -> np.float32:
        if temperature not in self.lse:  # the engine's work, not the host's: computed once
            x = self.logits.astype(np.float64) / temperature
            self.lse[temperature] = np.float32(x.max() + np.log(np.exp(x - x.max()).sum()))
        return self.lse[temperature]


def host_overhead(
    model_dir: Path,
    logits: np.ndarray,
    batches: list[int],
    steps: int,
    warmup: int,
    rounds: int,
    device_ms: float = DEVICE_MS,
) -> dict[str, Any]:
    """ms of host work per decode step, per sampling setting and batch size (`_row`). No EOS
    ends a sequence early (the run always takes `steps` steps)."""
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = []
    for name, base, engine_top_k in progress(SETTINGS, "generate loop settings"):
        params = SamplingParams(**{**base.__dict__, "max_new_tokens": steps, "seed": 0})
        for batch in batches:
            step_ms = partial(_generate_step_ms, logits, tokenizer, engine_top_k, params, batch)
            rows.append(
                {"setting": name, "batch": batch, **_row(step_ms, warmup, rounds, device_ms)}
            )
    return {"vocab": int(logits.size), "steps": steps, "device_ms": device_ms, "rows": rows}


def progress(settings: list, desc: str) -> Any:
    """A bar on stderr over the settings: on two cores the whole-logits ones over Gemma-3's
    262,144-token vocabulary take minutes each."""
    return tqdm(settings, desc=desc, unit="setting", file=sys.stderr)


def _generate_step_ms(
    logits: np.ndarray,
    tokenizer: Tokenizer,
    engine_top_k: int,
    params: SamplingParams,
    batch: int,
    device_ms: float,
) -> float:
    """One round of `host_overhead`: ms per decode step of `batch` sequences."""
    backend = CannedBackend(logits, batch, 64 + params.max_new_tokens, engine_top_k, device_ms)
    run = Generator(backend, tokenizer, eos_ids=[]).start([[*range(1, 33)]] * batch, params)
    for _delta in run:
        pass
    return run.completions[0].stats.decode_ms_per_token


def _row(
    step_ms: Callable[[float], float], warmup: int, rounds: int, device_ms: float
) -> dict[str, Any]:
    """A row's figures from `step_ms(device)`, one round's ms per decode step over a backend
    whose calls take `device` ms: the host's whole work per step (device 0), and the part of
    it an emulated device step of `device_ms` waits for (`device_waits`)."""
    row: dict[str, Any] = {}
    for device in (0.0, device_ms):
        samples = [step_ms(device) - device for _ in range(warmup + rounds)][warmup:]
        row |= {"device_waits": stats(samples)} if device else stats(samples)
    return row


def host_table(result: dict[str, Any]) -> str:
    """The table of `host_overhead`'s or `server_host_overhead`'s result."""
    count = "streams" if "prompt_tokens" in result else "batch"
    scope = (
        f"server host work per decode step ({result['prompt_tokens']}-token prompts"
        if count == "streams"
        else f"generate loop host work per decode step (vocabulary {result['vocab']}"
    )
    device = result["device_ms"]
    return format_table(
        ["sampling", count, "min ms/step", "median ms/step", "device waits, median ms/step"],
        [
            [r["setting"], r[count], r["min_ms"], r["median_ms"], r["device_waits"]["median_ms"]]
            for r in result["rows"]
        ],
        f"{scope}, {result['steps']} steps; the backend answers at once, or, for the device's "
        f"wait, after an emulated device step of {device} ms)",
    )


SERVER_SETTINGS = [("greedy", SamplingParams()), ("Gemma-3's T 1.0, top-k 64, top-p 0.95", GEMMA)]
SERVER_PROMPT = 1024  # tokens of each stream's prompt


def server_host_overhead(
    model_dir: Path,
    logits: np.ndarray,
    streams: list[int],
    steps: int,
    warmup: int,
    rounds: int,
    device_ms: float = DEVICE_MS,
) -> dict[str, Any]:
    """ms of the server's own work per decode step (`_row`): that many streams submitted at
    once to a `runtime.serving.Engine`, each a prompt of SERVER_PROMPT tokens and `steps` new
    tokens (seeded per stream; no EOS), read to the end; the time from the last stream's
    first token to the end over its `steps` - 1 decode steps (rows come and go meanwhile)."""
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = []
    for name, base in progress(SERVER_SETTINGS, "server settings"):
        params = [
            SamplingParams(**{**base.__dict__, "max_new_tokens": steps, "seed": i})
            for i in range(max(streams))
        ]
        for n in streams:
            step_ms = partial(_server_step_ms, logits, tokenizer, params[:n])
            rows.append({"setting": name, "streams": n, **_row(step_ms, warmup, rounds, device_ms)})
    return {"prompt_tokens": SERVER_PROMPT, "steps": steps, "device_ms": device_ms, "rows": rows}


def _server_step_ms(
    logits: np.ndarray, tokenizer: Tokenizer, params: list[SamplingParams], device_ms: float
) -> float:
    """One round of `server_host_overhead`: ms per decode step of one stream per `params`."""
    steps = params[0].max_new_tokens
    backend = CannedBackend(logits, len(params), SERVER_PROMPT + steps, 64, device_ms)
    engine = Engine(backend, tokenizer)
    engine.gen.eos_ids = set()  # no EOS ends a stream early
    # ids 1..SERVER_PROMPT, cycled within a smaller vocabulary (the tiny test models')
    prompt = [1 + t % (backend.vocab_size - 1) for t in range(SERVER_PROMPT)]
    requests = [engine.submit(prompt, p) for p in params]
    for request in requests:
        for _text in request:
            pass
    engine.shutdown()
    first = max(r.first_token_at for r in requests)
    return (max(r.last_token_at for r in requests) - first) * 1000 / (steps - 1)
