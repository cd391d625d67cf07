"""A stand-in engine: the engine I/O contract (netdef.contract) with device copies instead of
TensorRT, so that `TensorRTBackend`'s CUDA path (buffers, bindings, profile switches, CUDA
graphs) can be checked on a GPU without TensorRT: by `python -m tools.gpu_check` and the
GPU tests of the backend and the bench."""

from __future__ import annotations

from netdef.contract import (
    FORMAT_VERSION,
    INPUT_IDS,
    INV_TEMPERATURE,
    LAST_TOKEN_INDEX,
    LOG_NORMALIZER,
    LOGITS,
    NEXT_TOKEN,
    POSITION_IDS,
    PROFILE_SETS,
    SAMPLING_INPUTS,
    TOP_IDS,
    TOP_LOGITS,
    past,
    present,
)

from .cuda_buffers import cuda, cudart


def fake_engine(
    max_batch: int = 4,
    max_prefill: int = 8,
    max_seq_len: int = 32,
    vocab: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    head_dim: int = 8,
    profile_set: str = PROFILE_SETS[0],
    sample_top_k: int = 4,
) -> tuple[dict, dict]:
    """(metadata.json, describe_engine output) of an imaginary engine following the contract."""
    cache = [2 * kv_heads, max_seq_len, head_dim]
    io: dict[str, list] = {
        "inputs": [
            {"name": INPUT_IDS, "dtype": "int32", "shape": [-1, -1]},
            {"name": POSITION_IDS, "dtype": "int32", "shape": [-1, -1]},
            {"name": LAST_TOKEN_INDEX, "dtype": "int32", "shape": [-1]},
        ],
        "outputs": [
            {"name": LOGITS, "dtype": "float", "shape": [-1, vocab]},
            {"name": NEXT_TOKEN, "dtype": "int32", "shape": [-1]},
        ],
    }
    if sample_top_k:
        io["outputs"] += [
            {"name": TOP_LOGITS, "dtype": "float", "shape": [-1, sample_top_k]},
            {"name": TOP_IDS, "dtype": "int32", "shape": [-1, sample_top_k]},
            {"name": LOG_NORMALIZER, "dtype": "float", "shape": [-1]},
        ]
    for i in range(layers):
        io["inputs"].append({"name": past(i), "dtype": "bf16", "shape": [-1, *cache]})
        io["outputs"].append({"name": present(i), "dtype": "bf16", "shape": [-1, *cache]})
    if sample_top_k:
        io["inputs"] += [
            {"name": name, "dtype": dtype, "shape": [-1]} for name, dtype in SAMPLING_INPUTS.items()
        ]
    b, p = max_batch, max_prefill
    ranges = {
        "decode": ((1, b, b), (1, 1, 1)),
        "prefill": ((1, 1, b), (1, min(4, p), p)),
        "chunk": ((1, 1, 1), (p, p, p)),
        "dynamic": ((1, 1, b), (1, min(4, p), p)),
    }
    names = profile_set.split(",")
    profiles = []
    for name in names:
        batch, seq = ranges[name]
        shapes = {
            INPUT_IDS: [[bb, ss] for bb, ss in zip(batch, seq)],
            POSITION_IDS: [[bb, ss] for bb, ss in zip(batch, seq)],
            LAST_TOKEN_INDEX: [[bb] for bb in batch],
        }
        for t in io["inputs"][3:]:
            shape = cache if t["name"].startswith("past_") else []
            shapes[t["name"]] = [[bb, *shape] for bb in batch]
        profiles.append({"name": name, "shapes": shapes})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": {"vocab_size": vocab, "max_position_embeddings": max_seq_len},
        "options": {"max_batch": b, "max_seq_len": max_seq_len, "max_prefill": p},
        "profiles": profiles,
        "io": io,
        "backend": {"module": "tensorrt", "version": "10.15.1.29"},
        "target": None,
    }
    return meta, {"io": io, "profiles": [p["shapes"] for p in profiles]}


class CopyContext:
    """Stand-in for TensorRT's IExecutionContext. "Executing" enqueues device copies at the
    bound addresses: input_ids → logits (as raw int32 words), and its first B words →
    next_token, top_logits (raw) and top_ids; inv_temperature → log_normalizer; position_ids →
    the start of present_kv_0, which must be past_kv_0's memory. `executions` counts host
    calls, so graph replays (which make none) are visible."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile_switches: list[int] = []
        self.executions = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile_switches.append(index)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        b, s = self.shapes[INPUT_IDS]
        kind = cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        a = self.addresses
        cuda("cudaMemcpyAsync", a[LOGITS], a[INPUT_IDS], b * s * 4, kind, stream)
        cuda("cudaMemcpyAsync", a[NEXT_TOKEN], a[INPUT_IDS], b * 4, kind, stream)
        for top in (TOP_LOGITS, TOP_IDS):
            if top in a:
                cuda("cudaMemcpyAsync", a[top], a[INPUT_IDS], b * 4, kind, stream)
        if LOG_NORMALIZER in a:
            cuda("cudaMemcpyAsync", a[LOG_NORMALIZER], a[INV_TEMPERATURE], b * 4, kind, stream)
        cuda("cudaMemcpyAsync", a[present(0)], a[POSITION_IDS], b * s * 4, kind, stream)
        self.executions += 1
        return True
