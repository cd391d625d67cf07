"""--cpu, second part: what the generate loop itself adds to every decode step.

The shared loop (runtime.generate: sampling, the streaming detokenizer, stop handling) runs
over a backend that answers each call at once with the model's real next-token logits, so
the time per step is the host work a GPU engine's step cannot hide. Greedy decoding takes the
engine's argmax (next_token) and never sees the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.generate import Generator
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer
from tools.bench.report import format_table, stats

SETTINGS = {
    "greedy (argmax in the engine)": SamplingParams(),
    "T 1.0, top-k 64, top-p 0.95 (Gemma-3's default)": SamplingParams(
        temperature=1.0, top_k=64, top_p=0.95
    ),
    "T 0.7, top-k 20, top-p 0.8 (Qwen2.5's)": SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    "T 0.6, top-p 0.9 (Llama 3's)": SamplingParams(temperature=0.6, top_p=0.9),
    "T 1.0, no filter": SamplingParams(temperature=1.0),
    "T 1.0, top-k 64, repetition penalty 1.1": SamplingParams(
        temperature=1.0, top_k=64, repetition_penalty=1.1
    ),
}


class InstantBackend:
    """Answers every call at once: `logits` for each sequence, or their argmax."""

    def __init__(self, logits: np.ndarray, max_batch: int, max_seq_len: int):
        self.logits, self.argmax = logits, np.int32(logits.argmax())
        self.max_batch, self.max_seq_len, self.max_prefill = max_batch, max_seq_len, max_seq_len

    def reset(self, batch: int) -> None:
        pass

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, last: np.ndarray):
        return np.repeat(self.logits[None], len(input_ids), axis=0)  # a fresh array, as D2H gives

    def forward_greedy(self, input_ids: np.ndarray, position_ids: np.ndarray, last: np.ndarray):
        return np.full(len(input_ids), self.argmax, np.int32)


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
    backend = InstantBackend(logits, max(batches), 64 + steps)
    gen = Generator(backend, tokenizer, eos_ids=[])
    rows = []
    for name, base in SETTINGS.items():
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
    title = (
        f"generate loop host work per decode step (vocabulary {result['vocab']}, "
        f"{result['steps']} steps; the backend answers at once)"
    )
    return format_table(
        ["sampling", "batch", "min ms/step", "median ms/step"],
        [[r["setting"], r["batch"], r["min_ms"], r["median_ms"]] for r in result["rows"]],
        title,
    )
