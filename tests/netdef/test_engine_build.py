"""Every family builds into a serialized engine with the real TensorRT-RTX builder on this CPU."""

from __future__ import annotations

import dataclasses
import errno
import warnings

import numpy as np
import pytest

from netdef import NetworkOptions, OptionsError, build_engine, build_network, load_tensorrt
from netdef.engine import DirectFile, EngineBuildError, builder_config
from weights import Checkpoint

trt = load_tensorrt("tensorrt_rtx")


def weight_bytes(ckpt: Checkpoint, itemsize: int) -> int:
    return sum(int(np.prod(s)) for s in ckpt.config.tensor_shapes().values()) * itemsize


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["gemma3", "gemma3_mm", "llama", "qwen2", "qwen3"])
def test_builds_for_rtx_target(family, dtype, tiny_dir, tmp_path):
    ckpt = Checkpoint.open(tiny_dir(family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 Gemma warns; tested below
        dn = build_network(ckpt, NetworkOptions(dtype=dtype, max_batch=4, max_seq_len=64), trt)
    assert [p.name for p in dn.profiles] == ["decode", "prefill", "chunk"]
    size = build_engine(dn, tmp_path / "model.engine", target="sm89")
    assert size == (tmp_path / "model.engine").stat().st_size
    # The weights live in the engine (stored once: the tied LM head shares the embedding).
    assert size > weight_bytes(ckpt, 2)


def test_mlp_weights_are_stored_once_at_batch_1_and_2(tmp_path):
    """The MLP's weights are stored [in, out], and the engine holds them once at max_batch 1
    too, whose decode profile admits two rows: with one row only the builder kept a
    second, [out, in] copy for the decode matmuls, which would add the MLP's 25 MB to an
    engine of about 40 (a one-layer model whose MLP dwarfs the rest)."""
    from tools.bench.random_model import random_config, write_random_checkpoint

    shapes = dict(layers=1, hidden=512, intermediate=8192, vocab=1024, heads=4, kv_heads=2)
    config = random_config("llama-3.2-1b", head_dim=128, **shapes)
    ckpt = Checkpoint.open(write_random_checkpoint(tmp_path / "m", config))
    mlp = 3 * 512 * 8192 * 2
    sizes = []
    for max_batch in (1, 2):
        dn = build_network(ckpt, NetworkOptions(max_batch=max_batch, max_seq_len=64), trt)
        layout = dn.graph.constants["layers.0.down_proj.weight"].shape[-2:]
        assert layout == (8192, 512)
        sizes.append(build_engine(dn, tmp_path / f"{max_batch}.engine", target="sm89"))
    assert sizes[0] > mlp and abs(sizes[1] - sizes[0]) < mlp // 4, (sizes, mlp)


def test_the_lm_head_stays_a_matmul_of_its_own(tmp_path, monkeypatch):
    """The builder's layer list keeps the head a plain matmul, its float32 cast apart
    (netdef.decoder.vocab_blocks casts the vocabulary's blocks after the reshape). Where the
    passes over the vocabulary read the cast logits, the builder fused the cast into the
    head's matmul as a runtime fusion, and every decode step of the Gemma-3-1B shape took
    0.15 ms longer on an H100 for the same kernel times. A vocabulary of two blocks."""
    import re

    from tools.bench.random_model import random_config, write_random_checkpoint

    messages = []

    class Kept(trt.ILogger):
        def log(self, severity, message):
            messages.append(message)

    kept, builder = Kept(), trt.Builder
    monkeypatch.setattr(trt, "Builder", lambda logger: builder(kept))
    shapes = dict(layers=2, hidden=64, intermediate=128, vocab=8192, heads=4, kv_heads=1)
    config = random_config("gemma-3-1b", head_dim=16, **shapes)
    ckpt = Checkpoint.open(write_random_checkpoint(tmp_path / "m", config))
    dn = build_network(ckpt, NetworkOptions(max_seq_len=64), trt)
    config = builder_config(dn, target="sm89")
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer list in the log
    assert dn.builder.build_serialized_network(dn.network, config)
    layers = re.findall(r"Name: ([^,]*), LayerType: (\w+)", "\n".join(messages))
    assert [kind for name, kind in layers if name.startswith("lm_head")] == ["gemm"], layers
    assert [name for name, kind in layers if kind == "runtime_fusion"] == []


def test_profiles_reach_the_builder(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("llama"))
    options = NetworkOptions(max_batch=8, max_seq_len=128, max_prefill=64, prefill_opt=32)
    dn = build_network(ckpt, options, trt)
    config = builder_config(dn, target="sm89")
    assert config.num_optimization_profiles == 3
    decode, prefill, chunk = dn.profiles
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (8, 1))  # tuned for one sequence
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 32), (8, 64))
    assert prefill.shapes["past_kv_0"][2] == (8, 2, 128, 16)
    assert chunk.shapes["input_ids"] == ((1, 64), (1, 64), (1, 64))  # token count fixed
    assert chunk.shapes["past_kv_0"] == ((1, 2, 128, 16),) * 3
    one_token = NetworkOptions(max_seq_len=128, max_prefill=1).profiles(ckpt.config)
    assert [p.name for p in one_token] == ["decode", "prefill"]  # a chunk would be a decode
    two = NetworkOptions(max_seq_len=128, profile_set="decode,prefill").profiles(ckpt.config)
    assert [p.name for p in two] == ["decode", "prefill"]
    full = NetworkOptions(max_batch=8, max_seq_len=128, decode_opt=8).profiles(ckpt.config)
    assert full[0].shapes["input_ids"] == ((1, 1), (8, 1), (8, 1))
    dynamic = NetworkOptions(max_batch=8, max_seq_len=128, profile_set="dynamic").profiles(
        ckpt.config
    )
    assert [p.name for p in dynamic] == ["dynamic"]


