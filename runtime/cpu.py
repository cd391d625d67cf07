"""The CPU backend: a decoder network executed by the NumPy reference executor.

It owns the KV cache arrays the way the TensorRT backend owns device buffers: allocated
once per batch size, fed as the past_* inputs and updated in place by the network.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from netdef.contract import (
    INPUT_IDS,
    LAST_TOKEN_INDEX,
    LOGITS,
    MODEL_DTYPES,
    NEXT_TOKEN,
    POSITION_IDS,
    past,
)
from netdef.decoder import DecoderNetwork
from netdef.slots import ring_crossing, rings, slot_feeds

from .backend import check_row
from .readout import ALL_LOGITS, Draws, Outputs, Readout, sampling_feeds
from .reference import Executor


class CpuBackend:
    """`runtime.backend.Backend` on the CPU. One executor run computes every output; a call
    returns those its readout names."""

    def __init__(self, dn: DecoderNetwork):
        if not isinstance(dn, DecoderNetwork):  # else an error from deep in the executor
            raise TypeError(
                "CpuBackend runs a network: CpuBackend(netdef.build_network(checkpoint, "
                f"options)), not a {type(dn).__name__}."
            )
        self.dn = dn
        self.executor = Executor.for_network(dn)
        self.caches: dict[str, np.ndarray] = {}
        self.batch = 0  # rows of the caches
        self.last: Outputs = {}  # the latest call's outputs
        self.pending: deque[Outputs] = deque()  # submitted calls' outputs, not yet collected

    @property
    def max_batch(self) -> int:
        return self.dn.options.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.dn.options.max_seq_len

    @property
    def model_context(self) -> int:
        return self.dn.config.max_position_embeddings

    @property
    def max_prefill(self) -> int:
        return self.dn.options.prefill_len

    @property
    def vocab_size(self) -> int:
        return self.dn.config.vocab_size

    @property
    def kv_bytes(self) -> int:
        """Bytes of max_batch sequences' KV caches."""
        return self.dn.options.kv_bytes(self.dn.config) * self.max_batch

    @property
    def rings(self) -> tuple[int, ...]:
        return rings(self.dn.options.cache_slots(self.dn.config), self.max_seq_len)

    @property
    def sample_top_k(self) -> int:
        return 0 if self.dn.options.all_logits else self.dn.options.sample_top_k

    @property
    def has_log_normalizer(self) -> bool:
        return self.sample_top_k > 0

    def reset(self, batch: int) -> None:
        """Fresh, zeroed KV caches for `batch` sequences."""
        dtype = MODEL_DTYPES[self.dn.options.dtype]
        self.batch = batch
        self.pending.clear()
        self.caches = {
            past(i): np.zeros((batch, *shape), dtype)
            for i, shape in enumerate(self.dn.kv_cache_shapes)
        }

    @contextmanager
    def row(self, k: int) -> Iterator[None]:
        """Calls inside run on cache row k alone, as a batch of one (continuous batching:
        one sequence's prefill without touching the others). The rows are views, so the
        network's in-place updates land in the whole caches."""
        check_row(k, self.batch)
        whole = self.caches
        self.caches = {name: cache[k : k + 1] for name, cache in whole.items()}
        try:
            yield
        finally:
            self.caches = whole

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> Outputs:
        """One network call; the outputs `readout` names."""
        if missing := [n for n in readout.outputs if n not in self.executor.output_names]:
            raise ValueError(f"this network has no {', '.join(missing)} output.")
        feeds = self.feeds(input_ids, position_ids, last_token_index, draws)
        self.last = self.executor.run(feeds)
        return {name: self.last[name] for name in readout.outputs}

    def submit(
        self,
        input_ids: np.ndarray | None,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> None:
        """`forward` now, its outputs kept for `collect`; input_ids None feeds each row the
        previous call's next_token (runtime.backend.Backend.submit)."""
        if input_ids is None:
            input_ids = self.last[NEXT_TOKEN][:, None]
        self.pending.append(self.forward(input_ids, position_ids, last_token_index, readout, draws))

    def collect(self) -> Outputs:
        """The oldest submitted call's outputs."""
        return self.pending.popleft()

    def last_logits(self) -> np.ndarray:
        """The latest call's logits."""
        return self.last[LOGITS]

    def close(self) -> None:
        """Nothing to release: the caches are NumPy arrays, freed with the backend."""

    def __enter__(self) -> CpuBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def feeds(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        draws: Draws = None,
    ) -> dict[str, np.ndarray]:
        """Every network input of one call: the tokens, the first B rows of the KV caches (a
        call of B sequences uses rows 0..B-1, as on the GPU), the attended positions and how
        next_token is chosen (runtime.readout.sampling_feeds)."""
        positions = np.ascontiguousarray(position_ids, dtype=np.int32)
        if why := ring_crossing(positions, self.rings):
            raise ValueError(why)
        feeds = {
            INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int32),
            POSITION_IDS: positions,
            LAST_TOKEN_INDEX: np.ascontiguousarray(last_token_index, dtype=np.int32),
            **{name: cache[: len(positions)] for name, cache in self.caches.items()},
            **slot_feeds(positions, self.max_seq_len, self.dn.window, self.dn.has_global),
        }
        if self.has_log_normalizer:
            feeds.update(sampling_feeds(draws, len(positions)))
        return feeds


def sequence_logits(model: CpuBackend, seqs: list[list[int]], prefill: int) -> np.ndarray:
    """[B, T_max, vocab] logits, NaN where a sequence has ended."""
    batch, t_max = len(seqs), max(len(s) for s in seqs)
    ids = np.zeros((batch, t_max), np.int32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    lengths = np.array([len(s) for s in seqs])
    model.reset(batch)
    positions = np.broadcast_to(np.arange(prefill, dtype=np.int32), (batch, prefill))
    last = np.minimum(lengths, prefill) - 1
    steps = [model.forward(ids[:, :prefill], positions, last, ALL_LOGITS)[LOGITS]]
    for t in tqdm(
        range(prefill, t_max),
        desc="decode",
        unit="tok",
        disable=t_max - prefill < 2,
        file=sys.stderr,
    ):
        steps.append(
            model.forward(
                ids[:, t : t + 1],
                np.full((batch, 1), t, np.int32),
                np.zeros(batch, np.int32),
                ALL_LOGITS,
            )[LOGITS]
        )
    logits = np.concatenate(steps, axis=1)
    logits[np.arange(t_max)[None, :] >= lengths[:, None]] = np.nan
    return logits
