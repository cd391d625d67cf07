"""python -m tools.bundled: the bundled model's folder and description, and a cache folder it
cannot use (the conversion itself: tests/weights/test_gguf_import.py)."""

from __future__ import annotations

import pytest

from tools import bundled as bundled_tool


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_cache_dir_that_is_a_file_is_said_so(under, tmp_path, capsys):
    """It said '(File exists: FILE)' for the file itself, '(Not a directory: ...)' below it."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    cache = file / under if under else file
    assert bundled_tool.main(["--cache-dir", str(cache)]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot prepare the bundled model in {cache}: {file} is a file, not a folder; "
        "set TRT_NETDEF_CACHE (or --cache-dir) to a folder with about 1 GB free.\n"
    )
    assert file.read_text() == "mine"
