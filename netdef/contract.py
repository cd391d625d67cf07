"""The engine I/O contract: the one place that names an engine's tensors and their types.

The network definer (netdef.decoder) marks these tensors, the CPU and TensorRT backends feed
and read them, `metadata.json` records them and the tools describe them; each takes the
names, dtypes and defaults from here. It imports neither TensorRT nor the definer, so a
runtime can load an engine with only this, `netdef.slots` and `netdef.artifact`.
docs/architecture.md ("Engine I/O contract") has the table with shapes and meaning.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from weights.safetensors_file import DEFAULT_DTYPE, MODEL_DTYPES  # noqa: F401  (re-exported)

# Bumped whenever this contract changes: an older artifact is refused at load, and its build
# key changes. 2: inv_temperature, log_normalizer, gather splits; 3: window_slots, matmul
# attention; 4: sliding layers' KV rings, window_positions; 5: next_token drawn in the engine
# (uniform, top_k, top_p); 6: one KV cache per layer, keys and values stacked on the head axis.
FORMAT_VERSION = 6
# Bumped whenever the network changes within this contract (its layers, weight layouts or
# profiles): the build key changes, so tools.build builds anew instead of reusing an older
# artifact, which still loads and runs. 1: the MLP's weights [in, out], the passes over the
# vocabulary in blocks, global layers' cache read as a slice (artifacts without the field are
# older).
NETWORK_VERSION = 1

# Inputs
INPUT_IDS = "input_ids"  # int32 [B, S], right-padded
POSITION_IDS = "position_ids"  # int32 [B, S], the cache slot of each token
LAST_TOKEN_INDEX = "last_token_index"  # int32 [B], whose logits come back
INV_TEMPERATURE = "inv_temperature"  # float32 [B], in networks with top_logits
UNIFORM = "uniform"  # float32 [B]: next_token's draw in [0, 1), or < 0 for the argmax
FILTER_TOP_K = "top_k"  # int32 [B]: the draw's top-k filter, 1..K
FILTER_TOP_P = "top_p"  # float32 [B]: the draw's top-p filter, (0, 1]
WINDOW_POSITIONS = "window_positions"  # int32 [B, Lw]: what sliding layers read (netdef.slots)
GLOBAL_POSITIONS = "global_positions"  # int32 [Lg]: what global layers read (netdef.slots)
TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS, LAST_TOKEN_INDEX)  # every call feeds these
# [B] per row of a call, in networks with top_logits (runtime.readout.sampling_feeds)
SAMPLING_INPUTS = {
    INV_TEMPERATURE: "float",
    UNIFORM: "float",
    FILTER_TOP_K: "int32",
    FILTER_TOP_P: "float",
}
POSITION_INPUTS = (WINDOW_POSITIONS, GLOBAL_POSITIONS)  # int32, in networks with such layers

# Outputs a call may read back (the others are the present_* KV caches)
LOGITS = "logits"  # float32 [B, vocab] ([B, S, vocab] with all_logits)
NEXT_TOKEN = "next_token"  # int32 [B], argmax of logits, or drawn (UNIFORM)
TOP_LOGITS = "top_logits"  # float32 [B, K], the best K logits, best first
TOP_IDS = "top_ids"  # int32 [B, K], their ids
LOG_NORMALIZER = "log_normalizer"  # float32 [B], log sum exp(logits * inv_temperature)
RESULTS = {  # name -> TensorRT dtype name
    LOGITS: "float",
    NEXT_TOKEN: "int32",
    TOP_LOGITS: "float",
    TOP_IDS: "int32",
    LOG_NORMALIZER: "float",
}

# Optimization profile sets, the default first, each naming its profiles in order (the
# backend picks a profile by name: runtime.tensorrt_backend.choose_profile): decode steps
# (S = 1), prompt chunks and one sequence's full chunk of max_prefill tokens; the same
# without the last (a faster build); one profile for every call. With decode_long,
# 'decode-long' follows 'decode' (netdef.options.NetworkOptions.profiles).
PROFILE_SETS = ("decode,prefill,chunk", "decode,prefill", "dynamic")


def past(layer: int) -> str:
    """The KV-cache input of one layer, past_kv_<i>: [B, 2 * kv_heads, slots, head_dim], the
    keys' heads first, then the values' (one gather reads both)."""
    return f"past_kv_{layer}"


def present(layer: int) -> str:
    """The KV-cache output bound to the same memory as `past(layer)`."""
    return f"present_kv_{layer}"


def past_of(present_name: str) -> str:
    return present_name.replace("present_", "past_", 1)


# Dtypes: the model dtypes a network may be built in (weights' MODEL_DTYPES), and every
# TensorRT tensor type the project uses by its DataType name lowercased (as metadata.json
# spells it), with its NumPy counterpart (bfloat16, INT4 and FP8 from ml_dtypes).
TENSOR_DTYPES = {
    "float": np.dtype(np.float32),
    "half": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(ml_dtypes.int4),
    "fp8": np.dtype(ml_dtypes.float8_e4m3fn),
    "bool": np.dtype(np.bool_),
}
TENSOR_DTYPE_NAMES = {dtype: name for name, dtype in TENSOR_DTYPES.items()}
# An engine's inputs and outputs: INT4 and FP8 appear only inside it, as quantized weights.
IO_DTYPES = {n: d for n, d in TENSOR_DTYPES.items() if n not in ("int4", "fp8")}


def trt_dtype(trt: Any, dtype: np.dtype) -> Any:
    """The TensorRT DataType of a NumPy dtype."""
    return trt.DataType.__members__[TENSOR_DTYPE_NAMES[np.dtype(dtype)].upper()]


def dtype_name(trt_type: Any) -> str:
    """A TensorRT DataType as metadata.json names it ('float', 'bf16', ...)."""
    return trt_type.name.lower()


def normalize_target(target: str) -> str:
    """A compute-capability target as 'sm<digits>': 'sm89', 'SM89' and '8.9' -> 'sm89'."""
    return "sm" + target.lower().removeprefix("sm").replace(".", "")


def target_capability(target: str) -> tuple[int, int]:
    """'sm89' or '8.9' -> (8, 9); 'sm120' -> (12, 0)."""
    digits = normalize_target(target)[2:]
    return int(digits[:-1]), int(digits[-1])


def contract_problems(io: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What an engine's I/O list (metadata.json's `io`) breaks of this contract, for a runtime
    that relies on it; empty when nothing."""
    inputs = {t["name"]: t["dtype"] for t in io["inputs"]}
    outputs = {t["name"]: t["dtype"] for t in io["outputs"]}
    problems = [f"input {n} must be int32" for n in TOKEN_INPUTS if inputs.get(n) != "int32"]
    problems += [
        f"input {n} must be int32" for n in POSITION_INPUTS if inputs.get(n, "int32") != "int32"
    ]
    if LOGITS not in outputs:
        problems.append(f"output {LOGITS} is missing")
    for name, dtype in RESULTS.items():
        if outputs.get(name, dtype) != dtype:
            problems.append(f"output {name} must be {'float32' if dtype == 'float' else dtype}")
    pasts = {n for n in inputs if n.startswith("past_")}
    presents = {past_of(n) for n in outputs if n not in RESULTS}
    if pasts != presents:
        problems.append(
            f"outputs other than {', '.join(list(RESULTS)[:-1])} and {LOG_NORMALIZER} "
            "must be exactly present_* for every past_*"
        )
    present = {n in inputs for n in SAMPLING_INPUTS} | {LOG_NORMALIZER in outputs}
    if len(present) > 1:
        names = ", ".join(SAMPLING_INPUTS)
        problems.append(f"inputs {names} and output {LOG_NORMALIZER} go together")
    for name, dtype in SAMPLING_INPUTS.items():
        if inputs.get(name, dtype) != dtype:
            problems.append(f"input {name} must be {'float32' if dtype == 'float' else dtype}")
    all_io = {**inputs, **outputs}
    problems += [f"{n} has unsupported dtype {d}" for n, d in all_io.items() if d not in IO_DTYPES]
    if extra := sorted(inputs.keys() - pasts - {*TOKEN_INPUTS, *SAMPLING_INPUTS, *POSITION_INPUTS}):
        problems.append(f"unknown inputs {', '.join(extra)}")
    return problems
