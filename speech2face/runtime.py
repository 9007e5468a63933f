"""Process-wide settings every ``speech2face`` command makes at start-up.

Neither is made on ``import speech2face`` (no hidden global state, no work at
import time). A program using the Python API calls :func:`setup_process` (both), or
either function, itself; :func:`passive_threads` only works before ``import torch``.

**Keep freed memory** (:func:`tune_allocator`, glibc only). glibc's ``malloc`` serves
blocks above its mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh
``mmap`` and returns them with ``munmap`` on ``free``, and it trims the heap whenever 128
KiB lie free at its top. PyTorch's tensors are such blocks, so every step of a training
loop, and every spectrogram of a batch, page-faults its memory afresh: a tiny voice
training step took 292,933 minor faults (1.14 GiB zero-filled by the kernel) and 1.57x
the time it takes when the memory is kept (issue 17). Keeping it costs nothing but the
peak: resident memory stays at its high-water mark, which a training job reaches on its
first step anyway.

**Threads that sleep instead of spinning** (:func:`passive_threads`). PyTorch's OpenMP
threads spin after each parallel operation, waiting for the next. When another process
wants the same cores, a spinning thread burns the time slice its partner needs, and each
of the warp's hundreds of operations per call waits for a descheduled thread: with one
competing process on 2 cores, the 2-thread warp took 548 ms against 232 ms on 1 thread.
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep; see docs/benchmarks.md for
what it costs on idle cores.

Settings a user made are respected: with ``MALLOC_*`` variables, ``GLIBC_TUNABLES`` with
``glibc.malloc`` or another allocator preloaded (jemalloc, tcmalloc, mimalloc), the
allocator is left alone; with ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME``
set, the thread policy is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes (a C int): the heap is trimmed only when 2 GiB lie free.
_NEVER_TRIM = 2**31 - 1

# The same settings as environment variables, which glibc reads when a process starts:
# set for child processes (data-loader and prepare workers are started by spawn).
_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}

_tuned: bool | None = None


def _user_chose_allocator() -> bool:
    variables = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if variables and variables != _ENVIRONMENT:  # ours, inherited from a parent: in effect
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse (no ``munmap``, no heap trimming).

    Idempotent and cheap. Also sets the equivalent ``MALLOC_MMAP_MAX_`` and
    ``MALLOC_TRIM_THRESHOLD_`` variables for processes this one starts.

    Returns:
        True if the settings are in effect in this process (now or from an earlier call),
        False if nothing was changed (not glibc, or the user chose allocator settings).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if _user_chose_allocator():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. No mmap: large blocks come from the heap and are
    # reused; no trimming: freed heap memory stays mapped (and already faulted in).
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
    if _tuned:
        for name, value in _ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    return _tuned


_THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def passive_threads() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process (and those it starts).

    OpenMP reads it when PyTorch loads, so this works only before ``import torch``.

    Returns:
        True if the policy was set now, False if torch is already imported or the user
        chose a thread policy.
    """
    if "torch" in sys.modules or any(name in os.environ for name in _THREAD_VARIABLES):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def setup_process() -> None:
    """What every command does at start-up: :func:`passive_threads`, :func:`tune_allocator`."""
    passive_threads()
    tune_allocator()


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the ``with`` block on ``count`` torch threads, then restore the previous count.

    Small operations (the demo's tiny models, the corpus's warps) run fastest on one
    thread on a busy machine: more threads wait on each other (see above).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
