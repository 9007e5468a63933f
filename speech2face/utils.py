"""Small shared helpers: checks of values read from files, atomic writes, PNG bytes,
output-folder locks and the user cache directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import json
import math
import numbers
import os
import re
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# Image files the commands read (faces), and that an -o naming one file may name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Seeds reach numpy's generators, which refuse negative ones, and torch's, which take at
# most 64 bits: every seed option and setting is checked against this range up front.
MAX_SEED = 2**63 - 1


SIGNAL_MASKS = hasattr(signal, "pthread_sigmask")  # POSIX


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT blocked in this thread, and in the threads and processes it starts, until
    the end of the block; a Ctrl-C sent meanwhile arrives then. Elsewhere than POSIX a
    no-op."""
    if not SIGNAL_MASKS:
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def is_whole(value, low=None, high=None) -> bool:
    """An integer (as JSON gives it, or numpy's; not a bool) from ``low`` to ``high``
    where they are given."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def is_number(value, low=None, high=None) -> bool:
    """A finite int or float (not a bool) from ``low`` to ``high`` where they are given."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value))  # a huge int: no float
            and (low is None or value >= low) and (high is None or value <= high))


def is_names(value) -> bool:
    """A list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def seed_problem(seed, name: str = "seed") -> str | None:
    """Why ``seed`` cannot seed the generators (a line naming ``name``), or None."""
    if not (isinstance(seed, int) and is_whole(seed, 0, MAX_SEED)):
        return f"{name} must be an integer from 0 to {MAX_SEED}, got {seed!r}"
    return None


def progress(*args, **kwargs):
    """A tqdm progress bar (arguments as ``tqdm.tqdm``'s) that erases its line when an
    error closes it, so that a failed command's error is the one line left on the
    terminal instead of the line under a bar stopped part-way."""
    return _progress_class()(*args, **kwargs)


def close_progress_bars() -> None:
    """Close every progress bar still open; called while an error is handled, each erases
    its line. A bar a loop was iterating stays open after an error until the traceback
    holding it is freed, and then drew its last line under the command's error line."""
    if _progress_class.cache_info().currsize:  # (none made: tqdm not even imported)
        for bar in list(getattr(_progress_class(), "_instances", ())):  # tqdm's live bars
            with contextlib.suppress(Exception):  # (stderr gone): the first error stands
                bar.close()


@functools.cache
def _progress_class():
    import sys

    from tqdm.auto import tqdm

    class Progress(tqdm):
        def close(self):
            # Closed by an error: from a ``with`` block's exit, a ``finally``, or the
            # iteration ended by an exception in the loop's body (GeneratorExit).
            if sys.exc_info()[1] is not None:
                self.leave = False
            super().close()

    return Progress


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    A crash or kill leaves either the old file or the complete new one, never half of it.
    """
    with staged_writes() as stage, stage(path, mode) as f:
        yield f


# The errors of a write that found no room.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def staged_writes() -> Iterator[Callable]:
    """Write several files all or nothing.

    Yields ``stage(path, mode="wb")``, a context manager that opens a temporary file
    beside ``path``. When the ``with`` block ends normally every staged file is renamed
    onto its path, in the order staged (so the last can mark the set done); when it
    raises, none is and the temporary files are removed, so a command that fails
    half-way leaves the previous outputs as they were. A folder (or anything but a file)
    where an output goes is refused before any rename (DataError naming it). A rename
    that fails all the same (an immutable file) puts back the files it replaced before
    it (each kept aside as a hard link, or a copy where the file system has none, until
    all are moved), and the error names the file that failed, not its temporary name.
    """
    staged: list[tuple[str, Path]] = []
    made: list[Path] = []  # folders made for the outputs, removed again on failure

    @contextlib.contextmanager
    def stage(path: str | os.PathLike, mode: str = "wb") -> Iterator:
        path = Path(path)
        made.extend(p for p in reversed(path.parents) if not p.exists())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_temp_name(path)}.", suffix=".tmp",
                                   dir=path.parent)
        staged.append((tmp, path))
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not private
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:  # a full disk: name the file (a write's error names none)
            if error.filename is None and error.errno in FULL_DISK:
                error.filename = str(path)
            raise

    def discard(entries) -> None:
        for tmp, _ in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    try:
        yield stage
    except BaseException:
        discard(staged)
        _remove_empty(made)
        raise
    try:  # (os.replace's IsADirectoryError was a traceback)
        check_output_places(path for _, path in staged)
    except BaseException:
        discard(staged)
        _remove_empty(made)
        raise
    moved: list[tuple[Path, str | None]] = []  # (path, its former file kept aside)
    former = None
    try:
        for i, (tmp, path) in enumerate(staged):
            # The last rename needs no way back: after it there is nothing left to fail.
            former = _kept_aside(path) if i < len(staged) - 1 and path.is_file() else None
            try:
                os.replace(tmp, path)
            except OSError as error:  # name the output, not the temporary file
                error.filename, error.filename2 = str(path), None
                raise
            moved.append((path, former))
            former = None
    except BaseException:  # the files not yet moved go; those moved are put back
        discard(staged[len(moved):])
        for path, kept in reversed(moved):
            with contextlib.suppress(OSError):
                if kept is None:
                    path.unlink()
                else:
                    os.replace(kept, path)
        _remove_empty(made)
        raise
    finally:
        for kept in [former, *(kept for _, kept in moved)]:
            if kept is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept)


def _kept_aside(path: Path) -> str:
    """A temporary second name of the file ``path`` (a hard link; a copy where the file
    system has no hard links), for :func:`staged_writes` to put it back."""
    fd, aside = tempfile.mkstemp(prefix=f".{_temp_name(path)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(aside)
    try:
        os.link(path, aside)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        shutil.copy2(path, aside)  # (EPERM is also an immutable file: then copy2 reads it)
    return aside


def check_output_places(paths) -> None:
    """DataError naming the first of ``paths`` (outputs about to be renamed into place)
    that holds a folder or anything else but a file: the rename would fail half-way
    through publishing, with a traceback."""
    from speech2face.errors import DataError

    for path in paths:
        if path.exists() and not path.is_file():
            raise DataError(path, "is in the way: a folder (or other non-file) where an "
                                  "output file is written")


# In an output folder: the files a batch command (spectrogram, reconstruct) has made so
# far, kept for a rerun when the command is killed (resumable_writes).
PARTIAL_NAME = ".speech2face.partial"


class ResumableWrites:
    """What :func:`resumable_writes` yields; outputs are named relative to the folder."""

    def __init__(self, out: Path, run: dict):
        self.out, self.folder = out, out / PARTIAL_NAME
        self.journal = self.folder / "journal.jsonl"
        header = {"run": run}
        self.finished: dict[str, str] = {}  # output name -> input it was made from
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            self.folder.unlink()  # not ours: the name is reserved for the staged outputs
        self._finish_publishing()
        if self._header() == header:  # a killed run of these settings: what it made
            self.finished = {r["name"]: r.get("input") for r in json_records(self.journal, "name")}
        else:
            shutil.rmtree(self.folder, ignore_errors=True)  # another run's, or none
            self.folder.mkdir(parents=True)
            with open(self.journal, "w") as f:
                f.write(json.dumps(header) + "\n")
        self.written: dict[str, None] = {}  # this run's outputs, in order

    def _header(self):
        """The journal's first line, parsed (None when there is none)."""
        if not self.journal.is_file():
            return None
        with open(self.journal, errors="replace") as f:
            return _json_line(f.readline())

    def done(self, name: str, source: str | os.PathLike) -> bool:
        """Whether ``name`` was made from ``source`` as it is now by an earlier run (its
        staged file is there); then the output is kept for the end of this run too."""
        if self.finished.get(name) != input_identity(source) or \
                not (self.folder / name).is_file():
            return False
        self.written[name] = None
        return True

    def write(self, outputs: dict[str, bytes], source: str | os.PathLike) -> None:
        """Stage the outputs of one input, each written whole, then record them."""
        check_output_places(self.out / name for name in outputs)
        for name, data in outputs.items():
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / name) as f:
                f.write(data)
        with open(self.journal, "a") as f:
            f.write("".join(json.dumps({"name": name, "input": input_identity(source)}) + "\n"
                            for name in outputs))
        self.written.update(dict.fromkeys(outputs))

    def publish(self) -> None:
        """Move every output into place. The list goes to disk first: a run killed while
        moving them has finished all its inputs, and the next run completes the move
        before anything else (:meth:`_finish_publishing`), so outputs never stay half
        published."""
        # (a folder made there since: nothing moved yet)
        check_output_places(self.out / name for name in self.written)
        with atomic_write(self.folder / _PUBLISHING, "w") as f:
            json.dump(list(self.written), f)
        self._finish_publishing()

    def _finish_publishing(self) -> None:
        names = read_json(self.folder / _PUBLISHING)
        if not is_names(names):
            return
        inside = self.out.resolve()
        for name in names:
            staged, final = self.folder / name, self.out / name
            if staged.is_file() and final.resolve().is_relative_to(inside):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
        shutil.rmtree(self.folder, ignore_errors=True)


