"""--cpu, second part: what the generate loop and the server themselves add to every decode
step.

The shared loop (runtime.generate: sampling, the streaming detokenizer, stop handling) and
the server's engine (runtime.serving, its step thread and streams) run over a backend that
answers each call at once with the model's real next-token logits, so the time per step is
the host work a GPU engine's step cannot hide. Greedy decoding takes the engine's argmax
(next_token); sampling with top_k <= the engine's sample_top_k takes its best K logits and
ids (top_logits, top_ids); other sampling takes the whole logits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from netdef.contract import LOG_NORMALIZER, LOGITS, NEXT_TOKEN, TOP_IDS, TOP_LOGITS
from runtime.generate import Generator
from runtime.readout import Outputs, Readout
from runtime.sampling import SamplingParams
from runtime.serving import Engine
from runtime.tokenizer import Tokenizer
from tools.bench.report import format_table, stats

ENGINE_TOP_K = 64  # NetworkOptions.sample_top_k's default
GEMMA = SamplingParams(temperature=1.0, top_k=64, top_p=0.95)
QWEN = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
QWEN25 = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
LLAMA = SamplingParams(temperature=0.6, top_p=0.9)
WHOLE = "the same from the whole logits (engine built with --sample-top-k 0)"
# (name, sampling, the engine's sample_top_k)
SETTINGS = [
    ("greedy (argmax in the engine)", SamplingParams(), ENGINE_TOP_K),
    ("Gemma-3's T 1.0, top-k 64, top-p 0.95 (best 64 from the engine)", GEMMA, ENGINE_TOP_K),
    (WHOLE, GEMMA, 0),
    ("T 0.7, top-k 20, top-p 0.8 (best 64 from the engine)", QWEN, ENGINE_TOP_K),
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


class InstantBackend:
    """Answers every call at once: `logits` for each sequence, their argmax, or their best
    `sample_top_k` (with ids, and the log-normalizer), as an engine built with that
    sample_top_k would."""

    def __init__(self, logits: np.ndarray, max_batch: int, max_seq_len: int, sample_top_k: int):
        self.logits, self.argmax = logits, np.int32(logits.argmax())
        self.max_batch, self.max_seq_len, self.max_prefill = max_batch, max_seq_len, max_seq_len
        self.rings: tuple[int, ...] = ()  # no sliding-window KV rings
        self.sample_top_k = sample_top_k
        self.has_log_normalizer = sample_top_k > 0
        self.top_ids = np.argsort(-logits, kind="stable")[:sample_top_k].astype(np.int32)
        self.batch = 1
        self.lse: dict[float, np.float32] = {}  # log_normalizer per temperature
        self.pending: deque[Outputs] = deque()  # submitted calls' outputs

    def reset(self, batch: int) -> None:
        pass

    @contextmanager
    def row(self, k: int) -> Iterator[None]:
        yield  # a call on one cache row answers the same

    def forward(self, input_ids, position_ids, last, readout: Readout) -> Outputs:
        self.batch = b = len(input_ids)
        out = {
            LOGITS: self.last_logits,
            NEXT_TOKEN: lambda: np.full(b, self.argmax, np.int32),
            TOP_LOGITS: lambda: np.tile(self.logits[self.top_ids], (b, 1)),
            TOP_IDS: lambda: np.tile(self.top_ids, (b, 1)),
            LOG_NORMALIZER: lambda: np.full(b, self.log_normalizer(readout.temperature)),
        }
        return {name: out[name]() for name in readout.outputs}

    def submit(self, input_ids, position_ids, last, readout: Readout) -> None:
        ids = np.zeros((self.batch, 1), np.int32) if input_ids is None else input_ids
        self.pending.append(self.forward(ids, position_ids, last, readout))

    def collect(self) -> Outputs:
        return self.pending.popleft()

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
) -> dict[str, Any]:
    """ms of host work per decode step, per sampling setting and batch size. No EOS ends a
    sequence early (the run always takes `steps` steps)."""
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = []
    for name, base, engine_top_k in SETTINGS:
        backend = InstantBackend(logits, max(batches), 64 + steps, engine_top_k)
        gen = Generator(backend, tokenizer, eos_ids=[])
        params = SamplingParams(**{**base.__dict__, "max_new_tokens": steps, "seed": 0})
        for batch in batches:
            samples = []
            for _ in range(warmup + rounds):
                run = gen.start([list(range(1, 33))] * batch, params)
                for _delta in run:
                    pass
                samples.append(run.completions[0].stats.decode_ms_per_token)
            rows.append({"setting": name, "batch": batch, **stats(samples[warmup:])})
    return {"vocab": int(logits.size), "steps": steps, "rows": rows}


def host_table(result: dict[str, Any]) -> str:
    """The table of `host_overhead`'s or `server_host_overhead`'s result."""
    count = "streams" if "prompt_tokens" in result else "batch"
    scope = (
        f"server host work per decode step ({result['prompt_tokens']}-token prompts"
        if count == "streams"
        else f"generate loop host work per decode step (vocabulary {result['vocab']}"
    )
    return format_table(
        ["sampling", count, "min ms/step", "median ms/step"],
        [[r["setting"], r[count], r["min_ms"], r["median_ms"]] for r in result["rows"]],
        f"{scope}, {result['steps']} steps; the backend answers at once)",
    )


SERVER_SETTINGS = [("greedy", SamplingParams()), ("Gemma-3's T 1.0, top-k 64, top-p 0.95", GEMMA)]
SERVER_PROMPT = 1024  # tokens of each stream's prompt


def server_host_overhead(
    model_dir: Path, logits: np.ndarray, streams: list[int], steps: int, warmup: int, rounds: int
) -> dict[str, Any]:
    """ms of the server's own work per decode step: that many streams submitted at once to a
    `runtime.serving.Engine` over a backend answering at once, each a prompt of
    SERVER_PROMPT tokens and `steps` new tokens (seeded per stream; no EOS), read to the end;
    a round's wall time over `steps`."""
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = list(range(1, SERVER_PROMPT + 1))
    rows = []
    for name, base in SERVER_SETTINGS:
        for n in streams:
            samples = []
            for _ in range(warmup + rounds):
                engine = Engine(InstantBackend(logits, n, SERVER_PROMPT + steps, 64), tokenizer)
                engine.gen.eos_ids = set()  # no EOS ends a stream early
                params = [
                    SamplingParams(**{**base.__dict__, "max_new_tokens": steps, "seed": i})
                    for i in range(n)
                ]
                t0 = time.perf_counter()
                for request in [engine.submit(prompt, p) for p in params]:
                    for _text in request:
                        pass
                samples.append((time.perf_counter() - t0) * 1000 / steps)
                engine.shutdown()
            rows.append({"setting": name, "streams": n, **stats(samples[warmup:])})
    return {"prompt_tokens": SERVER_PROMPT, "steps": steps, "rows": rows}
