"""The TensorRT backend: an engine artifact (tools/build.py) executed through cuda-python.

    with TensorRTBackend.load(artifact) as model:
        model.reset(1)
        out = model.forward(ids, positions, last, ALL_LOGITS)   # {"logits": float32 [B, vocab]}

Every device buffer is allocated once at load, sized from the engine's largest profile
shapes: input_ids, position_ids, last_token_index, the position inputs (netdef.slots), the outputs
and the KV caches (each present_* output is bound to its past_* input's address:
KVCacheUpdate writes in place). The small inputs and the outputs a call asks for go through
pinned host buffers on one stream. With `auto_graphs` (as `load` sets it), each decode step
shape (batch, position input shapes, outputs copied) runs plainly once and is captured as a
CUDA graph (H2D, execute, D2H) that later steps of that shape replay.

Greedy decoding need not wait for the host: `submit(None, ...)` enqueues a decode step fed
each row's `next_token` of the call before it by a device-to-device copy, while that call
may still run, and `collect` waits for the oldest call's outputs. Two calls in flight use
two sets of pinned host buffers (`hosts`), so the host stages one while the GPU reads the
other; runtime/generate.py keeps one step ahead that way.

TensorRT-RTX compiles its kernels for the GPU at load and for each new call shape; `JitCache`
keeps them in a file per artifact and GPU, read at the next load and rewritten on `close`.

What has been exercised: the pure checks below run in CI on the CPU; engines run on an H200
and an H100 through TensorRT-RTX 1.7 (sm89 engines, JIT for sm_90, the project's gpu-rig) in
`pytest -m gpu` (tests/runtime/test_engine_gpu.py) and `python -m tools.bench`.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from netdef.contract import (
    GLOBAL_POSITIONS,
    INPUT_IDS,
    IO_DTYPES,
    LAST_TOKEN_INDEX,
    LOG_NORMALIZER,
    LOGITS,
    NEXT_TOKEN,
    POSITION_IDS,
    POSITION_INPUTS,
    RESULTS,
    SAMPLING_INPUTS,
    TENSOR_DTYPES,
    TOKEN_INPUTS,
    TOP_IDS,
    TOP_LOGITS,
    WINDOW_POSITIONS,
    contract_problems,
    past_of,
    target_capability,
)
from netdef.slots import ring_crossing, rings, slot_feeds
from weights.folders import staged_file

if TYPE_CHECKING:  # loaded with the artifact: importing this module needs only the contract
    from netdef.artifact import Metadata

from .backend import check_row
from .cuda_buffers import (
    CudaGraph,
    DeviceBuffer,
    Event,
    EventTimer,
    PinnedBuffer,
    Stream,
    cuda,
    d2h,
    device_info,
    enqueue_step,
    free_bytes,
)
from .readout import Draws, Outputs, Readout, sampling_feeds

DTYPE_BYTES = {name: dtype.itemsize for name, dtype in IO_DTYPES.items()}
Shapes = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) of each position input
REBUILD = "rebuild it with python -m tools.build"


class EngineLoadError(RuntimeError):
    """The artifact cannot run here (wrong TensorRT, wrong GPU, inconsistent metadata)."""


# ---- pure checks over plain dicts (metadata.json and `describe_engine` output) ----


def check_portability(
    meta: dict, module: str, version: str, device_cc: tuple[int, int] | None
) -> None:
    """Engines run only under the TensorRT module and version that built them, on their target."""
    built = meta["backend"]
    if (built["module"], built["version"]) != (module, version):
        raise EngineLoadError(
            f"the engine was built by {built['module']} {built['version']} but {module} {version} "
            f"is installed; engines are not portable across TensorRT modules or versions: {REBUILD}."
        )
    target = meta.get("target")
    if target and device_cc is not None and target_capability(target) != tuple(device_cc):
        major, minor = device_cc
        raise EngineLoadError(
            f"the engine was built for {target} but this GPU is sm{major}{minor} (compute "
            f"capability {major}.{minor}); {REBUILD} --target sm{major}{minor}."
        )


def check_engine(meta: dict, engine: dict) -> None:
    """metadata.json's I/O list and profiles must be the deserialized engine's."""
    problems = []
    declared = {t["name"]: t for kind in ("inputs", "outputs") for t in meta["io"][kind]}
    actual = {t["name"]: t for kind in ("inputs", "outputs") for t in engine["io"][kind]}
    if only := sorted(declared.keys() - actual.keys()):
        problems.append(f"only in metadata.json: {', '.join(only)}")
    if only := sorted(actual.keys() - declared.keys()):
        problems.append(f"only in the engine: {', '.join(only)}")
    for name in sorted(declared.keys() & actual.keys()):
        d, a = declared[name], actual[name]
        # A dynamic dim may come back fixed where every profile pins it (max_batch 1).
        same_dims = len(d["shape"]) == len(a["shape"]) and all(
            want in (-1, got) for want, got in zip(d["shape"], a["shape"])
        )
        if d["dtype"] != a["dtype"] or not same_dims:
            problems.append(
                f"{name} is {d['dtype']} {list(d['shape'])} in metadata.json "
                f"but {a['dtype']} {list(a['shape'])} in the engine"
            )
    if len(meta["profiles"]) != len(engine["profiles"]):
        problems.append(
            f"{len(meta['profiles'])} profiles in metadata.json, {len(engine['profiles'])} in the engine"
        )
    else:
        for p, shapes in zip(meta["profiles"], engine["profiles"]):
            for name, ranges in p["shapes"].items():
                if [list(r) for r in ranges] != [list(r) for r in shapes.get(name, [])]:
                    problems.append(f"profile {p['name']!r} differs for {name}")
    if problems:
        raise EngineLoadError(
            f"metadata.json does not match the engine ({'; '.join(problems[:5])}); {REBUILD} --force."
        )


def check_contract(io: dict) -> None:
    """The engine I/O contract (netdef.contract), as far as this backend relies on it."""
    if problems := contract_problems(io):
        raise EngineLoadError(f"the engine breaks the I/O contract: {'; '.join(problems)}.")


def decode_reach(profiles: list[dict]) -> int | None:
    """The most global_positions the 'decode' profile takes where a 'decode-long' profile
    takes the longer ones, else None. `profiles`: metadata.json's, {"name", "shapes"} each."""
    shapes = {p["name"]: p["shapes"] for p in profiles}
    if "decode-long" not in shapes:
        return None
    return shapes["decode"][GLOBAL_POSITIONS][2][0]


