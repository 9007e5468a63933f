"""Small shared helpers: atomic writes and the user cache directory."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    A crash or kill leaves either the old file or the complete new one, never half of it.
    """
    with staged_writes() as stage, stage(path, mode) as f:
        yield f


@contextlib.contextmanager
def staged_writes() -> Iterator[Callable]:
    """Write several files all or nothing.

    Yields ``stage(path, mode="wb")``, a context manager that opens a temporary file
    beside ``path``. When the ``with`` block ends normally every staged file is renamed
    onto its path; when it raises, none is and the temporary files are removed, so a
    command that fails half-way leaves the previous outputs as they were.
    """
    staged: list[tuple[str, Path]] = []

    @contextlib.contextmanager
    def stage(path: str | os.PathLike, mode: str = "wb") -> Iterator:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        staged.append((tmp, path))
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not private
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    try:
        yield stage
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def temp_dir_beside(path: str | os.PathLike, tag: str = "") -> Path:
    """A new empty folder ``.NAME.TAG<random>.tmp`` beside ``path``, to be filled and then
    renamed onto ``path``; with the permissions of an ordinary new folder (tempfile makes
    its folders private to the user, which would hide shards and models from a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


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


def find_inputs(inputs, suffixes, error) -> list[tuple[Path, Path]]:
    """Files named by ``inputs``: files as given, folders searched recursively (sorted)
    for names ending in one of ``suffixes`` (any case).

    Returns ``(path, output stem)`` pairs: a file's stem is its name without the suffix,
    a folder's files keep their sub-folders. Inputs that would share a stem are kept
    apart: first by the suffix (``a.jpg``, ``a.png`` -> ``a_jpg``, ``a_png``), then by a
    counter (``x/a.wav``, ``y/a.wav`` -> ``a_wav``, ``a_wav-2``). Raises ``error(path,
    problem)`` for an input that does not exist.
    """
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = (p for p in item.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
            found += [(path, path.relative_to(item).with_suffix("")) for path in sorted(files)]
        elif item.is_file():
            found.append((item, Path(item.stem)))
        else:
            raise error(item, "no such file or folder")
    shared = Counter(str(stem) for _, stem in found)
    found = [
        (path, stem.with_name(f"{stem.name}_{path.suffix.lstrip('.').lower()}"))
        if shared[str(stem)] > 1 else (path, stem)
        for path, stem in found
    ]
    seen: Counter = Counter()
    named = []
    for path, stem in found:
        seen[str(stem)] += 1
        count = seen[str(stem)]
        named.append((path, stem if count == 1 else stem.with_name(f"{stem.name}-{count}")))
    return named


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cache_dir() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME/speech2face``, else ``~/.cache/speech2face``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "speech2face"
