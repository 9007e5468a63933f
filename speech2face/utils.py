"""Small shared helpers: atomic writes and the user cache directory."""

from __future__ import annotations

import contextlib
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


def cache_dir() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME/speech2face``, else ``~/.cache/speech2face``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "speech2face"
