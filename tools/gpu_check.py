"""Check the TensorRT backend's CUDA plumbing on a real GPU, without TensorRT.

    python -m tools.gpu_check [--mib 256] [--launches 1000]

Runs the checks that tests/runtime/test_cuda_gpu.py runs (device buffers sized from a fake engine's
shape table, pinned round trips of int32 and bf16 data, event timing, CUDA graph capture and
replay, and `TensorRTBackend.forward` with its captured decode steps driving a stand-in execution
context that copies instead of running an engine), then measures copy bandwidth and graph
replay against plain stream launches. Needs cuda-python and a CUDA GPU only (no TensorRT,
no pytest); exits 1 if a check fails, 2 if there is no usable GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from netdef.contract import PROFILE_SETS, past
from runtime.cuda_buffers import (
    CudaGraph,
    DeviceBuffer,
    EventTimer,
    PinnedBuffer,
    Stream,
    bandwidth,
    cuda,
    cudart,
    d2d,
    d2h,
    device_info,
    enqueue_step,
    gpu_unavailable_reason,
    h2d,
)
from runtime.readout import ALL_LOGITS, ARGMAX, TOP_K, TOP_P
from runtime.sampling import SamplingParams
from runtime.standin import CopyContext, fake_engine
from runtime.tensorrt_backend import TensorRTBackend, buffer_plan, max_profile_shapes
from tools.cli import at_least

MiB = 1 << 20


def _freeing(*resources: Any) -> Callable[[], None]:
    def free() -> None:
        for r in resources:
            r.free()

    return free


# ---- checks: each returns a one-line detail and raises AssertionError on a wrong result ----


def check_device() -> str:
    d = device_info()
    return f"{d.name}, compute capability {d.major}.{d.minor} (sm{d.major}{d.minor}), {d.total_bytes / 2**30:.1f} GiB"


def check_buffers() -> str:
    """Device buffers sized from the fake engine's shape table: every byte is reachable."""
    _, desc = fake_engine(max_batch=8, max_prefill=64, max_seq_len=1024, vocab=4096, layers=4)
    plan = buffer_plan(desc["io"], max_profile_shapes(desc["profiles"]), 8, 64)
    assert plan[past(0)] == 8 * 4 * 1024 * 8 * 2 and plan["logits"] == 8 * 4096 * 4, plan
    assert not any(n.startswith("present_") for n in plan)
    stream, bufs = Stream(), {n: DeviceBuffer(nbytes) for n, nbytes in plan.items()}
    tail = PinnedBuffer(16, np.uint8)
    try:
        for i, (name, buf) in enumerate(bufs.items()):
            cuda("cudaMemsetAsync", buf.ptr, i + 1, buf.nbytes, stream.handle)
            tail.array[:] = 0
            kind = cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost
            cuda("cudaMemcpyAsync", tail.ptr, buf.ptr + buf.nbytes - 16, 16, kind, stream.handle)
            stream.synchronize()
            assert (tail.array == i + 1).all(), f"{name}: last bytes not written"
    finally:
        _freeing(tail, stream, *bufs.values())()
    return (
        f"{len(plan)} buffers, {sum(plan.values()) / MiB:.1f} MiB, KV caches shared with present_*"
    )


def check_round_trip() -> str:
    """int32 ids and bf16 cache data (as raw 16-bit patterns) survive H2D then D2H exactly."""
    rng = np.random.default_rng(0)
    stream = Stream()
    try:
        for dtype, n in ((np.int32, 8 * 512), (np.uint16, 8 * 2 * 1024 * 64)):
            src, dst, dev = (
                PinnedBuffer(n, dtype),
                PinnedBuffer(n, dtype),
                DeviceBuffer(n * np.dtype(dtype).itemsize),
            )
            try:
                if dtype is np.int32:
                    src.array[:] = rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int32)
                else:  # bf16 bit patterns of random float32 values
                    f = rng.standard_normal(n).astype(np.float32)
                    src.array[:] = (f.view(np.uint32) >> 16).astype(np.uint16)
                dst.array[:] = 0
                h2d(dev, src, src.nbytes, stream)
                d2h(dst, dev, dst.nbytes, stream)
                stream.synchronize()
                assert np.array_equal(src.array, dst.array), f"{np.dtype(dtype)} round trip differs"
            finally:
                _freeing(src, dst, dev)()
    finally:
        stream.free()
    return "int32 [4096] and bf16 [1048576] bit-exact"


