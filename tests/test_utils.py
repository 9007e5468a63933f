"""Shared helpers: all-or-nothing writes."""

import os

import pytest

from speech2face.utils import atomic_write, publishing_dir, staged_writes


def test_staged_writes_commit_together(tmp_path):
    with staged_writes() as stage:
        for name in ("a.txt", "sub/b.txt"):
            with stage(tmp_path / name, "w") as f:
                f.write(name)
            assert not (tmp_path / name).exists()  # nothing visible before the block ends
    assert (tmp_path / "a.txt").read_text() == "a.txt"
    assert (tmp_path / "sub" / "b.txt").read_text() == "sub/b.txt"


def test_staged_writes_leave_old_files_when_the_block_fails(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(ValueError), staged_writes() as stage:
        with stage(tmp_path / "a.txt", "w") as f:
            f.write("new")
        with stage(tmp_path / "b.txt", "w") as f:
            f.write("half")
            raise ValueError("the second input is bad")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]  # no b.txt, no temporary files


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_publishing_dir_shows_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt), publishing_dir(out) as tmp:
        (tmp / "a.png").write_bytes(b"half")
        assert not out.exists()  # nothing at the destination while it is being filled
        raise KeyboardInterrupt  # a killed run
    assert os.listdir(tmp_path) == []  # no partial output, no temporary folder
    with publishing_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    assert os.listdir(tmp_path) == ["report"] and (out / "sub" / "b.json").read_text() == "{}"


def test_outputs_get_ordinary_permissions_not_private_ones(tmp_path):
    # tempfile makes files 0600 and folders 0700; outputs (shards, models, reports) must
    # be readable by a team like any file the user makes, i.e. follow the umask.
    from speech2face import utils

    previous = os.umask(0o022)
    utils._umask.cache_clear()
    try:
        with atomic_write(tmp_path / "file.bin") as f:
            f.write(b"x")
        folder = utils.temp_dir_beside(tmp_path / "bundle")
        assert os.stat(tmp_path / "file.bin").st_mode & 0o777 == 0o644
        assert os.stat(folder).st_mode & 0o777 == 0o755
        assert folder.parent == tmp_path and folder.name.startswith(".bundle.")
    finally:
        os.umask(previous)
        utils._umask.cache_clear()
