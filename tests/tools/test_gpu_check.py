"""`python -m tools.gpu_check`'s arguments, checked before it looks for a GPU (its checks run
on a GPU: tests/runtime/test_cuda_gpu.py)."""

from __future__ import annotations

import pytest

from tools import gpu_check


@pytest.mark.parametrize("flag", ["--mib", "--launches"])
def test_sizes_below_one_are_refused(flag, capsys):
    """--mib 0 asked for buffers of no bytes, --launches 0 divided by zero: both on a GPU."""
    with pytest.raises(SystemExit) as e:
        gpu_check.main([flag, "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m tools.gpu_check: error: {flag} must be at least 1."
    )