def test_long_caches_decode_in_a_second_profile(tiny_dir, tmp_path):
    """With decode_long, steps past global_opt positions take decode-long, tuned for the
    whole cache, and the builder takes both (the GPU test runs steps across the boundary)."""
    ckpt = Checkpoint.open(tiny_dir("gemma3"))
    options = NetworkOptions(
        max_batch=2, max_seq_len=256, max_prefill=8, global_opt=64, decode_long=True
    )
    options.validate(ckpt.config)
    dn = build_network(ckpt, options, trt)
    assert [p.name for p in dn.profiles] == ["decode", "decode-long", "prefill", "chunk"]
    decode, long, prefill, chunk = (p.shapes for p in dn.profiles)
    assert decode["global_positions"] == ((1,), (64,), (64,))
    assert long["global_positions"] == ((65,), (256,), (256,))
    assert long["input_ids"] == decode["input_ids"] and long["past_kv_0"] == decode["past_kv_0"]
    assert prefill["global_positions"] == chunk["global_positions"] == ((1,), (64,), (256,))
    assert build_engine(dn, tmp_path / "model.engine", target="sm89") > 0
    # By default one decode profile takes every length, tuned for global_opt.
    one = NetworkOptions(max_seq_len=256, global_opt=64).profiles(ckpt.config)
    assert [p.name for p in one] == ["decode", "prefill", "chunk"]
    assert one[0].shapes["global_positions"] == ((1,), (64,), (256,))


