"""Shared helpers: checks of values read from files, all-or-nothing writes, locks."""

import contextlib
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from speech2face.utils import (
    atomic_write,
    is_names,
    is_number,
    is_whole,
    publishing_dir,
    seed_problem,
    staged_writes,
)


@pytest.mark.parametrize("text, whole, number", [
    ("3", True, True), ("-1", False, False), ("2.0", False, True), ("true", False, False),
    ('"3"', False, False), ("null", False, False), ("NaN", False, False),
    ("Infinity", False, False), ("1e400", False, False), ("1" + "0" * 400, False, False),
    ("[3]", False, False),
])
def test_json_values_are_checked_as_json_gives_them(text, whole, number):
    """Values as json.loads gives them (it reads NaN, Infinity, 1e400 as floats and a
    400-digit integer as an int), checked against the range 0 to 10**6."""
    value = json.loads(text)
    assert is_whole(value, 0, 10**6) is whole
    assert is_number(value, 0, 10**6) is number


def test_value_checks_bounds_and_types():
    assert is_whole(np.int64(5), 1) and not is_whole(np.float32(5))  # numpy's integers count
    assert is_number(10**400) and not is_number(10**400, high=1e308)  # no float conversion
    assert is_whole(-3) and not is_whole(-3, -2)
    assert is_names(["a", "b"]) and is_names([]) and not is_names(["a", 1]) and not is_names("ab")
    assert seed_problem(0) is None and seed_problem(np.int64(1)) is not None  # torch wants int
    assert "seed" in seed_problem(-1) and seed_problem(True) is not None


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


def test_staged_writes_put_back_what_they_replaced_when_a_rename_fails(tmp_path, monkeypatch):
    """A rename that fails half-way (here the third: an immutable file) used to leave the
    files renamed before it replaced: now they are put back, the new file made before it
    removed, and the error names the output, not its temporary file."""
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").write_text("old c")
    replace = os.replace

    def refuse_c(src, dst):
        if Path(dst).name == "c.txt":
            raise PermissionError(1, "Operation not permitted", src)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_c)
    with pytest.raises(OSError) as error, staged_writes() as stage:
        for name in ("a.txt", "b.txt", "c.txt"):
            with stage(tmp_path / name, "w") as f:
                f.write(f"new {name}")
    assert error.value.filename == str(tmp_path / "c.txt")
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.txt"]  # no b.txt, no temporary files


def test_staged_writes_refuse_a_folder_in_the_way_before_renaming_anything(tmp_path):
    """os.replace's IsADirectoryError reached the commands (faces, evaluate) as a
    traceback; now it is one DataError naming the place, and nothing has moved."""
    from speech2face.errors import DataError

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").mkdir()  # in the way
    with pytest.raises(DataError, match="c.txt: is in the way: a folder"), \
            staged_writes() as stage:
        for name in ("a.txt", "new/b.txt", "c.txt"):
            with stage(tmp_path / name, "w") as f:
                f.write(f"new {name}")
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.txt"]  # no new/, no temporary files


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


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """A write's ENOSPC names no file (prepare's descriptor store said only "No space left
    on device"); the staged write adds its output's path. Other errors stay as raised."""
    target = tmp_path / "store" / "a-000000.npz"
    with pytest.raises(OSError) as raised, atomic_write(target) as f:
        f.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert raised.value.filename == str(target) and not target.parent.exists()
    with pytest.raises(OSError) as raised, atomic_write(target):
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # not about room: left alone
    assert raised.value.filename is None


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


