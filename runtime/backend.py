"""What the generate loop needs from a backend; the TensorRT and CPU backends both provide it."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """One decoder network with its KV caches (the engine I/O contract in docs/architecture.md)."""

    max_batch: int  # largest B any call may use
    max_seq_len: int  # KV-cache slots per sequence
    max_prefill: int  # largest S of one call
    rings: tuple[int, ...]  # sliding layers' KV ring lengths: no call's row may cross one's end
    kv_bytes: int  # device (or host) memory of max_batch sequences' KV caches
    sample_top_k: int  # K of forward_top_k (0: the engine has no top_logits/top_ids)
    has_log_normalizer: bool  # whether forward_top_p is available

    def reset(self, batch: int) -> None:
        """Prepare KV caches for `batch` new sequences (old contents need not be cleared)."""

    def row(self, k: int) -> AbstractContextManager[None]:
        """Calls inside the `with` block use KV-cache row k alone, as a batch of one (B = 1):
        a new sequence's prefill next to running ones (runtime/serving.py). Outside, a call
        of B rows uses rows 0..B-1."""

    def forward(
        self, input_ids: np.ndarray, position_ids: np.ndarray, last_token_index: np.ndarray
    ) -> np.ndarray:
        """Run one call: int32 [B, S], int32 [B, S], int32 [B] -> float32 logits [B, vocab].

        S == 1 is a decode step (decode profile), S > 1 a prefill chunk (prefill profile).
        """

    def forward_greedy(
        self, input_ids: np.ndarray, position_ids: np.ndarray, last_token_index: np.ndarray
    ) -> np.ndarray:
        """The same call, returning only int32 [B] argmax ids (the network's next_token output)."""

    def forward_top_k(
        self, input_ids: np.ndarray, position_ids: np.ndarray, last_token_index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same call, returning only the best sample_top_k logits, float32 [B, K] best
        first, and their int32 [B, K] token ids (the network's top_logits and top_ids)."""

    def forward_top_p(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        temperature: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """forward_top_k's outputs and float32 [B] log sum exp(logits / temperature) over the
        vocabulary (the network's log_normalizer, fed inv_temperature = 1 / temperature)."""

    def last_logits(self) -> np.ndarray:
        """The float32 logits of the latest call (for the steps where the best K fall short)."""


def check_row(k: int, rows: int) -> None:
    """`Backend.row`'s argument check, shared by the backends."""
    if not 0 <= k < rows:
        raise ValueError(f"cache row {k} is outside the caches' rows 0..{rows - 1}.")