@pytest.mark.parametrize(
    "family, options, message",
    [
        (
            "gemma3",
            dict(max_seq_len=64, global_opt=0),
            "global_opt=0 must be at least 1.",
        ),
        (
            "gemma3",
            dict(max_seq_len=64, global_opt=64, decode_long=True),
            "decode_long needs max_seq_len above global_opt=64 (decode takes up to 64 global "
            "positions already); build without --decode-long or with a longer --max-seq-len.",
        ),
        (
            "gemma3",
            dict(max_seq_len=256, global_opt=64, decode_long=True, profile_set="dynamic"),
            "decode_long needs the decode profile, which profiles 'dynamic' lacks; build "
            "without --decode-long or with another --profiles.",
        ),
        (
            "all_sliding",
            dict(max_seq_len=256, global_opt=64, decode_long=True),
            "decode_long applies to global attention layers, and every layer of this model "
            "attends a sliding window; build without --decode-long.",
        ),
    ],
)
def test_bad_global_options(family, options, message, tiny_dir):
    config = Checkpoint.open(
        tiny_dir("qwen2_sliding" if family == "all_sliding" else family)
    ).config
    if family == "all_sliding":  # every layer the sliding one's window
        config = dataclasses.replace(config, layers=[config.layers[-1]] * config.num_layers)
    with pytest.raises(OptionsError) as e:
        NetworkOptions(**options).validate(config)
    assert str(e.value) == message


def test_io_contract(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("qwen3"))
    dn = build_network(ckpt, NetworkOptions(dtype="bfloat16", max_seq_len=32), trt)
    net = dn.network
    inputs = {net.get_input(i).name: net.get_input(i) for i in range(net.num_inputs)}
    outputs = {net.get_output(i).name: net.get_output(i) for i in range(net.num_outputs)}
    n = ckpt.config.num_layers
    assert list(inputs)[:3] == ["input_ids", "position_ids", "last_token_index"]
    assert set(inputs) == {
        "input_ids",
        "position_ids",
        "last_token_index",
        "inv_temperature",
        "uniform",
        "top_k",
        "top_p",
        "global_positions",  # every qwen3 layer is global: no window_positions
    } | {f"past_kv_{i}" for i in range(n)}
    assert (inputs["global_positions"].dtype, tuple(inputs["global_positions"].shape)) == (
        trt.int32,
        (-1,),
    )
    assert set(outputs) == {"logits", "next_token", "top_logits", "top_ids", "log_normalizer"} | {
        f"present_kv_{i}" for i in range(n)
    }
    assert inputs["input_ids"].dtype == trt.int32
    assert tuple(inputs["past_kv_0"].shape) == (-1, 4, 32, 32)
    assert inputs["past_kv_0"].dtype == trt.bfloat16
    assert outputs["logits"].dtype == trt.float32
    assert tuple(outputs["logits"].shape) == (-1, 512)
    assert outputs["next_token"].dtype == trt.int32
    assert tuple(outputs["next_token"].shape) == (-1,)
    assert (outputs["top_logits"].dtype, outputs["top_ids"].dtype) == (trt.float32, trt.int32)
    assert tuple(outputs["top_logits"].shape) == tuple(outputs["top_ids"].shape) == (-1, 64)
    assert (inputs["inv_temperature"].dtype, outputs["log_normalizer"].dtype) == (trt.float32,) * 2
    assert tuple(inputs["inv_temperature"].shape) == tuple(outputs["log_normalizer"].shape) == (-1,)
    draw = [inputs[n] for n in ("uniform", "top_k", "top_p")]  # next_token's draw
    assert [(t.dtype, tuple(t.shape)) for t in draw] == [
        (trt.float32, (-1,)),
        (trt.int32, (-1,)),
        (trt.float32, (-1,)),
    ]
    gemma = build_network(Checkpoint.open(tiny_dir("gemma3")), NetworkOptions(max_seq_len=32), trt)
    slots = {gemma.network.get_input(i).name: gemma.network.get_input(i) for i in range(5)}
    window = slots["window_positions"]  # sliding layers (window 4)
    assert (window.dtype, tuple(window.shape)) == (trt.int32, (-1, -1))
    assert "global_positions" in slots  # and a global one
    # Sliding layers keep rings of window 4 + max_prefill 32 - 1 slots: here the whole cache.
    caches = [gemma.network.get_input(i) for i in range(gemma.network.num_inputs)]
    assert [tuple(t.shape)[2] for t in caches if t.name.startswith("past_kv_")] == [32] * 4
    plain = build_network(ckpt, NetworkOptions(max_seq_len=32, sample_top_k=0), trt).network
    names = {plain.get_output(i).name for i in range(plain.num_outputs)}
    assert names == set(outputs) - {"top_logits", "top_ids", "log_normalizer"}
    plain_inputs = {plain.get_input(i).name for i in range(plain.num_inputs)}
    assert plain_inputs == set(inputs) - {"inv_temperature", "uniform", "top_k", "top_p"}