def check_events() -> str:
    stream, timer, a, b = Stream(), EventTimer(), DeviceBuffer(64 * MiB), DeviceBuffer(64 * MiB)
    try:
        timer.start(stream)
        d2d(b, a, 64 * MiB, stream)
        timer.stop(stream)
        ms = timer.elapsed_ms()
        assert ms > 0, f"elapsed {ms} ms"
    finally:
        _freeing(a, b, timer, stream)()
    return f"64 MiB device copy timed at {ms:.3f} ms"


def check_graph_replay(replays: int = 100) -> str:
    """H2D → D2D (standing in for execute) → D2H captured once, replayed with new pinned inputs."""
    n = 4 * 256
    stream = Stream()
    host_in, host_out = PinnedBuffer(n, np.int32), PinnedBuffer(n, np.int32)
    dev_in, dev_out = DeviceBuffer(n * 4), DeviceBuffer(n * 4)
    try:
        step = lambda: enqueue_step(  # noqa: E731
            stream,
            [(dev_in, host_in, n * 4)],
            lambda s: d2d(dev_out, dev_in, n * 4, s),
            [(host_out, dev_out, n * 4)],
        )
        graph = CudaGraph.capture(stream, step)
        try:
            rng = np.random.default_rng(1)
            for i in range(replays):
                host_in.array[:] = rng.integers(0, 1 << 30, n, dtype=np.int32)
                host_out.array[:] = -1
                graph.launch(stream)
                stream.synchronize()
                assert np.array_equal(host_out.array, host_in.array), f"replay {i} differs"
        finally:
            graph.free()
    finally:
        _freeing(host_in, host_out, dev_in, dev_out, stream)()
    return f"{replays} replays, each result exact"


