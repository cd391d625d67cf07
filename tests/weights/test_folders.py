"""weights.folders: what must not stop halfway, and files replaced whole."""

from __future__ import annotations

import signal

import pytest

from weights.folders import ctrl_c_deferred, staged_file


def test_a_ctrl_c_inside_a_deferred_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_deferred_ctrl_c_can_be_handed_to_a_callback():
    pressed = []
    with ctrl_c_deferred(lambda: pressed.append(True)):
        signal.raise_signal(signal.SIGINT)
    assert pressed == [True]


def test_a_program_s_own_ctrl_c_handler_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append("the program's"))
    try:
        with ctrl_c_deferred():
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