_PUBLISHING = "publishing.json"  # in PARTIAL_NAME: the outputs of a run being published


def _json_line(line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # (nested too deeply: '[' * 100000)
        return None


def input_identity(path: str | os.PathLike) -> str:
    """An input file as a resumed run must find it again: where it is, its size and time."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


@contextlib.contextmanager
def resumable_writes(out: str | os.PathLike, run: dict) -> Iterator[ResumableWrites]:
    """Write many files into the folder ``out`` all or nothing, and resumably.

    Outputs are staged in ``out/.speech2face.partial`` and renamed into place when the
    ``with`` block ends normally. A bad input (a :class:`Speech2FaceError`) removes them:
    the command leaves nothing. A kill, Ctrl-C or a full disk leaves them, and a rerun with
    the same ``run`` settings (JSON-able) finds each one whose input is unchanged
    (``done``), so it continues where the killed run stopped.
    """
    from speech2face.errors import Speech2FaceError

    batch = ResumableWrites(Path(out), run)
    try:
        yield batch
    except Speech2FaceError:
        shutil.rmtree(batch.folder, ignore_errors=True)
        raise
    batch.publish()


def temp_dir_beside(path: str | os.PathLike, tag: str = "") -> Path:
    """A new empty folder ``.NAME.TAG<random>.tmp`` beside ``path``, to be filled and then
    renamed onto ``path``; with the permissions of an ordinary new folder (tempfile makes
    its folders private to the user, which would hide shards and models from a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_temp_name(path)}.{tag}", suffix=".tmp",
                                dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def png_bytes(image, compress_level: int = -1) -> bytes:
    """uint8 ``(H, W, 3)`` array -> the bytes of a PNG file.

    compress_level: zlib's 0 (none) to 9 (smallest); -1, Pillow's default, is zlib's 6.
    """
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _files_below(folder: Path, suffixes, error, skip: frozenset = frozenset()) -> list[Path]:
    """The files below ``folder`` whose names end in one of ``suffixes`` (any case),
    sorted, leaving out hidden files and folders: among them our own, such as the staged
    outputs of a killed run (PARTIAL_NAME) in a folder given back as input, and the
    folders in ``skip`` (resolved paths). Symbolic links to folders are not followed. A
    folder that may not be listed raises ``error(path, problem)`` (``rglob`` skipped one
    without a word, and its files)."""
    def refuse(problem: OSError) -> None:
        raise error(Path(problem.filename), f"cannot be read ({problem.strerror})")

    found = []
    for top, folders, names in os.walk(folder, onerror=refuse):
        folders[:] = [name for name in folders if not name.startswith(".")
                      and Path(top, name).resolve() not in skip]
        found += [path for path in (Path(top, name) for name in names
                                    if not name.startswith("."))
                  if path.suffix.lower() in suffixes and path.is_file()]
    return sorted(found)


def find_inputs(inputs, suffixes, error, outputs: Sequence[str] = ("",),
                out: str | os.PathLike | None = None) -> list[tuple[Path, Path]]:
    """Files named by ``inputs``: files as given, folders searched recursively (sorted)
    for names ending in one of ``suffixes`` (any case).

    Returns ``(path, output stem)`` pairs: a file's stem is its name without the suffix,
    a folder's files keep their sub-folders. ``outputs``: what the command writes for a
    stem (``stem + suffix`` for each), so that no two inputs write the same file, nor one
    a file where another's outputs need a folder. Inputs that would share a stem are kept
    apart by the suffix (``a.jpg``, ``a.png`` -> ``a_jpg``, ``a_png``); outputs that
    would still meet, by a counter (``x/a.wav``, ``y/a.wav`` -> ``a_wav``, ``a_wav-2``),
    taking the first count that meets nothing. A file named twice is taken once. Raises
    ``error(path, problem)`` for an input that does not exist. ``out``: the command's
    output folder, not searched where it lies inside a folder given (a rerun would take
    the last run's outputs as inputs, a level deeper each time), and where it is the
    folder given, or holds it, searched without the files named as ``outputs`` name them
    (``faces photos -o photos``: ``a.crop.png`` is ``a.jpg``'s output, not an input).
    """
    skip = frozenset() if out is None else frozenset({Path(out).resolve()})
    ours = tuple(suffix.lower() for suffix in outputs if suffix)

    def output(path: Path) -> bool:
        """Whether ``path``, found in a folder, is one of this command's outputs."""
        return any(path.name.lower().endswith(suffix) for suffix in ours) and \
            any(path.resolve().is_relative_to(folder) for folder in skip)

    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(path, path.relative_to(item).with_suffix(""))
                      for path in _files_below(item, suffixes, error, skip)
                      if not output(path)]
        elif item.is_file():
            found.append((item, Path(item.stem)))
        elif item.exists() or item.is_symlink():
            raise error(item, "not a regular file (a FIFO, a device or a broken link)")
        elif str(item) == "-":
            raise error(item, "standard input is not read (a file is needed, to name its "
                              "output): give a file or folder")
        else:
            raise error(item, "no such file or folder")
    for path, _ in found:
        if (shown := undecodable_name(path)) is not None:
            raise error(shown, "the name is not valid UTF-8 (its output could not be named "
                               "or printed); rename it")
    seen: set[Path] = set()  # a file given twice (or as itself and in its folder): once
    found = [(path, stem) for path, stem in found
             if not (path.resolve() in seen or seen.add(path.resolve()))]
    shared = Counter(str(stem) for _, stem in found)
    found = [
        (path, stem.with_name(f"{stem.name}_{path.suffix.lstrip('.').lower()}"))
        if shared[str(stem)] > 1 else (path, stem)
        for path, stem in found
    ]
    files: set[Path] = set()  # output files, relative to the output folder
    folders: set[Path] = set()  # and the folders they lie in

    def writes(stem: Path) -> tuple[set[Path], set[Path]]:
        return ({stem.with_name(stem.name + suffix) for suffix in outputs},
                set(stem.parents) - {Path(".")})

    def numbered(stem: Path, count: int) -> Path:
        """``stem`` with ``-count`` on its top folder that is another input's file, or
        else on its own name."""
        for depth, folder in enumerate(reversed(stem.parents[:-1])):
            if folder in files:
                parts = list(stem.parts)
                parts[depth] = f"{parts[depth]}-{count}"
                return Path(*parts)
        return stem.with_name(f"{stem.name}-{count}")

    named = []
    for path, stem in found:
        name, count = stem, 1
        while True:
            mine, above = writes(name)
            if not (mine & (files | folders) or above & files):
                break
            count += 1
            name = numbered(stem, count)
        longest = max(mine, key=lambda p: len(os.fsencode(p.name)))
        if len(os.fsencode(longest.name)) > NAME_MAX:
            raise error(path, f"its output {longest.name!r} would be longer than a file name "
                              f"may be ({NAME_MAX} bytes); rename the input")
        files |= mine
        folders |= above
        named.append((path, name))
    return named


