"""The TensorRT backend's logic that needs no GPU: portability, metadata-vs-engine and contract
checks, profile choice, buffer sizes, call validation, lazy imports. Runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netdef import NetworkOptions, build_network, load_tensorrt
from netdef.artifact import ENGINE_FILE, ArtifactError, metadata, write_metadata
from netdef.contract import target_capability
from runtime import cuda_buffers
from runtime.standin import fake_engine
from runtime.tensorrt_backend import (
    EngineLoadError,
    JitCache,
    TensorRTBackend,
    buffer_plan,
    check_contract,
    check_engine,
    check_portability,
    choose_profile,
    decode_reach,
    describe_engine,
    jit_cache_path,
    max_profile_shapes,
    resolve_dynamic,
    validate_call,
)
from weights.config import load_config

trt = load_tensorrt("tensorrt_rtx")
ROOT = Path(__file__).resolve().parents[2]


class ZeroWeights:
    """A weight source of the right shapes (the values do not matter here)."""

    def __init__(self, config):
        self.config, self.shapes = config, config.tensor_shapes()

    def tensor(self, name):
        return np.zeros(self.shapes[name], np.float32)


@pytest.fixture(scope="module")
def tiny_network(tiny_dir):
    """A real Qwen3 network (3 layers, 2 KV heads, head_dim 32, vocab 512) and its metadata.json."""
    source = ZeroWeights(load_config(tiny_dir("qwen3")))
    options = NetworkOptions(max_batch=4, max_seq_len=64, max_prefill=16)
    dn = build_network(source, options, trt)
    return dn, json.loads(json.dumps(metadata(dn, target="sm89")))


def as_engine(meta: dict) -> dict:
    """What `describe_engine` returns for an engine that matches `meta`."""
    return {"io": meta["io"], "profiles": [p["shapes"] for p in meta["profiles"]]}


class NetworkAsEngine:
    """An ICudaEngine look-alike answering from the network definition, with TensorRT's own
    enums and Dims, so `describe_engine` is checked against metadata.json's format."""

    def __init__(self, dn):
        net = dn.network
        self.tensors = [net.get_input(i) for i in range(net.num_inputs)]
        self.tensors += [net.get_output(i) for i in range(net.num_outputs)]
        self.inputs = {net.get_input(i).name for i in range(net.num_inputs)}
        self.profiles = dn.profiles
        self.num_io_tensors = len(self.tensors)
        self.num_optimization_profiles = len(dn.profiles)

    def get_tensor_name(self, i):
        return self.tensors[i].name

    def _tensor(self, name):
        return next(t for t in self.tensors if t.name == name)

    def get_tensor_mode(self, name):
        return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._tensor(name).dtype

    def get_tensor_shape(self, name):
        return self._tensor(name).shape

    def get_tensor_profile_shape(self, name, p):
        return [trt.Dims(d) for d in self.profiles[p].shapes[name]]


# ---- portability ----

META = {"backend": {"module": "tensorrt_rtx", "version": "1.7.1.116"}, "target": "sm89"}


def test_target_capability():
    assert target_capability("sm89") == (8, 9)
    assert target_capability("8.9") == (8, 9)
    assert target_capability("sm120") == (12, 0)
    assert target_capability("SM121") == (12, 1)


def test_portable_engine_passes():
    check_portability(META, "tensorrt_rtx", "1.7.1.116", (8, 9))
    check_portability(META, "tensorrt_rtx", "1.7.1.116", None)  # GPU not asked yet
    check_portability({**META, "target": None}, "tensorrt_rtx", "1.7.1.116", (9, 0))


@pytest.mark.parametrize(
    ("module", "version", "message"),
    [
        (
            "tensorrt_rtx",
            "1.8.0.1",
            "the engine was built by tensorrt_rtx 1.7.1.116 but tensorrt_rtx 1.8.0.1 is installed; "
            "engines are not portable across TensorRT modules or versions: rebuild it with "
            "python -m tools.build.",
        ),
        (
            "tensorrt",
            "10.15.1.29",
            "the engine was built by tensorrt_rtx 1.7.1.116 but tensorrt 10.15.1.29 is installed; "
            "engines are not portable across TensorRT modules or versions: rebuild it with "
            "python -m tools.build.",
        ),
    ],
)
def test_other_tensorrt_is_refused(module, version, message):
    with pytest.raises(EngineLoadError) as e:
        check_portability(META, module, version, (8, 9))
    assert str(e.value) == message


