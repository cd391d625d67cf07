"""The CPU backend: a decoder network executed by the NumPy reference executor.

It owns the KV cache arrays the way the TensorRT backend owns device buffers: allocated
once per batch size, fed as the past_* inputs and updated in place by the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from netdef.decoder import DecoderNetwork
from netdef.graph import DTYPES
from netdef.slots import ring_crossing, rings, slot_feeds

from .backend import check_row
from .reference import Executor


class CpuModel:
    """`runtime.backend.Backend` on the CPU."""

    def __init__(self, dn: DecoderNetwork):
        self.dn = dn
        self.executor = Executor.for_network(dn)
        self.caches: dict[str, np.ndarray] = {}
        self.batch = 0  # rows of the caches
        self.last: dict[str, np.ndarray] = {}  # the latest call's outputs

    @property
    def max_batch(self) -> int:
        return self.dn.options.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.dn.options.max_seq_len

    @property
    def max_prefill(self) -> int:
        return self.dn.options.prefill_len

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
        dtype = DTYPES[self.dn.options.dtype]
        self.batch = batch
        self.caches = {
            f"past_{kind}_{i}": np.zeros((batch, *shape), dtype)
            for i, shape in enumerate(self.dn.kv_cache_shapes)
            for kind in ("key", "value")
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

    def forward(self, input_ids, position_ids, last_token_index) -> np.ndarray:
        """One network call; returns float32 logits ([B, V], or [B, S, V] for all-logits networks)."""
        return self._run(input_ids, position_ids, last_token_index)["logits"]

    def forward_greedy(self, input_ids, position_ids, last_token_index) -> np.ndarray:
        """One network call; returns the network's int32 [B] next_token (argmax of the logits)."""
        return self._run(input_ids, position_ids, last_token_index)["next_token"]

    def forward_top_k(self, input_ids, position_ids, last_token_index):
        """One network call; returns its top_logits [B, K] and top_ids [B, K]."""
        out = self._run(input_ids, position_ids, last_token_index)
        return out["top_logits"], out["top_ids"]

    def forward_top_p(self, input_ids, position_ids, last_token_index, temperature: float):
        """One network call; its top_logits, top_ids and log_normalizer at `temperature`."""
        out = self._run(input_ids, position_ids, last_token_index, temperature)
        return out["top_logits"], out["top_ids"], out["log_normalizer"]

    def last_logits(self) -> np.ndarray:
        """The latest call's logits."""
        return self.last["logits"]

    def feeds(
        self, input_ids, position_ids, last_token_index, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Every network input of one call: the tokens, the first B rows of the KV caches (a
        call of B sequences uses rows 0..B-1, as on the GPU) and the attended positions."""
        positions = np.ascontiguousarray(position_ids, dtype=np.int32)
        if why := ring_crossing(positions, self.rings):
            raise ValueError(why)
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int32),
            "position_ids": positions,
            "last_token_index": np.ascontiguousarray(last_token_index, dtype=np.int32),
            **{name: cache[: len(positions)] for name, cache in self.caches.items()},
            **slot_feeds(positions, self.max_seq_len, self.dn.window, self.dn.has_global),
        }
        if self.has_log_normalizer:
            feeds["inv_temperature"] = np.full(len(feeds["input_ids"]), 1 / temperature, np.float32)
        return feeds

    def _run(
        self, input_ids, position_ids, last_token_index, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        self.last = self.executor.run(
            self.feeds(input_ids, position_ids, last_token_index, temperature)
        )
        return self.last