def float_type_problem(tensor) -> str | None:
    """None where ``tensor`` is float16, bfloat16, float32 or float64, the floating types
    whose values torch can check on the CPU (the float8 types have no isfinite, abs or
    max there: a weights file holding one gave NotImplementedError tracebacks); else
    "is <dtype>, not ..." for a message naming the tensor."""
    import torch

    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    return f"is {str(tensor.dtype).removeprefix('torch.')}, not float16, bfloat16, float32 " \
           "or float64"


def undecodable_name(path: str | os.PathLike) -> str | None:
    """``path`` as it can be printed (its bytes escaped: ``r\\xffoot``) where its name is
    not valid UTF-8 (undecodable bytes, which Python keeps as surrogates), else None."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return None


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``, or None when it is missing or not JSON (or nested too
    deeply for Python's parser)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def device_problem(device) -> str | None:
    """Why ``device`` (a string or ``torch.device``) is not a torch device this machine
    can compute on (cpu, cuda[:N] when present, mps when present), or None."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"not a torch device: {device!r:.40} (use cpu, cuda, cuda:N or mps)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device}: CUDA is not available on this machine"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{device}: MPS is not available on this machine"
    elif parsed.type != "cpu":
        return f"{device}: only cpu, cuda and mps devices are supported"
    return None


