"""What a forward call copies back (a `Readout`), which one a request needs, and its tokens.

Every backend computes all of a network's outputs; what leaves it differs. Plain greedy
decoding needs only the argmax (one id per sequence instead of the vocabulary's logits);
sampling with a top-k the engine covers needs only its best K logits and their ids, also
under a repetition penalty > 1, which only lowers logits (greedy is then top-k 1); top-p
alone needs them and the softmax's log-normalizer at the request's temperature. Those two
fall back to the latest call's logits on the steps the best K do not decide. Anything else
needs all the logits. `readout_for` makes that choice and `next_tokens_from` turns what came
back into tokens, so a new sampling mode changes this module and runtime/sampling.py only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from netdef.contract import LOG_NORMALIZER, LOGITS, NEXT_TOKEN, TOP_IDS, TOP_LOGITS

from .sampling import SamplingParams, next_tokens, next_tokens_from_top

Outputs = dict[str, np.ndarray]  # a forward call's result: output name -> array


@dataclass(frozen=True)
class Readout:
    """The outputs one forward call copies back; `temperature` feeds inv_temperature, which
    only the log-normalizer reads."""

    name: str
    outputs: tuple[str, ...]
    temperature: float = 1.0


ARGMAX = Readout("argmax", (NEXT_TOKEN,))  # int32 [B]
TOP_K = Readout("top_k", (TOP_LOGITS, TOP_IDS))  # float32 [B, K] best first, int32 [B, K]
ALL_LOGITS = Readout("logits", (LOGITS,))  # float32 [B, vocab] ([B, S, vocab] with all_logits)


def top_k_lse(temperature: float) -> Readout:
    """The best K and float32 [B] log sum exp(logits / temperature) over the vocabulary."""
    return Readout("top_p", (TOP_LOGITS, TOP_IDS, LOG_NORMALIZER), temperature)


def readout_for(params: SamplingParams, sample_top_k: int, has_log_normalizer: bool) -> Readout:
    """The least a decode step of `params` needs from an engine with these outputs."""
    penalty = params.repetition_penalty
    top_k = 1 if params.greedy else params.top_k
    if params.greedy and penalty == 1.0:
        return ARGMAX
    if 0 < top_k <= sample_top_k and penalty >= 1:
        return TOP_K
    if top_k == 0 and params.top_p < 1 and penalty == 1 and has_log_normalizer:
        return top_k_lse(params.temperature)
    return ALL_LOGITS


def may_fall_back(readout: Readout, params: SamplingParams) -> bool:
    """Whether some step of `readout` may need the latest call's whole logits."""
    return readout.name == "top_p" or (readout == TOP_K and params.repetition_penalty != 1)


def next_tokens_from(
    out: Outputs,
    params: SamplingParams,
    u: np.ndarray | None,
    seen: list[np.ndarray],
    whole_logits: Callable[[], np.ndarray],
) -> np.ndarray:
    """[B] next token ids from one call's outputs (of any Readout above), each row's by its
    uniform number in u (runtime.sampling.uniforms); `whole_logits` gives the latest call's
    logits for the rows the best K do not decide."""
    if NEXT_TOKEN in out:
        return out[NEXT_TOKEN]
    if TOP_IDS in out:
        return next_tokens_from_top(
            out[TOP_LOGITS], out[TOP_IDS], params, u, out.get(LOG_NORMALIZER), whole_logits, seen
        )
    return next_tokens(out[LOGITS], params, seen, u)
