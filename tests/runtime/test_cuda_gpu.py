"""The TensorRT backend's CUDA plumbing on a real GPU, without TensorRT.

Each test runs one of tools/gpu_check.py's checks, which drive the backend's own helpers
(`runtime.cuda_buffers`, `buffer_plan`, `TensorRTBackend.forward` and its decode graphs
with a stand-in execution context). Skipped unless cuda-python imports and a CUDA device is
present: that skip is expected in CI and is not coverage.
"""

from __future__ import annotations

import pytest

from netdef.contract import PROFILE_SETS
from runtime.cuda_buffers import gpu_unavailable_reason
from tools import gpu_check

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    if reason := gpu_unavailable_reason():
        pytest.skip(f"needs cuda-python and a CUDA GPU: {reason}")


def test_device_reports_compute_capability():
    assert "compute capability" in gpu_check.check_device()


def test_device_buffers_sized_from_engine_shapes():
    gpu_check.check_buffers()


def test_pinned_round_trip_int32_and_bf16_exact():
    gpu_check.check_round_trip()


def test_event_timing_is_positive():
    gpu_check.check_events()


def test_graph_capture_and_100_replays_with_new_inputs():
    gpu_check.check_graph_replay(replays=100)


def test_backend_captures_decode_graphs_on_first_use():
    assert "later steps replayed" in gpu_check.check_auto_graphs()


def test_backend_chains_greedy_steps_on_the_device():
    assert "fed on the device" in gpu_check.check_chained_steps()


@pytest.mark.parametrize("profile_set", PROFILE_SETS)
def test_backend_forward_and_decode_graph_with_stand_in_context(profile_set):
    gpu_check.check_backend(profile_set)


@pytest.mark.parametrize("profile_set", ["decode,prefill,chunk", "decode,prefill"])
def test_backend_runs_prefills_in_a_second_context(profile_set):
    gpu_check.check_backend(profile_set, split=True)


def test_measurements():
    bandwidth = gpu_check.bandwidth(mib=16, repeats=2)
    assert set(bandwidth) == {"H2D", "D2H", "D2D"} and min(bandwidth.values()) > 0
    launches = gpu_check.launch_overhead(launches=50)
    assert min(launches.values()) > 0