def json_records(path: str | os.PathLike, key: str) -> Iterator[dict]:
    """The objects of a JSON-lines log that name ``key`` as a string, in order. A line a
    killed run left half-written, or one damaged, is not JSON and is passed over."""
    with open(path, errors="replace") as f:
        for line in f:
            record = _json_line(line)
            if isinstance(record, dict) and isinstance(record.get(key), str):
                yield record


def cache_dir() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME/speech2face``, else ``~/.cache/speech2face``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "speech2face"


# The lock file of an output folder (see output_lock). Code that checks whether an
# output folder is empty, or clears one, leaves it alone: see output_entries.
LOCK_NAME = ".speech2face.lock"

# Locks this process holds: absolute output path -> [lock file descriptor, depth]. A
# command that calls library code which takes the same lock again must not block itself
# (flock conflicts between two open() of one file even within one process).
_held_locks: dict[Path, list[int]] = {}


# sharding_claim's lock file, ``.speech2face.shards-NNNNN.lock``: NNNNN is the run's count.
SHARDS_CLAIM = re.compile(r"\.speech2face\.shards-(\d{5})\.lock")


@contextlib.contextmanager
def sharding_claim(root: str | os.PathLike, num_shards: int, what: str) -> Iterator[None]:
    """Hold, for a run, the claim that the runs writing ``root`` now split their work into
    ``num_shards`` shards. Jobs of one array (one ``--num-shards``, each its own index)
    run side by side; a run that splits otherwise would do and record the same work as
    they do, so it is refused (DataError naming ``root``). The claim is a shared
    ``flock`` on ``.speech2face.shards-N.lock`` in ``root``; another count's file that is
    locked means a run of that count is alive (the kernel drops a dead run's locks).
    ``what``: the command, for the message."""
    import fcntl

    from speech2face.errors import DataError

    root = Path(root)
    own = root / f".speech2face.shards-{num_shards:05d}.lock"
    made = [p for p in reversed(root.parents) if not p.exists()] + \
        ([root] if not root.exists() else [])
    root.mkdir(parents=True, exist_ok=True)
    while True:  # a file the last holder unlinked after we opened it: open it again
        fd = os.open(own, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if own.exists() and os.stat(own).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        for path in sorted(root.glob(".speech2face.shards-*.lock")):
            claim = SHARDS_CLAIM.fullmatch(path.name)
            if path == own or claim is None:
                continue
            try:
                other = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(root, f"another {what} into it splits the work into "
                                f"{int(claim[1])} shard(s); runs into one folder at the same "
                                f"time need the same --num-shards ({num_shards} here)") from None
            finally:
                os.close(other)  # and with it the probe's lock
        yield
    finally:
        try:  # the last holder removes the file, and the folders made for it when empty
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            own.unlink(missing_ok=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):  # not empty: the run's output
                    folder.rmdir()
        except BlockingIOError:
            pass
        os.close(fd)


def lock_file_for(path: str | os.PathLike, folder: bool = True) -> Path:
    """The lock file of an output: ``PATH/.speech2face.lock`` for a folder; for a single
    output file, ``.NAME.lock`` beside it (a file has no inside)."""
    path = Path(os.path.abspath(path))
    return path / LOCK_NAME if folder else path.parent / f".{path.name}.lock"


def output_entries(folder: str | os.PathLike) -> list[Path]:
    """What an output folder holds, without its lock files (empty for a missing folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name != LOCK_NAME and not SHARDS_CLAIM.fullmatch(p.name))


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, folder: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` (a folder, or one file with
    ``folder=False``) while writing it.

    A second writer stops at once with ``Speech2FaceError("another run is writing PATH
    (pid N)")``. The lock is an ``fcntl.flock`` on :func:`lock_file_for`, which the kernel
    drops when a process dies: a killed run's lock file does not block the next run. The
    folder is made if missing; the lock file is removed at the end (a killed run's stays,
    and the next run takes it), and a folder the run made and left empty (and any parents
    made for it) is removed again. Re-entrant within a process.
    """
    from speech2face.errors import Speech2FaceError

    key = Path(os.path.abspath(path))
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            if key in _held_locks:  # not in a forked child
                _held_locks[key][1] -= 1
        return
    lock = lock_file_for(key, folder)
    made = [p for p in reversed(lock.parents) if not p.exists()]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = f"cannot create the output folder ({error.strerror})"
        if folder and key.is_symlink() and not key.exists():
            problem = f"is a broken symbolic link (to {os.readlink(key)}); the output is a folder"
        elif folder and key.exists() and not key.is_dir():
            problem = "is a file; the output is a folder"
        else:  # a file where a folder above the output must be (compare -o afile/x.md)
            above = next((p for p in reversed(key.parents) if p.exists() and not p.is_dir()),
                         None)
            if above is not None:
                problem = f"{above} is a file, not a folder"
        raise Speech2FaceError(path, problem) from None
    fd = _acquire(lock, path, made)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = [fd, 1]
    remove_stale_temps(key, folder)
    try:
        yield
    finally:
        if _held_locks.pop(key, None) is not None:  # None: a forked child, closed already
            # Unlinked while still held: a process that opened this file and waits for it
            # finds, once it gets it, that the name is gone, and starts again (_acquire).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)
            _remove_empty(made)


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader or pool worker): close its copies of the lock
    files. A flock belongs to the open file, which a child's copy keeps locked after the
    parent is killed until the child exits too (DataLoader workers outlive a killed
    training process by seconds), and a resume started at once was refused. The
    parent's lock is unaffected: it lasts while any copy of its own stays open."""
    for fd, _ in _held_locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _acquire(lock: Path, path, made: list[Path]) -> int:
    """Open and flock ``lock`` (not waiting); the descriptor, or the one-line error."""
    from speech2face.errors import Speech2FaceError

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
        except OSError as error:
            _remove_empty(made)
            raise Speech2FaceError(lock, f"cannot create the lock file ({error.strerror})") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise Speech2FaceError(
                None, f"another run is writing {path} (pid {owner or 'unknown'})") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed it after our open: take the new one