def choose_profile(
    names: list[str],
    batch: int,
    seq_len: int,
    max_prefill: int,
    global_len: int = 0,
    reach: int | None = None,
) -> int:
    """Profile index for a call: 'dynamic' if that is the one, else 'decode' (S == 1), or
    'decode-long' for global_len past the `decode_reach` of an engine that has it, 'chunk'
    (one sequence of max_prefill tokens) where the engine has it, or 'prefill'."""
    if "dynamic" in names:
        name = "dynamic"
    elif seq_len == 1:
        name = "decode-long" if reach is not None and global_len > reach else "decode"
    elif batch == 1 and seq_len == max_prefill and "chunk" in names:
        name = "chunk"
    else:
        name = "prefill"
    if name not in names:
        raise EngineLoadError(f"the engine has no {name!r} profile (profiles: {names}).")
    return names.index(name)


def max_profile_shapes(profiles: list[dict[str, list]]) -> dict[str, tuple[int, ...]]:
    """Per input, the elementwise max of its max shape over all profiles."""
    out: dict[str, tuple[int, ...]] = {}
    for shapes in profiles:
        for name, (_, _, hi) in shapes.items():
            out[name] = tuple(max(a, b) for a, b in zip(out.get(name, hi), hi))
    return out


def resolve_dynamic(shape: list[int], batch: int, seq: int) -> tuple[int, ...]:
    """Fill an output's -1 dims in order with batch, then seq: logits [-1, V] or [-1, -1, V]."""
    fill = iter((batch, seq))
    return tuple(next(fill) if d == -1 else d for d in shape)


def buffer_plan(
    io: dict, max_shapes: dict[str, tuple[int, ...]], max_batch: int, max_seq: int
) -> dict[str, int]:
    """Bytes of device memory per input and per non-aliased output (present_* reuse past_*)."""
    plan = {
        t["name"]: int(np.prod(max_shapes[t["name"]])) * DTYPE_BYTES[t["dtype"]]
        for t in io["inputs"]
    }
    for t in io["outputs"]:
        if not t["name"].startswith("present_"):
            shape = resolve_dynamic(t["shape"], max_batch, max_seq)
            plan[t["name"]] = int(np.prod(shape)) * DTYPE_BYTES[t["dtype"]]
    return plan


