"""netdef.tensorrt_module: the one import seam of TensorRT."""

from __future__ import annotations

import sys

import pytest

from netdef.tensorrt_module import TensorRTModuleError, load_tensorrt

# What TensorRT's compiled module does with an exception during its initialization: it fails
# the import with an ImportError of its own (as a Ctrl-C 24-34 ms into `import tensorrt_rtx`).
INIT = """
import signal
try:
    signal.raise_signal(signal.SIGINT)
except BaseException as e:
    raise ImportError("initialization failed") from e
"""


@pytest.fixture
def fake_tensorrt(tmp_path, monkeypatch):
    """A module named `tensorrt` (the datacenter one, not installed here) ahead on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    yield tmp_path / "tensorrt.py"
    sys.modules.pop("tensorrt", None)


def test_a_ctrl_c_while_tensorrt_initializes_is_a_ctrl_c(fake_tensorrt):
    """It was that ImportError, reported as 'no TensorRT Python module could be imported'."""
    fake_tensorrt.write_text(INIT)
    with pytest.raises(KeyboardInterrupt):
        load_tensorrt("tensorrt")


def test_a_module_that_fails_to_import_is_named_with_its_error(fake_tensorrt):
    fake_tensorrt.write_text(
        'raise ImportError("libnvinfer.so.10: cannot open shared object file")'
    )
    with pytest.raises(TensorRTModuleError) as e:
        load_tensorrt("tensorrt")
    assert str(e.value) == (
        "no TensorRT Python module could be imported (tensorrt: libnvinfer.so.10: cannot open "
        "shared object file); install one: pip install -e '.[rtx]' (TensorRT-RTX, also builds "
        "on CPU-only machines) or pip install -e '.[tensorrt]' (datacenter GPUs)."
    )


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(
        TensorRTModuleError,
        match=r"^unknown backend 'onnx'; choose one of tensorrt, tensorrt_rtx\.$",
    ):
        load_tensorrt("onnx")