# Our temporary files and folders are ".NAME.<8 random characters>.tmp" (tempfile's
# mkstemp and mkdtemp, in staged_writes and temp_dir_beside; "old-" in replace_dir).
_TEMP = r"(old-)?[a-z0-9_]{8}\.tmp"

# NAME in those is cut to this many bytes: a file name may have 255 (NAME_MAX), and the
# temporary name adds up to 18 to it.
_TEMP_NAME_BYTES = 200
NAME_MAX = 255


def _temp_name(path: Path) -> str:
    return os.fsencode(path.name)[:_TEMP_NAME_BYTES].decode("utf-8", "ignore")


def remove_stale_temps(path: Path, folder: bool = True, depth: int = 2) -> None:
    """Remove the temporary files and folders that killed runs left in the output ``path``.

    Looks beside ``path`` for its own temporary names, and in the folder ``path`` and its
    sub-folders (``depth`` levels, enough for RUN/checkpoints and the like) for any of
    ours. Call it holding the output's lock: then no live run is writing them.
    """
    path = Path(path)
    mine = re.compile(rf"\.{re.escape(_temp_name(path))}\.{_TEMP}")
    ours = re.compile(rf"\..+\.{_TEMP}")
    stale = [p for p in path.parent.glob(f".{glob.escape(_temp_name(path))}.*.tmp")
             if mine.fullmatch(p.name)]
    level = [path] if folder else []
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                entries = list(os.scandir(parent))
            except OSError:
                continue
            for entry in entries:
                if ours.fullmatch(entry.name):
                    stale.append(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    below.append(Path(entry.path))
        level = below
    for item in stale:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                item.unlink()


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` onto ``out``, which is missing or holds nothing
    but the lock of :func:`output_lock` (held by this process): the lock file moves into
    ``tmp`` first (the same file, so still locked), and goes on guarding ``out``."""
    from speech2face.errors import Speech2FaceError

    tmp, out = Path(tmp), Path(out)
    lock = out / LOCK_NAME
    if lock.exists():
        os.replace(lock, tmp / LOCK_NAME)
        try:
            out.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # another process made a new lock file in the moment between
            raise Speech2FaceError(out, "another run started writing here meanwhile") from None
    try:
        os.replace(tmp, out)
    except OSError:
        raise Speech2FaceError(out, "another run started writing here meanwhile") from None


@contextlib.contextmanager
def publishing_dir(out: str | os.PathLike,
                   publish: Callable[[Path, Path], None] = publish_dir) -> Iterator[Path]:
    """A new folder beside ``out`` to fill in the ``with`` block, then ``publish(tmp, out)``
    (by default :func:`publish_dir`: ``out`` missing, or holding only this run's lock).
    After an error it is deleted and ``out`` is left as it was: no partial output."""
    out = Path(out)
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` that are empty, deepest first; keep the others."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
