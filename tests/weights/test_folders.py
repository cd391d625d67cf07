"""weights.folders: what must not stop halfway, and files replaced whole."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from weights.folders import interrupts_deferred, staged_file, staged_folder


def test_a_ctrl_c_inside_a_deferred_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class Stopped(KeyboardInterrupt):
    """As tools.cli's Terminated."""


def raise_stopped(signum: int, frame: object) -> None:
    raise Stopped


def test_what_a_sigterm_handler_raises_is_deferred_too():
    """tools.cli's SIGTERM handler raises Terminated: inside a builder callback TensorRT
    swallowed it."""
    done = []
    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        with pytest.raises(Stopped), interrupts_deferred():
            signal.raise_signal(signal.SIGTERM)
            done.append("the rest of the block ran")
        assert done == ["the rest of the block ran"]
        assert signal.getsignal(signal.SIGTERM) is raise_stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_deferred_interrupt_can_be_handed_to_a_callback():
    caught = []
    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        with interrupts_deferred(caught.append):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [type(e) for e in caught] == [KeyboardInterrupt, Stopped]


def test_a_program_s_own_handler_that_raises_nothing_runs_as_before():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append("the program's"))
    try:
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            assert seen == ["the program's"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_staged_file_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    """tools.logits wrote --out in place: a Ctrl-C while writing left a user's file empty."""
    path = tmp_path / "out.npy"
    path.write_text("yours")
    with pytest.raises(KeyboardInterrupt), staged_file(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"]
    assert path.read_text() == "yours"
    with staged_file(path) as tmp:
        tmp.write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"]
    assert path.read_text() == "new"


def test_a_staged_file_writes_through_a_symbolic_link(tmp_path):
    """As np.save(link) did: the link stays a link and its target gets the new file."""
    (tmp_path / "data").mkdir()
    target, link = tmp_path / "data" / "out.npy", tmp_path / "out.npy"
    target.write_text("yours")
    link.symlink_to(target)
    with staged_file(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["out.npy"]


def test_a_staged_folder_takes_the_place_of_an_empty_one_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with pytest.raises(KeyboardInterrupt), staged_folder(final) as tmp:
        (tmp / "a").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(final.iterdir())
    with staged_folder(final) as tmp:
        (tmp / "a").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in final.iterdir()] == ["a"]


def test_a_staged_folder_deletes_only_the_files_it_owns(tmp_path):
    """A folder that is not empty is replaced only with `owned` (its files of those names);
    without, the rename refuses it and nothing changes."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "yours").write_text("kept")
    with pytest.raises(OSError), staged_folder(final) as tmp:
        (tmp / "a").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.read_text() for p in final.iterdir()] == ["kept"]
    with staged_folder(final, owned={"yours"}) as tmp:
        (tmp / "a").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a": "new"}


def test_a_staged_folder_whose_swap_fails_halfway_leaves_final_as_it_was(tmp_path, monkeypatch):
    """The old folder is renamed aside before the new one is renamed into place: when that
    second rename fails, the old one goes back (it stayed under a partial name, which the next
    build's remove_stale_partials deletes, and `final` was gone)."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "engine").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == final and (Path(src) / "engine").read_text() == "new":
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), staged_folder(final, owned={"engine"}) as tmp:
        (tmp / "engine").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_text() for p in final.iterdir()} == {"engine": "old"}


def test_a_staged_folder_keeps_files_put_in_final_after_the_callers_check(tmp_path, monkeypatch):
    """A file that appears in `final` between the caller's check and the swap was left in the
    old folder, under a partial name that the next build's remove_stale_partials deletes with
    it; now the swap is refused and `final` keeps it."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "engine").write_text("old")
    with pytest.raises(OSError), staged_folder(final, owned={"engine"}) as tmp:
        (tmp / "engine").write_text("new")
        (final / "yours").write_text("kept")  # after the caller's check, before the swap
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_text() for p in final.iterdir()} == {"engine": "old", "yours": "kept"}
