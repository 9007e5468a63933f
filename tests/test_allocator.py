"""tune_allocator: freed memory is reused without page faults; nothing changes on import.

Each case runs in a fresh interpreter (allocator settings are process-wide) and counts
the minor page faults of allocating, writing and freeing a 64 MiB block (malloc, as
PyTorch's CPU allocator does) again and again: glibc's default maps it afresh every
time (a fault per 4 KiB page), the tuned allocator reuses it. Page faults are counted
by the kernel, not timed: no speed asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

PAGES = 64 * 2**20 // 4096

PROBE = """
import ctypes, json, os, resource
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
def use_and_free():
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)
    libc.free(block)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    use_and_free()
before = faults()
for _ in range(5):
    use_and_free()
print(json.dumps({{"faults_per_array": (faults() - before) / 5, "tuned": TUNED,
                  "env": os.environ.get("MALLOC_MMAP_MAX_")}}))
"""


def probe(setup: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)],
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_default_glibc_refaults_and_tuned_reuses():
    default = probe("TUNED = None")
    assert default["faults_per_array"] > 0.9 * PAGES  # the behaviour being fixed
    tuned = probe("from speech2face.allocator import tune_allocator\nTUNED = tune_allocator()")
    assert tuned["tuned"] is True
    assert tuned["faults_per_array"] < 0.01 * PAGES
    assert tuned["env"] == "0"  # child processes (loader workers) get the same settings


def test_import_changes_nothing():
    result = probe("import speech2face, speech2face.audio, speech2face.cli\nTUNED = None")
    assert result["faults_per_array"] > 0.9 * PAGES
    assert result["env"] is None


def test_user_settings_are_respected():
    result = probe("from speech2face.allocator import tune_allocator\nTUNED = tune_allocator()",
                   MALLOC_ARENA_MAX="2")
    assert result["tuned"] is False
    assert result["faults_per_array"] > 0.9 * PAGES


def test_child_inheriting_our_settings_counts_as_tuned():
    result = probe("from speech2face.allocator import tune_allocator\nTUNED = tune_allocator()",
                   MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    assert result["tuned"] is True
    assert result["faults_per_array"] < 0.01 * PAGES


def test_every_command_tunes_the_allocator(tmp_path):
    code = ("import os, speech2face.cli as c\n"
            f"rc = c.main(['spectrogram', {str(tmp_path / 'missing.wav')!r}, '-o', "
            f"{str(tmp_path / 'out')!r}])\n"
            "print(rc, os.environ.get('MALLOC_MMAP_MAX_'))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["2", "0"]