def test_float16_gemma_is_a_caveat_not_an_error(tiny_dir):
    config = Checkpoint.open(tiny_dir("gemma3")).config
    options = NetworkOptions(dtype="float16", max_seq_len=32)
    options.validate(config)
    assert options.caveats(config) == [
        "Gemma-3 activations overflow float16; expect inf/NaN logits. Use bfloat16."
    ]
    assert NetworkOptions(max_seq_len=32).caveats(config) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(max_seq_len=100_000),
            "max_seq_len=100000 is outside what the model supports (1..max_position_embeddings=256); "
            "choose a smaller --max-seq-len.",
        ),
        (
            dict(dtype="int8"),
            "dtype 'int8' is not supported; choose bfloat16, float16 or float32.",
        ),
        (dict(max_batch=0), "max_batch=0 must be at least 1."),
        # Wrong types: before, a TypeError from a comparison, or TensorRT's add_input()
        # refusing the shape of a float length deep in the definition.
        (dict(max_seq_len=64.0), "max_seq_len=64.0 must be an integer."),
        (dict(max_seq_len=None), "max_seq_len=None must be an integer."),
        (
            dict(max_seq_len=64, max_prefill="8"),
            "max_prefill='8' must be an integer or None.",
        ),
        (dict(max_seq_len=0), "max_seq_len=0 must be at least 1."),
        (
            dict(max_seq_len=64, max_prefill=0),
            "max_prefill=0 must be between 1 and max_seq_len=64.",
        ),
        (
            dict(max_seq_len=64, max_prefill=65),
            "max_prefill=65 must be between 1 and max_seq_len=64.",
        ),
        (
            dict(max_batch=4, max_seq_len=64, decode_opt=5),
            "decode_opt=5 must be between 1 and max_batch=4.",
        ),
        (
            dict(max_seq_len=64, profile_set="decode"),
            "profiles 'decode' is not supported; choose 'decode,prefill,chunk', "
            "'decode,prefill' or 'dynamic'.",
        ),
        (
            dict(max_seq_len=64, sample_top_k=600),
            "sample_top_k=600 must be between 0 and 512 (TensorRT's TopK takes k <= 3840).",
        ),
    ],
)
def test_bad_options_fail_before_building(options, message, tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("llama"))
    with pytest.raises(OptionsError) as err:
        build_network(ckpt, NetworkOptions(**options), trt)
    assert str(err.value) == message


def test_options_that_need_no_model_are_refused_on_creation():
    """NetworkOptions(max_seq_len="256"), max_seq_len=0 or dtype="fp16" was accepted, and
    refused only by build_network (or validate) once a model was at hand."""
    cases = [
        (dict(max_seq_len="256"), "max_seq_len='256' must be an integer.", "max_seq_len"),
        (dict(max_seq_len=0), "max_seq_len=0 must be at least 1.", "max_seq_len"),
        (
            dict(dtype="fp16"),
            "dtype 'fp16' is not supported; choose bfloat16, float16 or float32.",
            None,
        ),
        (
            dict(dtype=["float16"]),
            "dtype ['float16'] is not supported; choose bfloat16, float16 or float32.",
            None,
        ),
        (
            dict(max_seq_len=64, max_prefill=65),
            "max_prefill=65 must be between 1 and max_seq_len=64.",
            "max_prefill",
        ),
        (
            dict(quant="int3"),
            "quant 'int3' is not supported; choose none, int8-wo, int4-wo, fp8 or from-gguf.",
            None,
        ),
    ]
    for options, message, field in cases:
        with pytest.raises(OptionsError) as err:
            NetworkOptions(**options)
        assert (str(err.value), err.value.field) == (message, field)
    with pytest.raises(OptionsError) as err:  # replace() checks again
        dataclasses.replace(NetworkOptions(max_seq_len=64), max_prefill=128)
    assert str(err.value) == "max_prefill=128 must be between 1 and max_seq_len=64."