def check_auto_graphs(decode_steps: int = 50) -> str:
    """With auto_graphs (as `load` sets it), the first decode step of a batch size runs plainly
    and is captured; every later step of that size replays it."""
    from netdef.artifact import Metadata

    meta, desc = fake_engine(max_seq_len=256)
    ctx = CopyContext()
    with TensorRTBackend(Metadata.from_dict(meta), desc, ctx, auto_graphs=True) as model:
        model.reset(2)
        model.forward(
            np.ones((2, 4), np.int32),
            np.tile(np.arange(4, dtype=np.int32), (2, 1)),
            np.full(2, 3, np.int32),
            ALL_LOGITS,
        )
        model.forward(
            np.ones((2, 1), np.int32),
            np.full((2, 1), 4, np.int32),
            np.zeros(2, np.int32),
            ALL_LOGITS,
        )
        before = ctx.executions
        for step in range(decode_steps):
            ids = np.full((2, 1), step, np.int32)
            pos = np.full((2, 1), 5 + step, np.int32)
            logits = model.forward(ids, pos, np.zeros(2, np.int32), ALL_LOGITS)["logits"]
            got = logits.view(np.int32).ravel()[:2].reshape(2, 1)
            assert np.array_equal(got, ids), "replayed step copied stale inputs"
        assert ctx.executions == before, "decode steps after the first did not replay"
        model.forward(
            np.ones((2, 1), np.int32), np.full((2, 1), 60, np.int32), np.zeros(2, np.int32), ARGMAX
        )
        before = ctx.executions  # that first greedy step ran plainly, then was captured
        for step in range(decode_steps):  # greedy steps: only next_token comes back, also replayed
            ids = np.full((2, 1), 100 + step, np.int32)
            pos = np.full((2, 1), 61 + step, np.int32)
            got = model.forward(ids, pos, np.zeros(2, np.int32), ARGMAX)["next_token"]
            assert np.array_equal(got, ids[:, 0]), "next_token did not come back"
        assert ctx.executions == before, "greedy steps after the first did not replay"
        model.forward(
            np.ones((2, 1), np.int32), np.full((2, 1), 120, np.int32), np.zeros(2, np.int32), TOP_K
        )
        before = ctx.executions
        for step in range(decode_steps):  # sampling steps: only the best K come back, replayed
            ids = np.full((2, 1), 200 + step, np.int32)
            pos = np.full((2, 1), 121 + step, np.int32)
            out = model.forward(ids, pos, np.zeros(2, np.int32), TOP_K)
            values, top = out["top_logits"], out["top_ids"]
            assert values.shape == top.shape == (2, model.sample_top_k)
            assert np.array_equal(top.ravel()[:2], ids[:, 0]), "top_ids did not come back"
            assert np.array_equal(values.view(np.int32).ravel()[:2], ids[:, 0])
        assert ctx.executions == before, "top-k steps after the first did not replay"
        model.forward(
            np.ones((2, 1), np.int32),
            np.full((2, 1), 180, np.int32),
            np.zeros(2, np.int32),
            TOP_P,
        )
        before = ctx.executions
        for step in range(decode_steps):  # top-p steps: best K and log-normalizers, replayed
            ids = np.full((2, 1), 300 + step, np.int32)
            temperatures = [0.5 + step / decode_steps, 2.0 - step / decode_steps]  # per row
            draws = [(SamplingParams(temperature=t, top_p=0.9), None) for t in temperatures]
            pos = np.full((2, 1), 181 + step, np.int32)
            out = model.forward(ids, pos, np.zeros(2, np.int32), TOP_P, draws)
            top, lse = out["top_ids"], out["log_normalizer"]
            assert np.array_equal(top.ravel()[:2], ids[:, 0]), "top_ids did not come back"
            inverse = np.array([1 / t for t in temperatures], np.float32)
            assert np.array_equal(lse, inverse), "stale 1/T"
            whole = model.last_logits()  # left on the GPU by that step; copied when asked
            assert np.array_equal(whole.view(np.int32).ravel()[:2], ids[:, 0]), (
                "not the last logits"
            )
        assert ctx.executions == before, "top-p steps after the first did not replay"
        assert sorted(model.graphs) == [  # (batch, position input shapes, outputs copied)
            (2, (), ("logits",)),
            (2, (), ("next_token",)),
            (2, (), ("top_logits", "top_ids")),
            (2, (), ("top_logits", "top_ids", "log_normalizer")),
        ]
    return (
        f"first decode step captured, {decode_steps} later steps replayed (logits, greedy ids, "
        "best-K logits and ids, and with the log-normalizer at each row's temperature)"
    )


def check_chained_steps(decode_steps: int = 50) -> str:
    """Greedy steps one ahead of the host (`submit(None, ...)`): each is fed the previous
    call's next_token by a device copy (the stand-in's next_token is its input_ids, so the
    first step's ids must come back every step), the two host buffer sets alternate, each
    set's chained step is captured once and then replayed, and the misuses are refused."""
    from netdef.artifact import Metadata

    meta, desc = fake_engine(max_seq_len=256)
    ctx = CopyContext()
    zeros = np.zeros(2, np.int32)
    with TensorRTBackend(Metadata.from_dict(meta), desc, ctx, auto_graphs=True) as model:
        model.reset(2)
        prompt = np.tile(np.arange(4, dtype=np.int32), (2, 1))
        model.forward(prompt + 1, prompt, np.full(2, 3, np.int32), ALL_LOGITS)
        first = np.array([[7], [9]], np.int32)
        model.submit(first, np.full((2, 1), 4, np.int32), zeros, ARGMAX)
        for step in range(decode_steps):
            if step == 2:  # both sets' chained steps captured by now
                before = ctx.executions
            model.submit(None, np.full((2, 1), 5 + step, np.int32), zeros, ARGMAX)
            got = model.collect()["next_token"]
            assert np.array_equal(got, first[:, 0]), f"step {step}: {got}, not the fed ids"
        model.collect()
        assert ctx.executions == before, "chained steps after the first two did not replay"
        assert sorted(model.chained) == [(2, (), ("next_token",), 0), (2, (), ("next_token",), 1)]
        model.submit(first, np.full((2, 1), 60, np.int32), zeros, ARGMAX)
        model.submit(None, np.full((2, 1), 61, np.int32), zeros, ARGMAX)
        refusals = [
            lambda: model.submit(None, np.full((2, 1), 62, np.int32), zeros, ARGMAX),
            lambda: model.submit(first, np.full((2, 1), 62, np.int32), zeros, ARGMAX),
            lambda: model.forward(first, np.full((2, 1), 62, np.int32), zeros, ARGMAX),
            model.last_logits,
        ]
        for refused in refusals:
            try:
                refused()
            except RuntimeError:
                continue
            raise AssertionError("a call while two were in flight was not refused")
        model.reset(2)  # collects both
        try:
            model.collect()
        except RuntimeError:
            pass
        else:
            raise AssertionError("reset left a call to collect")
    return f"{decode_steps} chained greedy steps fed on the device, replayed in two host sets"


