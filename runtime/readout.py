"""What a forward call copies back (a `Readout`), which one a request needs, and its tokens.

Every backend computes all of a network's outputs; what leaves it differs. Greedy decoding,
and sampling with a top-k the engine covers and no repetition penalty, need only next_token
(one id per sequence instead of the vocabulary's logits): the engine takes the argmax or
draws the token itself from its best K, given each row's uniform number and filters
(`sampling_feeds`). Under a repetition penalty > 1, which only lowers logits, such a top-k
(greedy is then top-k 1) needs the best K logits and their ids, drawn from on the host; top-p
alone needs them and the softmax's log-normalizer at each row's temperature. Those two
fall back to the latest call's logits on the steps the best K do not decide. Anything else
needs all the logits. `readout_for` makes that choice and `next_tokens_from` turns what came
back into tokens, so a new sampling mode changes this module and runtime/sampling.py only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from netdef.contract import (
    FILTER_TOP_K,
    FILTER_TOP_P,
    INV_TEMPERATURE,
    LOG_NORMALIZER,
    LOGITS,
    NEXT_TOKEN,
    TOP_IDS,
    TOP_LOGITS,
    UNIFORM,
)

from .sampling import SamplingParams, next_tokens, next_tokens_from_top

Outputs = dict[str, np.ndarray]  # a forward call's result: output name -> array
# A row's sampling parameters and, where the engine draws its next_token, the uniform number it
# draws by (None: the argmax); a call's per row (None: greedy), or None for a greedy call.
Draw = tuple[SamplingParams, float | None]
Draws = Sequence[Draw | None] | None


@dataclass(frozen=True)
class Readout:
    """The outputs one forward call copies back."""

    name: str
    outputs: tuple[str, ...]


ARGMAX = Readout("argmax", (NEXT_TOKEN,))  # int32 [B]: the argmax, or drawn (`engine_draws`)
TOP_K = Readout("top_k", (TOP_LOGITS, TOP_IDS))  # float32 [B, K] best first, int32 [B, K]
# the best K and float32 [B] log sum exp(logits / temperature) over the vocabulary, each row
# at its own temperature (`sampling_feeds`)
TOP_P = Readout("top_p", (TOP_LOGITS, TOP_IDS, LOG_NORMALIZER))
ALL_LOGITS = Readout("logits", (LOGITS,))  # float32 [B, vocab] ([B, S, vocab] with all_logits)


def engine_draws(params: SamplingParams, sample_top_k: int) -> bool:
    """Whether an engine with the best `sample_top_k` logits draws the tokens of `params`
    itself (netdef.decoder._Decoder.draw): sampling with a top-k it covers, no penalty."""
    return not params.greedy and params.repetition_penalty == 1 and 0 < params.top_k <= sample_top_k


def readout_for(params: SamplingParams, sample_top_k: int, has_log_normalizer: bool) -> Readout:
    """The least a decode step of `params` needs from an engine with these outputs."""
    penalty = params.repetition_penalty
    top_k = 1 if params.greedy else params.top_k
    if (params.greedy and penalty == 1.0) or engine_draws(params, sample_top_k):
        return ARGMAX
    if 0 < top_k <= sample_top_k and penalty >= 1:
        return TOP_K
    if top_k == 0 and params.top_p < 1 and penalty == 1 and has_log_normalizer:
        return TOP_P
    return ALL_LOGITS


def may_fall_back(readout: Readout, params: SamplingParams) -> bool:
    """Whether some step of `readout` may need the latest call's whole logits."""
    return readout == TOP_P or (readout == TOP_K and params.repetition_penalty != 1)


def draws_for(params: SamplingParams, u: float | None) -> Draw | None:
    """A row's `Draw`: None for greedy decoding, else its parameters and `u` (None where the
    host draws its token)."""
    return None if params.greedy else (params, u)


def sampling_feeds(draws: Draws, batch: int) -> Outputs:
    """The sampling inputs (netdef.contract.SAMPLING_INPUTS) of one call of `batch` rows from
    each row's `Draw`: inv_temperature its 1/T (1 where greedy), and where the engine draws
    the row's next_token, its uniform number and filters (elsewhere uniform -1: the argmax)."""
    rows = list(draws or [None] * batch)
    if len(rows) != batch or any(d and d[0].greedy for d in rows):
        raise ValueError(f"a call of {batch} rows takes {batch} draws, none greedy.")
    drawn = [d if d and d[1] is not None else None for d in rows]
    return {
        INV_TEMPERATURE: np.array([1 / d[0].temperature if d else 1.0 for d in rows], np.float32),
        UNIFORM: np.array([d[1] if d else -1.0 for d in drawn], np.float32),
        FILTER_TOP_K: np.array([d[0].top_k if d else 1 for d in drawn], np.int32),
        FILTER_TOP_P: np.array([d[0].top_p if d else 1.0 for d in drawn], np.float32),
    }


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