def test_build_network_of_a_path_or_without_options_says_what_it_takes(tiny_dir):
    """A folder's path for the checkpoint, or None for the options, failed with an
    AttributeError from inside."""
    folder = str(tiny_dir("llama"))
    with pytest.raises(TypeError) as err:
        build_network(folder, NetworkOptions(max_seq_len=64), trt)
    assert str(err.value) == (
        "build_network reads weights from a weights.Checkpoint: build_network(Checkpoint.open("
        f"folder), options), not {folder!r:.60}."
    )
    with pytest.raises(TypeError) as err:
        build_network(Checkpoint.open(folder), None, trt)
    assert str(err.value) == "options is a netdef.NetworkOptions, not None."


def written_through(path, data: bytes, buffer_bytes: int) -> DirectFile:
    """`data` written through a DirectFile in pieces that straddle its buffer and blocks."""
    with DirectFile(path, buffer_bytes=buffer_bytes) as f:
        at = 0
        for n in (1, 4095, 4096, 5000, 3 << 20, 7, len(data)):
            f.write(memoryview(data[at : at + n]))
            at = min(at + n, len(data))
    assert f.size == len(data)
    return f


def test_direct_file_writes_every_byte_in_order(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 10_000_003, dtype=np.uint8).tobytes()
    written_through(tmp_path / "e", data, buffer_bytes=1 << 20)
    assert (tmp_path / "e").read_bytes() == data


def test_direct_file_falls_back_to_buffered_writes_when_a_direct_one_is_refused(tmp_path):
    """A 5,000-byte buffer is no multiple of the block size, so this file system (ext4 under
    /tmp here and in CI) refuses its first direct write with EINVAL; the file still gets
    every byte."""
    data = np.random.default_rng(1).integers(0, 256, 3_000_001, dtype=np.uint8).tobytes()
    f = written_through(tmp_path / "e", data, buffer_bytes=5000)
    assert not f.direct
    assert (tmp_path / "e").read_bytes() == data


@pytest.mark.parametrize(
    "raised",
    [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
    ids=["ctrl-c", "disk-full"],
)
def test_what_stops_the_engine_writer_stops_the_build(raised, tiny_dir, tmp_path, monkeypatch):
    """Before, TensorRT caught what the writer raised ("Exception caught in write()"), went
    on, and build_engine returned a truncated engine's size: a Ctrl-C during the write left a
    corrupt artifact that tools.build reported as built and later reused."""
    monkeypatch.setattr(DirectFile, "write", lambda self, data: (_ for _ in ()).throw(raised))
    dn = build_network(Checkpoint.open(tiny_dir("llama")), NetworkOptions(max_seq_len=64), trt)
    path = tmp_path / "model.engine"
    with pytest.raises(
        type(raised) if isinstance(raised, KeyboardInterrupt) else EngineBuildError
    ) as err:
        build_engine(dn, path, target="sm89")
    if isinstance(raised, OSError):
        assert str(err.value) == f"writing the engine to {path} failed: No space left on device."
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_in_the_progress_monitor_cancels_the_build(tiny_dir, tmp_path):
    """Before, TensorRT caught the KeyboardInterrupt a monitor raised and built on."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps = 0

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            self.steps += 1
            raise KeyboardInterrupt

        def phase_finish(self, phase_name):
            pass

    monitor = Monitor()
    dn = build_network(Checkpoint.open(tiny_dir("llama")), NetworkOptions(max_seq_len=64), trt)
    with pytest.raises(KeyboardInterrupt):
        build_engine(dn, tmp_path / "model.engine", target="sm89", progress_monitor=monitor)
    assert monitor.steps == 1  # the build was cancelled at the first step
    assert list(tmp_path.iterdir()) == []