def test_other_gpu_is_refused():
    with pytest.raises(EngineLoadError) as e:
        check_portability(META, "tensorrt_rtx", "1.7.1.116", (9, 0))
    assert str(e.value) == (
        "the engine was built for sm89 but this GPU is sm90 (compute capability 9.0); "
        "rebuild it with python -m tools.build --target sm90."
    )


# ---- metadata.json vs the engine, and the I/O contract ----


def test_real_metadata_matches_itself_and_the_contract(tiny_network):
    _, meta = tiny_network
    check_engine(meta, as_engine(meta))
    check_contract(meta["io"])


def test_describe_engine_uses_metadata_format(tiny_network):
    dn, meta = tiny_network
    described = describe_engine(NetworkAsEngine(dn), trt)
    assert described == as_engine(meta)
    check_engine(meta, described)


def test_engine_with_other_dtype_is_refused(tiny_network):
    _, meta = tiny_network
    engine = json.loads(json.dumps(as_engine(meta)))
    next(t for t in engine["io"]["inputs"] if t["name"] == "past_kv_0")["dtype"] = "half"
    with pytest.raises(EngineLoadError) as e:
        check_engine(meta, engine)
    assert str(e.value) == (
        "metadata.json does not match the engine (past_kv_0 is bf16 [-1, 4, 64, 32] in "
        "metadata.json but half [-1, 4, 64, 32] in the engine); rebuild it with "
        "python -m tools.build --force."
    )


def test_engine_with_other_tensors_and_profiles_is_refused(tiny_network):
    _, meta = tiny_network
    engine = json.loads(json.dumps(as_engine(meta)))
    next(t for t in engine["io"]["outputs"] if t["name"] == "logits")["name"] = "all_logits"
    engine["profiles"][1]["input_ids"][2] = [4, 32]
    with pytest.raises(EngineLoadError) as e:
        check_engine(meta, engine)
    assert str(e.value) == (
        "metadata.json does not match the engine (only in metadata.json: logits; only in the "
        "engine: all_logits; profile 'prefill' differs for input_ids); rebuild it with "
        "python -m tools.build --force."
    )
    with pytest.raises(EngineLoadError, match=r"3 profiles in metadata\.json, 1 in the engine"):
        check_engine(meta, {**as_engine(meta), "profiles": as_engine(meta)["profiles"][:1]})


def test_contract_violations():
    meta, _ = fake_engine(layers=1)
    io = json.loads(json.dumps(meta["io"]))
    io["inputs"][0]["dtype"] = "int64"
    io["outputs"] = [t for t in io["outputs"] if t["name"] != "present_kv_0"]
    io["outputs"][0]["dtype"] = "half"
    next(t for t in io["outputs"] if t["name"] == "top_ids")["dtype"] = "float"
    with pytest.raises(EngineLoadError) as e:
        check_contract(io)
    assert str(e.value) == (
        "the engine breaks the I/O contract: input input_ids must be int32; output logits must "
        "be float32; output top_ids must be int32; outputs other than logits, next_token, "
        "top_logits, top_ids and log_normalizer must be exactly present_* for every past_*."
    )
    io = json.loads(json.dumps(meta["io"]))
    io["inputs"] = [t for t in io["inputs"] if t["name"] != "inv_temperature"]
    with pytest.raises(EngineLoadError) as e:
        check_contract(io)
    assert str(e.value) == (
        "the engine breaks the I/O contract: inputs inv_temperature, uniform, top_k, top_p and "
        "output log_normalizer go together."
    )


# ---- profiles and buffers ----


def test_choose_profile():
    default = ["decode", "prefill", "chunk"]
    assert choose_profile(default, 4, 1, 8) == choose_profile(default, 1, 1, 8) == 0
    assert choose_profile(default, 1, 7, 8) == choose_profile(default, 2, 8, 8) == 1
    assert choose_profile(default, 1, 8, 8) == 2  # one sequence, a full chunk
    assert choose_profile(["decode", "prefill"], 1, 8, 8) == 1  # engines built before it
    dynamic = ["dynamic"]
    assert choose_profile(dynamic, 1, 1, 8) == choose_profile(dynamic, 1, 8, 8, 64) == 0
    # decode takes global_positions of up to 4 positions; decode-long the longer ones
    long = ["decode", "decode-long", "prefill", "chunk"]
    assert [choose_profile(long, 2, 1, 8, n, reach=4) for n in (1, 4, 5, 64)] == [0, 0, 1, 1]
    assert choose_profile(long, 1, 8, 8, 64, 4) == 3 and choose_profile(long, 2, 3, 8, 64, 4) == 2
    with pytest.raises(EngineLoadError) as e:
        choose_profile(["decode"], 1, 5, 8)
    assert str(e.value) == "the engine has no 'prefill' profile (profiles: ['decode'])."


