"""anonymizer.durable: a file is replaced whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from anonymizer.durable import write_atomically


def test_replaced_whole_with_mode_0600_and_nothing_left_beside_it(tmp_path):
    dst = tmp_path / "record"
    dst.write_bytes(b"old")
    assert write_atomically(dst, lambda out: out.write(b"new content"), sync_dir=True) == len(b"new content")
    assert dst.read_bytes() == b"new content"
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    dst = tmp_path / "record"
    dst.write_bytes(b"old")

    def half(out):
        out.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(dst, half)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record"]