def validate_call(
    ids: ArrayLike,
    positions: ArrayLike,
    last: ArrayLike,
    max_batch: int,
    max_prefill: int,
    max_seq_len: int,
    ring_lengths: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 C-contiguous (ids, positions, last), or ValueError before any GPU work. The row
    checks run on Python ints: for a decode step's few rows they cost a quarter of NumPy's
    reductions, and every microsecond here is host work the GPU waits for."""
    ids, positions, last = (np.ascontiguousarray(a, np.int32) for a in (ids, positions, last))
    if ids.ndim != 2 or positions.shape != ids.shape or last.shape != ids.shape[:1]:
        raise ValueError(
            f"expected input_ids and position_ids [B, S] and last_token_index [B]; got "
            f"{list(ids.shape)}, {list(positions.shape)}, {list(last.shape)}."
        )
    b, s = ids.shape
    if not 1 <= b <= max_batch:
        raise ValueError(f"batch of {b} is outside the engine's 1..max_batch={max_batch}.")
    if not 1 <= s <= max_prefill:
        raise ValueError(
            f"{s} tokens in one call is outside the engine's 1..max_prefill={max_prefill}."
        )
    first = positions[:, 0].tolist()
    if min(first) < 0 or max(first) + s > max_seq_len:
        raise ValueError(
            f"positions {min(first)}..{max(first) + s - 1} are beyond the KV cache "
            f"(slots 0..{max_seq_len - 1}, max_seq_len={max_seq_len})."
        )
    if s > 1 and np.any(positions != positions[:, :1] + np.arange(s, dtype=np.int32)):
        raise ValueError("each row of position_ids must be consecutive: p, p+1, ...")
    rows = last.tolist()
    if min(rows) < 0 or max(rows) >= s:
        raise ValueError(f"last_token_index must be in 0..{s - 1}.")
    if why := ring_crossing(positions, ring_lengths):
        raise ValueError(why)
    return ids, positions, last


def kv_cache_bytes(plan: dict[str, int]) -> int:
    """Bytes of the KV caches in a buffer plan (the past_* inputs; present_* share them)."""
    return sum(n for name, n in plan.items() if name.startswith("past_"))


def check_memory(
    plan: dict[str, int], free: int, max_batch: int, max_seq_len: int, decode_long: int = 0
) -> None:
    """Refuse, before allocating, buffers that do not fit the GPU's free memory, with
    `decode_long` bytes left for decode-long's execution context, made on its first call
    (past `decode_reach` positions): short of them that call would fail mid-generation."""
    from netdef.artifact import fmt_bytes

    need = sum(plan.values()) + decode_long
    if need <= free:
        return
    kv = kv_cache_bytes(plan)
    what, fix = "its buffers", "--max-seq-len or --max-batch"
    if decode_long:
        what = f"its buffers and decode-long's context ({fmt_bytes(decode_long)})"
        fix = "--max-seq-len or --max-batch, or with --no-decode-long"
    raise EngineLoadError(
        f"{what} need {fmt_bytes(need)}, of which the KV caches are {fmt_bytes(kv)} "
        f"({max_batch} x {fmt_bytes(kv // max_batch)} per sequence at max_seq_len "
        f"{max_seq_len}), but the GPU has {fmt_bytes(free)} free; rebuild it with a smaller "
        f"{fix} (python -m tools.build), or free GPU memory"
    )


# ---- TensorRT ----


def describe_engine(engine: Any, trt: Any) -> dict:
    """The engine's I/O tensors and profile shapes in metadata.json's format."""
    io: dict[str, list] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        dtype = engine.get_tensor_dtype(name).name.lower()
        io[kind].append(
            {"name": name, "dtype": dtype, "shape": list(engine.get_tensor_shape(name))}
        )
    profiles = [
        {
            t["name"]: [list(d) for d in engine.get_tensor_profile_shape(t["name"], p)]
            for t in io["inputs"]
        }
        for p in range(engine.num_optimization_profiles)
    ]
    return {"io": io, "profiles": profiles}


def runtime_config(
    engine: Any, trt: Any, rtx_graphs: bool = False, decode_only: bool = False
) -> Any:
    """TensorRT-RTX compiles each new shape's kernels on first use before running it (EAGER).
    Measured on an H200 (TensorRT-RTX 1.7, Gemma-3-1B shape): the default, LAZY, took 38 s
    to create the context and 8 s for the first prefill, running fallback kernels meanwhile;
    EAGER 2.0 s and 0.6 s, with the same steady-state speed. `rtx_graphs`: TensorRT-RTX
    captures and replays each call shape's kernels as a CUDA graph itself (the prefill
    context, `splits_contexts`). `decode_only`: the context's scratch memory is sized for
    the profile it is set to, not the largest (the decode context beside a prefill one)."""
    if not hasattr(engine, "create_runtime_config"):
        return None
    config = engine.create_runtime_config()
    if hasattr(config, "dynamic_shapes_kernel_specialization_strategy"):
        strategies = trt.DynamicShapesKernelSpecializationStrategy
        config.dynamic_shapes_kernel_specialization_strategy = strategies.EAGER
    if rtx_graphs:
        config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    if decode_only:
        strategy = trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
        config.set_execution_context_allocation_strategy(strategy)
    return config


def jit_cache_dir() -> Path:
    """Where the kernels TensorRT-RTX compiles are kept: beside the engine cache, not in the
    artifact (which may be read-only, and holds only what its build wrote)."""
    from weights.bundled import default_cache_dir

    return default_cache_dir() / "jit"


def jit_cache_path(meta: Metadata, cc: tuple[int, int]) -> Path:
    """The JIT cache file of this artifact on a GPU of compute capability `cc`."""
    return jit_cache_dir() / f"{meta.build_key[:16]}-sm{cc[0]}{cc[1]}.bin"


def kept_jit_caches(meta: Metadata) -> list[Path]:
    """The JIT cache files kept for this artifact (`jit_cache_path`), one per kind of GPU it
    ran on."""
    return sorted(jit_cache_dir().glob(f"{meta.build_key[:16]}-sm*.bin"))


class JitCache:
    """TensorRT-RTX's runtime cache (IRuntimeCache) read from and written to `path`: the
    kernels it JIT-compiles for this GPU when a context is made and for each new call shape
    (EAGER), so that the next process loading the artifact does not compile them again.
    A file it cannot read or TensorRT does not accept (another TensorRT-RTX or CUDA
    version) is replaced on `save`."""

    def __init__(self, path: Path, config: Any):
        self.path = Path(path)
        self.cache = config.create_runtime_cache()
        try:
            blob = self.path.read_bytes()
        except OSError:
            blob = b""
        self.loaded = len(blob) if blob and self.cache.deserialize(blob) else 0
        self._saved = hash(blob) if self.loaded else None
        self.attach(config)

    def attach(self, config: Any) -> None:
        """Let a context made with `config` read and add to this cache (several contexts of
        one engine share one, as TensorRT-Edge-LLM's RtxRuntimeCache does)."""
        config.set_runtime_cache(self.cache)

    def save(self) -> None:
        """Write the cache if it holds kernels the file does not, atomically (a partial file
        renamed into place); a folder it cannot write to gets a warning, not an error."""
        blob = bytes(memoryview(self.cache.serialize()))
        digest = hash(blob)
        if not blob or digest == self._saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with staged_file(self.path) as partial:
                partial.write_bytes(blob)
            self._saved = digest
        except OSError as e:
            print(
                f"warning: the compiled kernels were not kept in {self.path} ({e.strerror}); "
                "the next load compiles them again. Set TRT_NETDEF_CACHE to a writable folder.",
                file=sys.stderr,
            )


def is_decode(profile_name: str) -> bool:
    """'decode' and 'decode-long': S = 1 profiles, whose steps our CUDA graphs replay."""
    return profile_name.startswith("decode")


def splits_contexts(trt: Any, profile_names: list[str]) -> bool:
    """Whether the calls outside the decode profiles run in another execution context in
    which TensorRT-RTX graphs every call itself (`load`), and each decode profile has its
    own (our graphs hold that context's scratch memory, sized for its profile). Measured on
    an H200 (TensorRT-RTX 1.7, Gemma-3-1B shape, docs/benchmarks.md): its graphs took
    0.3-0.4 ms off prefills of 128 to 2,048 tokens, where enqueueing one held the host
    1.3-2.1 ms, but made decode steps slower than our graphs (2.56 against 2.33 ms), and
    ours cannot capture a call it graphs. Against one context on an H100 (the same engine,
    two rounds alternating): prefills of 128 / 512 / 2,048 tokens 1.5-4% / 3-9% / 4%
    faster, decode steps the same. It needs TensorRT-RTX and a decode profile beside
    others: a profile belongs to one context."""
    return (
        hasattr(trt, "CudaGraphStrategy") and "decode" in profile_names and len(profile_names) > 1
    )


class TensorRTBackend:
    """`runtime.backend.Backend` over one execution context, or two (`splits_contexts`).
    `load` an artifact; the constructor takes the parts (its Metadata, `describe_engine`'s
    dict and any objects with IExecutionContext's methods)."""

    def __init__(
        self,
        meta: Metadata,
        engine_desc: dict,
        context: Any,
        keep_alive: tuple = (),
        auto_graphs: bool = False,
        timed: bool = False,
        check_free_memory: bool = False,
        jit_cache: JitCache | None = None,
        prefill: Any = None,
        decode_long: Callable[[], Any] | None = None,
        decode_long_bytes: int = 0,
    ):
        self.max_batch, self.max_seq_len = meta.max_batch, meta.max_seq_len
        self.jit_cache = jit_cache  # saved by `close`
        self.max_prefill = meta.max_prefill
        self.vocab_size = meta.data["config"]["vocab_size"]  # the built model's (BUILT_FIELDS)
        self.model_context = meta.data["config"]["max_position_embeddings"]
        outputs = {t["name"]: t["shape"] for t in engine_desc["io"]["outputs"]}
        self.sample_top_k = outputs[TOP_IDS][-1] if TOP_IDS in outputs else 0
        self.has_log_normalizer = LOG_NORMALIZER in outputs
        self.profile_names = [p["name"] for p in meta.profiles]
        self.decode_reach = decode_reach(meta.profiles)
        self.io, self._keep_alive = engine_desc["io"], keep_alive
        # The decode profile's calls run in `context` (our CUDA graphs); with a `prefill`
        # context (`splits_contexts`: TensorRT-RTX graphs its calls) the others run there,
        # and decode-long's in the context `decode_long()` makes on its first call (the
        # profiles' order: `_context_of`). Made at load, that one, even idle, made decode's
        # graph replays 0.16 ms slower a step (H100, Gemma-3-1B shape, docs/benchmarks.md):
        # sessions that never pass global_opt positions do not pay for it.
        self.contexts = [context, *([None] if decode_long else []), *([prefill] if prefill else [])]
        self._make_decode_long = decode_long
        self.max_shapes = max_profile_shapes(engine_desc["profiles"])
        self.batch = 0
        self.last_call = (0, 0)  # (B, S) of the latest call submitted
        self.last_call_ms = 0.0  # GPU time of the latest call, when `timed`
        self.last_profile = ""  # the optimization profile the latest call ran in
        self.timed = timed  # CUDA events around each call (benchmarks); off, they cost host time
        self._device = cuda("cudaGetDevice")
        self._thread = threading.get_ident()  # the thread this device is known current on
        inputs = {t["name"] for t in self.io["inputs"]}
        self.window = meta.attention_window if WINDOW_POSITIONS in inputs else None
        self.has_global = GLOBAL_POSITIONS in inputs
        self.rings = rings(
            (t["shape"][2] for t in self.io["inputs"] if t["name"].startswith("past_")),
            self.max_seq_len,
        )
        extra = (*SAMPLING_INPUTS, *POSITION_INPUTS)
        self._uploads = [*TOKEN_INPUTS, *(n for n in extra if n in inputs)]
        # (B, position input shapes, outputs copied) -> a captured decode step
        self.graphs: dict[tuple[int, Shapes, tuple[str, ...]], CudaGraph] = {}
        # the same plus the host buffer set -> a captured chained step (`submit(None, ...)`)
        self.chained: dict[tuple[int, Shapes, tuple[str, ...], int], CudaGraph] = {}
        # calls submitted and not yet collected: (host set, B, S, outputs, profile)
        self._pending: deque[tuple[int, int, int, tuple[str, ...], int]] = deque()
        self.auto_graphs = auto_graphs  # capture each decode step shape on its first use;
        # off, calls run plainly (tools.bench --profile turns it off for a while)
        self._profile: list[int | None] = [None] * len(self.contexts)  # each context's
        self._row: int | None = None  # inside `row(k)`: the KV-cache row calls bind
        # (profile, B, S, position input shapes, row) each context is set up for
        self._state: list[tuple[int, int, int, Shapes, int | None] | None]
        self._state = [None] * len(self.contexts)
        self._active = 0  # the context of the latest call set up
        self.device: dict[str, DeviceBuffer] = {}
        # Two sets of pinned buffers, one per call in flight; the second shares the first's
        # logits (a chained call copies none back).
        self.hosts: tuple[dict[str, PinnedBuffer], dict[str, PinnedBuffer]] = ({}, {})
        self.stream: Stream | None = None
        self.done: list[Event] = []  # per host set: recorded after its call's last copy
        self.timers: list[EventTimer] = []  # per host set, when `timed`
        try:
            self.stream = Stream()
            self.done = [Event(), Event()]
            self.timers = [EventTimer(), EventTimer()]
            plan = buffer_plan(self.io, self.max_shapes, self.max_batch, self.max_prefill)
            self.kv_bytes = kv_cache_bytes(plan)  # all max_batch sequences' KV caches
            if check_free_memory:
                check_memory(
                    plan, free_bytes(), self.max_batch, self.max_seq_len, decode_long_bytes
                )
            for name, nbytes in plan.items():
                self.device[name] = DeviceBuffer(nbytes)
            self.addresses = {n: b.ptr for n, b in self.device.items()}
            # Bytes of one sequence's row of each KV cache (rows are contiguous: [B, ...]).
            dtypes = {t["name"]: t["dtype"] for t in self.io["inputs"]}
            self.row_bytes = {
                name: int(np.prod(self.max_shapes[name][1:])) * DTYPE_BYTES[dtypes[name]]
                for name in dtypes
                if name.startswith("past_")
            }
            for t in self.io["outputs"]:
                if t["name"].startswith("present_"):  # in-place KV cache update
                    past = past_of(t["name"])
                    self.addresses[t["name"]] = self.device[past].ptr
                    self.row_bytes[t["name"]] = self.row_bytes[past]
            for host in self.hosts:
                for name in (*TOKEN_INPUTS, *POSITION_INPUTS):
                    if name in plan:
                        host[name] = PinnedBuffer(plan[name] // 4, np.int32)
                if self.has_log_normalizer:  # with the sampling inputs (the contract)
                    for name, dtype in SAMPLING_INPUTS.items():
                        host[name] = PinnedBuffer(self.max_batch, TENSOR_DTYPES[dtype])
                for name, dtype in RESULTS.items():
                    if name in plan and (name != LOGITS or host is self.hosts[0]):
                        host[name] = PinnedBuffer(plan[name] // 4, TENSOR_DTYPES[dtype])
            if LOGITS in self.hosts[0]:
                self.hosts[1][LOGITS] = self.hosts[0][LOGITS]
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(
        cls,
        artifact: Path,
        trt: Any = None,
        cuda_graphs: bool = True,
        timed: bool = False,
        jit_cache: bool = True,
    ) -> TensorRTBackend:
        """Open `artifact` on the current GPU. With `jit_cache` (TensorRT-RTX), the kernels
        it compiles for this GPU are read from and, on `close`, kept in `jit_cache_path`."""
        from netdef.artifact import ENGINE_FILE, open_artifact
        from netdef.tensorrt_module import TensorRTModuleError, load_tensorrt

        artifact = Path(artifact)
        # An ArtifactError (a ValueError) if incomplete, unreadable or of another format.
        metadata = open_artifact(artifact)
        meta = metadata.data
        try:
            if trt is None:
                try:
                    trt = load_tensorrt(meta["backend"]["module"])
                except TensorRTModuleError as e:
                    raise EngineLoadError(
                        f"the engine was built by {meta['backend']['module']}: {e}"
                    ) from None
            check_portability(meta, trt.__name__, trt.__version__, None)  # needs no GPU
            if meta.get("target"):
                check_portability(meta, trt.__name__, trt.__version__, device_info().cc)
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine((artifact / ENGINE_FILE).read_bytes())
            if engine is None:
                raise EngineLoadError("TensorRT could not deserialize it (see its log above)")
            desc = describe_engine(engine, trt)
            check_engine(meta, desc)
            check_contract(desc["io"])
            names = [p["name"] for p in meta["profiles"]]
            two = cuda_graphs and splits_contexts(trt, names)
            config = runtime_config(engine, trt, decode_only=two)
            cache = None
            if jit_cache and hasattr(config, "create_runtime_cache") and metadata.build_key:
                cc = device_info().cc
                cache = JitCache(jit_cache_path(metadata, cc), config)
            context = (
                engine.create_execution_context(config)
                if config is not None
                else engine.create_execution_context()
            )

            def another(**kinds: bool) -> Any:
                """A context made after the first, so that TensorRT gives it a profile that
                no earlier one holds (in the profiles' order)."""
                extra = runtime_config(engine, trt, **kinds)
                if cache is not None:
                    cache.attach(extra)
                return engine.create_execution_context(extra)

            long, long_bytes = None, 0
            if two and "decode-long" in names:
                long = partial(another, decode_only=True)
                # its scratch memory, sized for its profile (decode_only), kept free at load
                long_bytes = engine.get_device_memory_size_for_profile_v2(
                    names.index("decode-long")
                )
            prefill = another(rtx_graphs=True) if two else None
            if context is None:
                raise EngineLoadError(
                    "TensorRT could not create an execution context (GPU memory?)"
                )
        except EngineLoadError as e:
            raise EngineLoadError(f"cannot load {artifact}: {e}") from None
        return cls(
            metadata,
            desc,
            context,
            keep_alive=(logger, runtime, engine),
            auto_graphs=cuda_graphs,
            timed=timed,
            check_free_memory=True,
            jit_cache=cache,
            prefill=prefill,
            decode_long=long,
            decode_long_bytes=long_bytes,
        )

    def reset(self, batch: int) -> None:
        """Caches are sized for max_batch and need no clearing (stale slots are never read).
        Calls still in flight are waited for and their outputs dropped."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(
                f"batch of {batch} is outside the engine's 1..max_batch={self.max_batch}."
            )
        while self._pending:
            self.collect()
        self.batch = batch

    @contextmanager
    def row(self, k: int) -> Iterator[None]:
        """Calls inside bind every past_*/present_* tensor at row k of its cache (base +
        k * row bytes) with B = 1. They run plainly: CUDA graphs hold base addresses, so
        they are neither captured nor replayed here, and the next call outside re-binds."""
        check_row(k, self.batch)
        self._idle("a call on one cache row")
        self._row = k
        try:
            yield
        finally:
            self._row = None

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> Outputs:
        """One call; copies back only the outputs `readout` names: 4 bytes per sequence for
        ARGMAX, 8 per candidate and sequence for TOP_K (plus 4 with the log-normalizer)
        instead of the vocabulary's logits, which stay on the GPU for `last_logits`."""
        self._idle("forward")
        self.submit(input_ids, position_ids, last_token_index, readout, draws)
        return self.collect()

    def submit(
        self,
        input_ids: np.ndarray | None,
        position_ids: np.ndarray,
        last_token_index: np.ndarray,
        readout: Readout,
        draws: Draws = None,
    ) -> None:
        """Enqueue one call as `forward` would, without waiting for it. input_ids None: a
        decode step of the previous call's rows, each fed that call's `next_token` on the
        device; it may start while that call is still in flight (two at most). Any other call
        needs none in flight."""
        wanted = readout.outputs
        if missing := [n for n in wanted if n not in self.hosts[0]]:
            raise ValueError(f"this engine has no {', '.join(missing)} output; rebuild it.")
        chained = input_ids is None
        if chained:
            b = self.last_call[0]
            if not b or self._row is not None or LOGITS in wanted:
                raise ValueError(
                    "a chained call (input_ids None) follows a call on the caches' first rows "
                    "and copies back no logits."
                )
            if np.shape(position_ids) != (b, 1):
                raise ValueError(
                    f"a chained call is one decode step of the previous call's {b} rows: "
                    f"position_ids must be [{b}, 1], not {list(np.shape(position_ids))}."
                )
            if len(self._pending) == 2:
                raise RuntimeError("two calls are in flight; collect one first.")
            input_ids = np.zeros((b, 1), np.int32)  # checked for shape; the device feeds it
        else:
            self._idle("a call with input_ids")
        self._make_current()
        ids, pos, last = validate_call(
            input_ids,
            position_ids,
            last_token_index,
            self.max_batch,
            self.max_prefill,
            self.max_seq_len,
            self.rings,
        )
        b, s = ids.shape
        if self._row is not None and b != 1:
            raise ValueError(f"a call on cache row {self._row} has batch 1, not {b}.")
        lane = 1 - self._pending[-1][0] if self._pending else 0  # the host buffer set
        feeds = slot_feeds(pos, self.max_seq_len, self.window, self.has_global)
        shapes = tuple((name, a.shape) for name, a in feeds.items())
        if self.has_log_normalizer:
            feeds.update(sampling_feeds(draws, b))
        global_len = len(feeds[GLOBAL_POSITIONS]) if self.has_global else 0
        profile = choose_profile(
            self.profile_names, b, s, self.max_prefill, global_len, self.decode_reach
        )
        key = (profile, b, s, shapes, self._row)
        plain = self._row is None  # a call on the caches' first rows: CUDA graphs apply
        graphs: dict = self.chained if chained else self.graphs
        gkey = (b, shapes, wanted, lane) if chained else (b, shapes, wanted)
        ready = self._state[self._context_of(profile)] == key  # set up for this call
        replay = plain and self.auto_graphs and s == 1 and ready  # else a plain call
        graph = graphs.get(gkey) if replay else None
        self._stage(lane, None if chained else ids, pos, last, feeds)
        if self.timed:
            self.timers[lane].start(self.stream)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._prepare(key)
            self._enqueue(lane, chained, b, s, wanted)
        if self.timed:
            self.timers[lane].stop(self.stream)
        self.done[lane].record(self.stream)
        self._pending.append((lane, b, s, wanted, profile))
        self.last_call = (b, s)
        if plain and self.auto_graphs and s == 1 and gkey not in graphs:
            # The context is set up for this shape: the next such step replays the capture.
            self.stream.synchronize()
            graphs[gkey] = CudaGraph.capture(
                self.stream, lambda: self._enqueue(lane, chained, b, 1, wanted)
            )

    def collect(self) -> Outputs:
        """Wait for the oldest call in flight; its outputs, by name."""
        if not self._pending:
            raise RuntimeError("no call is in flight; submit one first.")
        lane, b, s, wanted, profile = self._pending.popleft()
        self.done[lane].synchronize()
        if self.timed:
            self.last_call_ms = self.timers[lane].elapsed_ms()
        self.last_profile = self.profile_names[profile]
        return {name: self._result(lane, name, b, s) for name in wanted}

    def _idle(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(f"{what} needs no call in flight; collect them first.")

    def _result(self, lane: int, name: str, b: int, s: int) -> np.ndarray:
        if name == LOGITS:
            shape = self._logits_shape(b, s)
        else:  # next_token, log_normalizer [B]; top_logits, top_ids [B, K]
            shape = (b, self.sample_top_k) if name in (TOP_LOGITS, TOP_IDS) else (b,)
        return self.hosts[lane][name].array[: math.prod(shape)].reshape(shape).copy()

    def last_logits(self) -> np.ndarray:
        """The latest call's logits, still in device memory: copied back only when asked (a
        sampling step that the engine's best K do not decide)."""
        self._idle("last_logits")
        self._make_current()
        b, s = self.last_call
        shape = self._logits_shape(b, s)
        nbytes = int(np.prod(shape)) * 4
        host = self.hosts[0][LOGITS]
        d2h(host, self.device[LOGITS], nbytes, self.stream)
        self.stream.synchronize()
        return host.array[: nbytes // 4].reshape(shape).copy()

    def _make_current(self) -> None:
        """Make the engine's device current on the calling thread. The CUDA runtime does so
        on a thread's first runtime call, but a server's step thread calls TensorRT first, and
        its Myelin kernels then fail with "No CUDA context is current" (seen on an H200)."""
        if (thread := threading.get_ident()) != self._thread:
            cuda("cudaSetDevice", self._device)
            self._thread = thread

    def _stage(
        self, lane: int, ids: np.ndarray | None, pos: np.ndarray, last: np.ndarray, feeds: dict
    ) -> None:
        """Write a call's inputs into host set `lane` (ids None: a chained call's come from
        the device)."""
        host = self.hosts[lane]
        arrays = zip(TOKEN_INPUTS, (ids, pos, last))
        for name, a in (*((n, a) for n, a in arrays if a is not None), *feeds.items()):
            host[name].array[: a.size] = a.ravel()

    def _prepare(self, key: tuple[int, int, int, Shapes, int | None]) -> None:
        profile, b, s, shapes, row = key
        positions = dict(shapes)
        i = self._active = self._context_of(profile)
        context = self._context(i)
        self._state[i] = None
        if self._profile[i] != profile:
            self._set_profile(i, profile)
        for t in self.io["inputs"]:
            name = t["name"]
            if name in TOKEN_INPUTS[:2]:
                shape = (b, s)
            elif name in positions:
                shape = positions[name]
            else:
                shape = (b, *self.max_shapes[name][1:])
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {list(shape)} for {name}.")
        for name, ptr in self.addresses.items():
            if row is not None and name in self.row_bytes:
                ptr += row * self.row_bytes[name]
            if not context.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {name}.")
        self._state[i] = key

    def _context(self, i: int) -> Any:
        """contexts[i]; decode-long's made now if this is its first call. A new context takes
        the first profile no other holds, and the prefill context, made second, holds
        decode-long's until its first call: it is set to its own first."""
        if self.contexts[i] is None:
            last = len(self.contexts) - 1
            if self._profile[last] is None:
                names = self.profile_names
                self._set_profile(last, next(p for p, n in enumerate(names) if not is_decode(n)))
            self.contexts[i] = self._make_decode_long()
            if self.contexts[i] is None:
                raise RuntimeError(
                    "TensorRT could not create decode-long's execution context (GPU memory?)."
                )
        return self.contexts[i]

    def _set_profile(self, i: int, profile: int) -> None:
        if not self.contexts[i].set_optimization_profile_async(profile, self.stream.handle):
            raise RuntimeError(f"TensorRT refused optimization profile {profile}.")
        self._profile[i] = profile

    def _context_of(self, profile: int) -> int:
        """The context a profile's calls run in: the only one, or (`splits_contexts`) each
        decode profile's own (they come first, in order) and the last for the others."""
        if len(self.contexts) == 1:
            return 0
        return profile if is_decode(self.profile_names[profile]) else len(self.contexts) - 1

    def _execute(self, stream: Stream) -> None:
        if not self.contexts[self._active].execute_async_v3(stream.handle):
            self._state[self._active] = None
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above).")

    def _logits_shape(self, b: int, s: int) -> tuple[int, ...]:
        return resolve_dynamic(
            next(t["shape"] for t in self.io["outputs"] if t["name"] == LOGITS), b, s
        )

    def _enqueue(self, lane: int, chained: bool, b: int, s: int, wanted: tuple[str, ...]) -> None:
        """H2D of the small inputs from host set `lane` (input_ids D2D from next_token when
        `chained`), execute, D2H of the `wanted` outputs into that set."""
        host = self.hosts[lane]
        sizes = {
            INPUT_IDS: b * s * 4,
            POSITION_IDS: b * s * 4,
            LAST_TOKEN_INDEX: b * 4,
            **dict.fromkeys(SAMPLING_INPUTS, b * 4),
            **{name: int(np.prod(shape)) * 4 for name, shape in self._state[self._active][3]},
        }
        uploads = [(self.device[n], host[n], sizes[n]) for n in self._uploads]
        if chained:
            uploads[0] = (self.device[TOKEN_INPUTS[0]], self.device[NEXT_TOKEN], b * 4)
        sizes = {
            LOGITS: int(np.prod(self._logits_shape(b, s))) * 4,
            NEXT_TOKEN: b * 4,
            TOP_LOGITS: b * self.sample_top_k * 4,
            TOP_IDS: b * self.sample_top_k * 4,
            LOG_NORMALIZER: b * 4,
        }
        downloads = [(host[n], self.device[n], sizes[n]) for n in wanted]
        enqueue_step(self.stream, uploads, self._execute, downloads)

    def close(self) -> None:
        """Free graphs, buffers, events, stream; then the context, engine and runtime. The
        JIT cache is saved first."""
        if self.stream is not None and self._pending:
            self.stream.synchronize()
        if self.jit_cache is not None:
            self.jit_cache.save()
            self.jit_cache = None
        for graph in [*self.graphs.values(), *self.chained.values()]:
            graph.free()
        for buf in [*self.hosts[0].values(), *self.hosts[1].values(), *self.device.values()]:
            buf.free()  # once: the shared logits buffer's second free does nothing
        for res in [*self.done, *self.timers, self.stream]:
            if res is not None:
                res.free()
        self.graphs, self.chained, self.hosts, self.device = {}, {}, ({}, {}), {}
        self.done, self.timers, self.stream, self._pending = [], [], None, deque()
        self._keep_alive, self.contexts = None, []

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