def test_a_killed_writers_forked_children_do_not_keep_its_lock(tmp_path):
    """A process holding an output lock forks a child (as a DataLoader worker is) and is
    killed; the child lives on. The next run gets the lock at once."""
    import signal
    import subprocess
    import sys
    import time

    from speech2face.errors import Speech2FaceError
    from speech2face.utils import output_lock

    out = tmp_path / "run"
    code = (
        "import multiprocessing as mp, sys, time\n"
        "from speech2face.utils import output_lock\n"
        f"with output_lock({str(out)!r}):\n"
        "    child = mp.get_context('fork').Process(target=time.sleep, args=(60,))\n"
        "    child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(writer.stdout.readline())
    try:
        with pytest.raises(Speech2FaceError, match="another run is writing"):
            with output_lock(out):
                pass
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        time.sleep(0.2)
        os.kill(child, 0)  # the child still runs
        with output_lock(out):
            pass
    finally:
        writer.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------- find_inputs


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _stems(found):
    return [str(stem) for _, stem in found]


def test_find_inputs_never_gives_two_inputs_one_output(tmp_path):
    from speech2face.errors import AudioError
    from speech2face.utils import find_inputs

    audio = (".wav", ".flac", ".mp3")
    _touch(tmp_path, "c/a/s.wav", "c/b/s.wav", "c/s_wav-2.wav")
    # the counter's second name is an input's own: it takes the next free one
    found = find_inputs([tmp_path / "c/a/s.wav", tmp_path / "c/b/s.wav",
                         tmp_path / "c/s_wav-2.wav"], audio, AudioError, outputs=(".png",))
    assert _stems(found) == ["s_wav", "s_wav-2", "s_wav-2-2"]
    # one input's landmarks files are another input's face
    _touch(tmp_path, "l/x.wav", "l/x.landmarks.wav")
    found = find_inputs([tmp_path / "l"], audio, AudioError,
                        outputs=(".png", ".landmarks.json", ".landmarks.png"))
    assert _stems(found) == ["x.landmarks", "x-2"]
    assert _stems(find_inputs([tmp_path / "l"], audio, AudioError, outputs=(".png",))) == \
        ["x.landmarks", "x"]
    # a file where another input's outputs need a folder
    _touch(tmp_path, "f/x.png/y.wav", "f/x.wav")
    found = find_inputs([tmp_path / "f"], audio, AudioError, outputs=(".png",))
    outputs = [f"{stem}.png" for stem in _stems(found)]
    assert outputs == ["x.png/y.png", "x-2.png"]
    # a file named twice, or as itself and within its folder: one output (and a folder of
    # outputs that would be another input's file is numbered, not the file in it)
    found = find_inputs([tmp_path / "f/x.wav", tmp_path / "f", tmp_path / "f/./x.wav"],
                        audio, AudioError, outputs=(".png",))
    assert [(p.name, str(stem)) for p, stem in found] == [("x.wav", "x"), ("y.wav", "x.png-2/y")]


def test_find_inputs_passes_over_hidden_files_and_folders_in_a_folder(tmp_path):
    """Among them a killed run's staged outputs, in a folder given back as input."""
    from speech2face.errors import AudioError
    from speech2face.utils import PARTIAL_NAME, find_inputs

    _touch(tmp_path, f"d/{PARTIAL_NAME}/x.wav", "d/.hidden.wav", "d/.git/y.wav", "d/z.wav")
    found = find_inputs([tmp_path / "d"], (".wav",), AudioError, outputs=(".npy",))
    assert _stems(found) == ["z"]
    # named explicitly, a hidden file is an input like any other
    assert _stems(find_inputs([tmp_path / "d/.hidden.wav"], (".wav",), AudioError)) == \
        [".hidden"]


def test_find_inputs_refuses_what_it_cannot_name_or_read(tmp_path):
    from speech2face.errors import AudioError
    from speech2face.utils import find_inputs

    long = tmp_path / ("a" * 245 + ".wav")
    long.write_bytes(b"")
    assert _stems(find_inputs([long], (".wav",), AudioError, outputs=(".png",))) == ["a" * 245]
    with pytest.raises(AudioError, match="would be longer than a file name may be"):
        find_inputs([long], (".wav",), AudioError, outputs=(".png", ".landmarks.json"))
    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(AudioError, match="pipe.wav: not a regular file"):
        find_inputs([tmp_path / "pipe.wav"], (".wav",), AudioError)
    with pytest.raises(AudioError, match="none.wav: no such file or folder"):
        find_inputs([tmp_path / "none.wav"], (".wav",), AudioError)
    odd = os.fsdecode(os.fsencode(tmp_path / "d") + b"/bad\xff.wav")
    try:
        _touch(tmp_path, os.path.relpath(odd, tmp_path))
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses non-UTF-8 names")
    with pytest.raises(AudioError, match=r"bad\\xff.wav: the name is not valid UTF-8"):
        find_inputs([tmp_path / "d"], (".wav",), AudioError)


def test_a_long_output_name_gets_a_temporary_name_that_fits(tmp_path):
    from speech2face.utils import remove_stale_temps, staged_writes

    target = tmp_path / ("b" * 250 + ".png")
    with staged_writes() as stage, stage(target) as f:
        f.write(b"data")
        (tmp_file,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(tmp_file.name) <= 255
    assert target.read_bytes() == b"data"
    # a killed run's temporary file is still found and removed
    left = tmp_path / f".{'b' * 200}.abcd1234.tmp"
    left.write_bytes(b"")
    remove_stale_temps(target, folder=False)
    assert not left.exists() and target.exists()



def test_a_run_killed_while_publishing_is_published_by_the_next(tmp_path):
    """All its inputs were done: the next run (even one that then fails on a bad input)
    first finishes moving the killed run's outputs into place, so none stays half done."""
    from speech2face.errors import AudioError
    from speech2face.utils import PARTIAL_NAME, resumable_writes

    out = tmp_path / "out"
    source = tmp_path / "a.wav"
    source.write_bytes(b"x")
    moves = []

    def killed_after_one(src, dst):
        if str(dst).endswith(".npy") and out / PARTIAL_NAME not in Path(dst).parents:
            if moves:
                raise KeyboardInterrupt  # the kill, between two outputs' moves
            moves.append(dst)
        os.rename(src, dst)

    import speech2face.utils as utils

    original = utils.os.replace
    try:
        with pytest.raises(KeyboardInterrupt), resumable_writes(out, {"run": 1}) as batch:
            batch.write({"one.npy": b"1", "two.npy": b"2", "sub/three.npy": b"3"}, source)
            utils.os.replace = killed_after_one  # while publishing
    finally:
        utils.os.replace = original
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL_NAME, "one.npy"]
    with pytest.raises(AudioError), resumable_writes(out, {"run": 2}):
        raise AudioError("b.wav", "bad")
    assert (out / "two.npy").read_bytes() == b"2" and (out / "sub/three.npy").read_bytes() == b"3"
    assert not (out / PARTIAL_NAME).exists()


@pytest.mark.parametrize("device, words", [
    ("cpu", None), ("cpu:0", None), ("meta", "only cpu, cuda and mps"),
    ("foo", "not a torch device"), (None, "not a torch device"),
])
def test_device_problem_names_what_cannot_compute_here(device, words):
    from speech2face.utils import device_problem

    problem = device_problem(device)
    assert (problem is None) if words is None else (words in problem)


def test_cuda_is_refused_where_there_is_none():
    import torch

    from speech2face.utils import device_problem

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "CUDA is not available" in device_problem("cuda")


def test_what_sits_where_the_staged_outputs_go_is_cleared(tmp_path):
    """A file, a link, or a journal of bytes that are no text: the run starts afresh."""
    from speech2face.utils import PARTIAL_NAME, resumable_writes

    source = tmp_path / "a.wav"
    source.write_bytes(b"x")
    for case in ("file", "link", "garbage"):
        out = tmp_path / case
        out.mkdir()
        staged = out / PARTIAL_NAME
        if case == "file":
            staged.write_text("mine?")
        elif case == "link":
            staged.symlink_to(tmp_path)
        else:
            staged.mkdir()
            (staged / "journal.jsonl").write_bytes(b"\xff\xfe\x00junk")
        with resumable_writes(out, {"run": 1}) as batch:
            assert not batch.done("a.npy", source)
            batch.write({"a.npy": b"1"}, source)
        assert (out / "a.npy").read_bytes() == b"1" and not staged.exists()
    assert source.exists() and (tmp_path / "a.wav").read_bytes() == b"x"


def test_resumable_writes_refuse_a_folder_in_the_way_and_publish_nothing(tmp_path):
    """reconstruct / spectrogram with b.png a folder: a traceback after a.png was
    published, b.png and c.png left staged. Now one DataError, and no output at all."""
    from speech2face.errors import DataError
    from speech2face.utils import PARTIAL_NAME, resumable_writes

    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    sources = []
    for name in ("a", "b", "c"):
        sources.append(tmp_path / f"{name}.wav")
        sources[-1].write_bytes(name.encode())
    with pytest.raises(DataError, match="b.png: is in the way"), \
            resumable_writes(out, {"run": 1}) as batch:
        for source in sources:
            batch.write({f"{source.stem}.png": b"image"}, source)
    assert sorted(os.listdir(out)) == ["b.png"] and not (out / PARTIAL_NAME).exists()
    # A folder made there while the run worked: refused before anything moves.
    (out / "b.png").rmdir()
    with pytest.raises(DataError, match="c.png: is in the way"), \
            resumable_writes(out, {"run": 1}) as batch:
        for source in sources:
            batch.write({f"{source.stem}.png": b"image"}, source)
        (out / "c.png").mkdir()
    assert sorted(os.listdir(out)) == [PARTIAL_NAME, "c.png"]  # kept for the rerun


def test_json_nested_too_deeply_reads_as_damaged(tmp_path):
    """'[' * 100000: a RecursionError traceback from compare, evaluate (after all its
    work), reconstruct and faces, which read such files back."""
    from speech2face.utils import json_records, read_json

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    assert read_json(tmp_path / "deep.json") is None
    (tmp_path / "log.jsonl").write_text(deep + '\n{"name": "a"}\n')
    assert list(json_records(tmp_path / "log.jsonl", "name")) == [{"name": "a"}]
