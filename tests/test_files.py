import os
import stat

import pytest

from dsdnode.files import write_atomic


def test_write_atomic_replaces_whole_file_with_mode(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    write_atomic(target, b"new content", 0o600)
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