def check_backend(
    profile_set: str = PROFILE_SETS[0], decode_steps: int = 100, split: bool = False
) -> str:
    """TensorRTBackend's own forward and decode-graph paths, with `CopyContext` as the engine;
    `split`: a second one takes the calls outside the decode profile (`splits_contexts`)."""
    from netdef.artifact import Metadata

    meta, desc = fake_engine(max_seq_len=256, profile_set=profile_set)
    ctx = CopyContext()
    prefill = CopyContext() if split else None
    rng = np.random.default_rng(2)
    with TensorRTBackend(
        Metadata.from_dict(meta), desc, ctx, auto_graphs=True, timed=True, prefill=prefill
    ) as model:
        cache = PinnedBuffer(model.max_batch * model.max_prefill, np.int32)
        try:

            def cache_head(b: int, s: int) -> np.ndarray:  # first words of past_kv_0 on the GPU
                d2h(cache, model.device[past(0)], b * s * 4, model.stream)
                model.stream.synchronize()
                return cache.array[: b * s].reshape(b, s).copy()

            def call(ids: np.ndarray, pos: np.ndarray) -> None:
                b, s = ids.shape
                out = model.forward(ids, pos, np.full(b, s - 1, np.int32), ALL_LOGITS)
                logits = out["logits"]
                assert logits.shape == (b, 64) and logits.dtype == np.float32
                got = logits.view(np.int32).ravel()[: b * s].reshape(b, s)
                assert np.array_equal(got, ids), "logits buffer does not hold the copied ids"
                assert np.array_equal(cache_head(b, s), pos), "present_kv_0 is not past_kv_0"
                assert model.last_call_ms > 0

            model.reset(2)
            call(
                rng.integers(0, 1000, (2, 5), dtype=np.int32),
                np.tile(np.arange(5, dtype=np.int32), (2, 1)),
            )
            call(np.ones((2, 1), np.int32), np.full((2, 1), 5, np.int32))  # plain, captured
            before = ctx.executions
            for step in range(decode_steps):
                pos = np.full((2, 1), 6 + step, np.int32)
                call(rng.integers(0, 1000, (2, 1), dtype=np.int32), pos)
            assert ctx.executions == before, "decode steps did not replay the graph"
            call(
                rng.integers(0, 1000, (2, 3), dtype=np.int32),
                np.tile(np.arange(3, dtype=np.int32), (2, 1)),
            )
            before = ctx.executions
            # One context: plain, as the prefill set it up for another shape; then a replay.
            # Split: both replay, the decode context still being set up for them.
            call(np.ones((2, 1), np.int32), np.full((2, 1), 3, np.int32))
            call(np.ones((2, 1), np.int32), np.full((2, 1), 4, np.int32))
            plain = 0 if split else 1
            assert ctx.executions == before + plain, "expected plain steps, then replays"
            # The first B=1 step runs plainly, then is captured (capturing enqueues it once more).
            call(np.ones((1, 1), np.int32), np.zeros((1, 1), np.int32))
            assert ctx.executions == before + plain + 2
            full = model.max_prefill  # one sequence's full chunk: the chunk profile
            call(
                rng.integers(0, 1000, (1, full), dtype=np.int32),
                np.arange(full, dtype=np.int32)[None],
            )
            chunk = 2 if "chunk" in profile_set.split(",") else 1
            expected = [0] if profile_set == "dynamic" else [1, 0, 1, 0, chunk]
            if split:  # each context keeps its profiles: decode in one, the others in the other
                assert ctx.profile_switches == [0], ctx.profile_switches
                assert prefill.profile_switches == sorted({1, chunk}), prefill.profile_switches
                assert prefill.executions == 3  # the three prefills, none of them captured by us
            else:
                assert ctx.profile_switches == expected, ctx.profile_switches
        finally:
            cache.free()
    switches = ctx.profile_switches + (prefill.profile_switches if split else [])
    return f"{profile_set}: prefill, {decode_steps} graph-replayed decode steps, profile switches {switches}"


