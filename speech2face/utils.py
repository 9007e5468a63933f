"""Small shared helpers: atomic writes and the user cache directory."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
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


def cache_dir() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME/speech2face``, else ``~/.cache/speech2face``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "speech2face"