def test_decode_reach_is_what_decode_takes_beside_decode_long():
    def named(*names: str) -> list[dict]:  # metadata.json's profiles
        return [{"name": n, "shapes": {"global_positions": [[1], [4], [4]]}} for n in names]

    assert decode_reach(named("decode", "decode-long", "prefill", "chunk")) == 4
    assert decode_reach(named("decode", "prefill", "chunk")) is None


def test_buffers_from_real_profiles(tiny_network):
    _, meta = tiny_network
    shapes = max_profile_shapes(as_engine(meta)["profiles"])
    assert shapes["input_ids"] == (4, 16)  # decode (4, 1) and prefill (4, 16)
    assert shapes["past_kv_1"] == (4, 4, 64, 32)
    plan = buffer_plan(meta["io"], shapes, max_batch=4, max_seq=16)
    assert plan["input_ids"] == plan["position_ids"] == 4 * 16 * 4
    assert plan["last_token_index"] == 4 * 4
    assert plan["past_kv_0"] == 4 * 4 * 64 * 32 * 2  # bf16
    assert plan["logits"] == 4 * 512 * 4
    assert not [n for n in plan if n.startswith("present_")]  # aliased to past_*


def test_resolve_dynamic():
    assert resolve_dynamic([-1, 512], 3, 7) == (3, 512)
    assert resolve_dynamic([-1, -1, 512], 3, 7) == (3, 7, 512)


# ---- call validation ----


def test_valid_call_becomes_int32_contiguous():
    pos = np.broadcast_to(np.arange(3, 6), (2, 3))
    ids, p, last = validate_call(np.ones((2, 3), np.int64), pos, [2, 0], 4, 8, 32)
    assert ids.dtype == p.dtype == last.dtype == np.int32
    assert p.flags.c_contiguous and p.tolist() == [[3, 4, 5], [3, 4, 5]]


@pytest.mark.parametrize(
    ("ids", "pos", "last", "message"),
    [
        (
            (5, 1),
            np.zeros((5, 1)),
            np.zeros(5),
            "batch of 5 is outside the engine's 1..max_batch=4.",
        ),
        ((1, 9), [range(9)], [0], "9 tokens in one call is outside the engine's 1..max_prefill=8."),
        (
            (1, 4),
            [range(30, 34)],
            [0],
            "positions 30..33 are beyond the KV cache (slots 0..31, max_seq_len=32).",
        ),
        ((1, 2), [[-1, 0]], [0], "positions -1..0 are beyond the KV cache"),
        ((1, 3), [[0, 1, 3]], [0], "each row of position_ids must be consecutive: p, p+1, ..."),
        ((1, 3), [[0, 1, 2]], [3], "last_token_index must be in 0..2."),
        ((2, 3), np.zeros((2, 2)), [0, 0], "expected input_ids and position_ids [B, S]"),
    ],
)
def test_invalid_call_is_refused(ids, pos, last, message):
    with pytest.raises(ValueError) as e:
        validate_call(np.zeros(ids), np.asarray(pos), np.asarray(last), 4, 8, 32)
    assert str(e.value).startswith(message)


# ---- loading and imports ----


def test_load_refuses_a_folder_that_is_no_artifact(tmp_path):
    """As every reader of an artifact does (netdef.artifact.open_artifact)."""
    with pytest.raises(ArtifactError) as e:
        TensorRTBackend.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path} is not an engine artifact; build one with python -m tools.build."
    )


def test_load_refuses_another_version_before_touching_the_gpu(tmp_path):
    meta, _ = fake_engine()
    (tmp_path / ENGINE_FILE).write_bytes(b"not an engine")
    write_metadata(tmp_path, {**meta, "backend": {"module": trt.__name__, "version": "0.1"}})
    with pytest.raises(EngineLoadError) as e:
        TensorRTBackend.load(tmp_path, trt)
    assert str(e.value) == (
        f"cannot load {tmp_path}: the engine was built by tensorrt_rtx 0.1 but tensorrt_rtx "
        f"{trt.__version__} is installed; engines are not portable across TensorRT modules or "
        "versions: rebuild it with python -m tools.build."
    )