CHECKS: dict[str, Callable[[], str]] = {
    "device": check_device,
    "buffers from engine shapes": check_buffers,
    "pinned round trip": check_round_trip,
    "event timing": check_events,
    "graph capture + replay": check_graph_replay,
    "backend auto graphs": check_auto_graphs,
    "backend chained greedy steps": check_chained_steps,
    "backend, decode+prefill+chunk": check_backend,
    "backend, decode+prefill": lambda: check_backend("decode,prefill"),
    "backend, dynamic profile": lambda: check_backend("dynamic"),
    "backend, prefills in a second context": lambda: check_backend(split=True),
}


# ---- measurements ----


def launch_overhead(launches: int) -> dict[str, float]:
    """µs per step (host submit + synchronize) of a small decode-like step (3 tiny H2D,
    one D2D, one 64 KiB D2H): plain stream launches vs one graph launch."""
    stream = Stream()
    ins = [(DeviceBuffer(256), PinnedBuffer(64, np.int32), 256) for _ in range(3)]
    out_dev, out_host = DeviceBuffer(64 * 1024), PinnedBuffer(16 * 1024, np.float32)

    def step() -> None:
        enqueue_step(
            stream, ins, lambda s: d2d(out_dev, ins[0][0], 256, s), [(out_host, out_dev, 64 * 1024)]
        )

    graph = CudaGraph.capture(stream, step)
    try:
        out = {}
        for name, run in (("plain", step), ("graph", lambda: graph.launch(stream))):
            run()
            stream.synchronize()
            t0 = time.perf_counter()
            for _ in range(launches):
                run()
                stream.synchronize()
            out[name] = (time.perf_counter() - t0) / launches * 1e6
        return out
    finally:
        graph.free()
        _freeing(out_dev, out_host, stream, *(r for d, h, _ in ins for r in (d, h)))()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mib", type=int, default=256, help="copy size for bandwidth (default 256)")
    p.add_argument(
        "--launches", type=int, default=1000, help="steps timed per launch mode (default 1000)"
    )
    args = p.parse_args(argv)
    at_least(p, args, {"--mib": 1, "--launches": 1})
    if reason := gpu_unavailable_reason():
        print(f"no usable GPU: {reason}", file=sys.stderr)
        return 2
    rt = cudart()
    versions = [rt.cudaDriverGetVersion()[1], rt.cudaRuntimeGetVersion()[1]]
    print(
        "CUDA driver {}.{}, runtime {}.{}".format(
            *(x for v in versions for x in divmod(v // 10, 100))
        )
    )
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"PASS  {name}: {check()}")
        except Exception as e:
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=4)
    try:
        bw = bandwidth(args.mib)
        print(
            f"bandwidth ({args.mib} MiB, pinned, events): "
            + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items())
            + " (bytes copied; D2D reads and writes each)"
        )
        lo = launch_overhead(args.launches)
        print(
            f"decode-like step, µs per step incl. sync ({args.launches} each): plain stream "
            f"{lo['plain']:.1f}, CUDA graph {lo['graph']:.1f} ({lo['plain'] / lo['graph']:.2f}x)"
        )
    except Exception as e:
        failed += 1
        print(f"FAIL  measurements: {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    from tools.cli import run

    run(main)
