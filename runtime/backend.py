"""The protocol the generate loop drives; CpuBackend (runtime/cpu.py) and TensorRTBackend
(runtime/tensorrt_backend.py) implement it."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from .readout import Draws, Outputs, Readout


class Backend(Protocol):
    """One decoder network with its KV caches (the engine I/O contract, netdef.contract)."""

    max_batch: int  # largest B any call may use
    max_seq_len: int  # KV-cache slots per sequence
    model_context: int  # the model's own context (max_position_embeddings): max_seq_len's bound
    max_prefill: int  # largest S of one call
    vocab_size: int  # token ids lie in [0, vocab_size): the embedding table's rows
    rings: tuple[int, ...]  # sliding layers' KV ring lengths: no call's row may cross one's end
    kv_bytes: int  # device (or host) memory of max_batch sequences' KV caches
    sample_top_k: int  # K of the TOP_K readout (0: the network has no top_logits/top_ids)
    has_log_normalizer: bool  # whether the TOP_P readout is available

    def reset(self, batch: int) -> None:
        """Prepare KV caches for `batch` new sequences (old contents need not be cleared)."""

    def row(self, k: int) -> AbstractContextManager[None]:
        """Calls inside the `with` block use KV-cache row k alone, as a batch of one (B = 1):
        a new sequence's prefill next to running ones (runtime/serving.py). Outside, a call
        of B rows uses rows 0..B-1."""

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> Outputs:
        """Run one call: int32 [B, S], int32 [B, S], int32 [B]; returns the outputs `readout`
        names (runtime.readout), by name. S == 1 is a decode step, S > 1 a prefill chunk.
        `draws`: per row, the sampling parameters and uniform number next_token is drawn by
        in the engine, or None for its argmax (runtime.readout.sampling_feeds)."""

    def submit(
        self,
        input_ids: np.ndarray | None,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> None:
        """Start one call as `forward` would and return before it ends; `collect` gives its
        outputs. input_ids None: a decode step (S == 1) of the previous call's rows, each fed
        that call's next_token without the host waiting for it, so decoding whose tokens the
        engine picks (greedy, or drawn in it) keeps a step in flight while the host handles
        the last one (at most two calls in flight; other calls need none)."""

    def collect(self) -> Outputs:
        """The outputs of the oldest call submitted and not yet collected (waits for it)."""

    def last_logits(self) -> np.ndarray:
        """The float32 logits of the latest call (for the steps where the best K fall short)."""

    def close(self) -> None:
        """Release what the backend holds; the TensorRT backend first keeps the kernels
        TensorRT-RTX compiled for this GPU (runtime.tensorrt_backend.JitCache)."""

    def __enter__(self) -> Backend:
        """`with backend:` closes it at the end, on either backend."""

    def __exit__(self, *exc: object) -> None:
        """`close()`."""


def check_row(k: int, rows: int) -> None:
    """`Backend.row`'s argument check, shared by the backends."""
    if not 0 <= k < rows:
        raise ValueError(f"cache row {k} is outside the caches' rows 0..{rows - 1}.")