def test_load_refuses_a_missing_tensorrt_module(tmp_path, monkeypatch):
    meta, _ = fake_engine()
    (tmp_path / ENGINE_FILE).write_bytes(b"")
    write_metadata(tmp_path, meta)  # built by "tensorrt", which is not installed here
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineLoadError, match=r"built by tensorrt: no TensorRT Python module"):
        TensorRTBackend.load(tmp_path)


def test_importing_the_backend_needs_neither_cuda_python_nor_tensorrt():
    """Nor the network definer: of netdef, only the I/O contract and the slot rule the backend
    feeds."""
    code = (
        "import sys; import runtime.tensorrt_backend, tools.gpu_check; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cuda', 'tensorrt', 'tensorrt_rtx', 'netdef')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['netdef', 'netdef.contract', 'netdef.slots']"


def test_missing_cuda_python_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cuda_buffers, "_RT", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(cuda_buffers.CudaError) as e:
        cuda_buffers.DeviceBuffer(16)
    assert "install it: pip install -e '.[cuda]'" in str(e.value)
    assert cuda_buffers.gpu_unavailable_reason() == (
        "cuda-python cannot be imported (import of cuda.bindings halted; None in sys.modules; "
        "install it: pip install -e '.[cuda]')"
    )


class RuntimeCacheBlob:
    """What JitCache needs of TensorRT-RTX's IRuntimeCache and IRuntimeConfig, over bytes:
    the file handling is checked here, the real cache on a GPU (test_engine_gpu.py)."""

    def __init__(self, accepts: bool = True):
        self.accepts, self.blob, self.attached = accepts, b"", None

    def create_runtime_cache(self):
        return self

    def set_runtime_cache(self, cache) -> None:
        self.attached = cache

    def deserialize(self, blob: bytes) -> bool:
        self.blob = bytes(blob) if self.accepts else b""
        return self.accepts

    def serialize(self) -> bytes:
        return self.blob


def test_jit_cache_file_is_written_whole_and_read_back(tmp_path, capsys):
    path = tmp_path / "jit" / "k-sm89.bin"
    config = RuntimeCacheBlob()
    cache = JitCache(path, config)
    assert (cache.loaded, config.attached) == (0, config)
    cache.save()  # nothing compiled yet: no file
    assert not path.parent.exists()
    config.blob = b"kernels"
    cache.save()
    assert path.read_bytes() == b"kernels" and list(path.parent.iterdir()) == [path]
    again = JitCache(path, RuntimeCacheBlob())
    assert again.loaded == len(b"kernels")
    path.unlink()
    again.save()  # holds nothing the file did not: not written again
    assert not path.exists() and capsys.readouterr().err == ""


def test_jit_cache_file_tensorrt_refuses_is_replaced(tmp_path):
    path = tmp_path / "k-sm89.bin"
    path.write_bytes(b"from another TensorRT-RTX")
    config = RuntimeCacheBlob(accepts=False)
    cache = JitCache(path, config)
    assert cache.loaded == 0
    config.blob = b"kernels"
    cache.save()
    assert path.read_bytes() == b"kernels"


def test_jit_cache_in_an_unwritable_place_warns(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    config = RuntimeCacheBlob()
    cache = JitCache(tmp_path / "file" / "jit" / "k-sm89.bin", config)
    config.blob = b"kernels"
    cache.save()
    assert capsys.readouterr().err == (
        f"warning: the compiled kernels were not kept in {tmp_path}/file/jit/k-sm89.bin (Not a "
        "directory); the next load compiles them again. Set TRT_NETDEF_CACHE to a writable "
        "folder.\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_jit_cache_path_is_per_build_and_gpu(tmp_path, monkeypatch):
    from netdef.artifact import Metadata

    monkeypatch.setenv("TRT_NETDEF_CACHE", str(tmp_path))
    meta = Metadata.from_dict({"build_key": "0123456789abcdef" * 4})
    assert jit_cache_path(meta, (8, 9)) == tmp_path / "jit" / "0123456789abcdef-sm89.bin"
