"""runtime: freed memory is reused without page faults; threads sleep; nothing on import.

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
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)],
                         env=clean_environment(**env), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_default_glibc_refaults_and_tuned_reuses():
    default = probe("TUNED = None")
    assert default["faults_per_array"] > 0.9 * PAGES  # the behaviour being fixed
    tuned = probe("from speech2face.runtime import tune_allocator\nTUNED = tune_allocator()")
    assert tuned["tuned"] is True
    assert tuned["faults_per_array"] < 0.01 * PAGES
    assert tuned["env"] == "0"  # child processes (loader workers) get the same settings


def test_import_changes_nothing():
    result = probe("import speech2face, speech2face.audio, speech2face.cli\nTUNED = None\n"
                   "assert 'OMP_WAIT_POLICY' not in os.environ")
    assert result["faults_per_array"] > 0.9 * PAGES
    assert result["env"] is None


def test_user_settings_are_respected():
    result = probe("from speech2face.runtime import tune_allocator\nTUNED = tune_allocator()",
                   MALLOC_ARENA_MAX="2")
    assert result["tuned"] is False
    assert result["faults_per_array"] > 0.9 * PAGES


def test_child_inheriting_our_settings_counts_as_tuned():
    result = probe("from speech2face.runtime import tune_allocator\nTUNED = tune_allocator()",
                   MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    assert result["tuned"] is True
    assert result["faults_per_array"] < 0.01 * PAGES


def test_every_command_tunes_the_allocator(tmp_path):
    # The thread policy must be in the environment before torch (and OpenMP) loads.
    code = ("import os, sys, speech2face.cli as c\n"
            "import speech2face.runtime as r\n"
            "seen = []\n"
            "real = r.setup_process\n"
            "r.setup_process = lambda: (seen.append('torch' in sys.modules), real())\n"
            "c.setup_process = r.setup_process\n"
            f"rc = c.main(['spectrogram', {str(tmp_path / 'missing.wav')!r}, '-o', "
            f"{str(tmp_path / 'out')!r}])\n"
            "print(rc, os.environ.get('MALLOC_MMAP_MAX_'), os.environ.get('OMP_WAIT_POLICY'),"
            " seen)")
    out = subprocess.run([sys.executable, "-c", code], env=clean_environment(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "0", "PASSIVE", "[False]"]


def clean_environment(**env: str) -> dict:
    drop = ("MALLOC_", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, **env}


def test_passive_threads_only_before_torch_and_unless_chosen():
    code = ("import os, sys\n"
            "from speech2face.runtime import passive_threads\n"
            "{}\n"
            "print(passive_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    def run(setup: str, **env: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code.format(setup)],
                             env=clean_environment(**env), capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    assert run("") == ["True", "PASSIVE"]
    assert run("import torch") == ["False", "None"]  # too late: OpenMP has read it
    assert run("", OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE"]
    assert run("import speech2face, speech2face.cli") == ["True", "PASSIVE"]


def test_torch_threads_sets_and_restores_the_count_even_on_error():
    import torch

    from speech2face.runtime import torch_threads

    before = torch.get_num_threads()
    other = before + 1  # (the tests run on one thread: setting 1 would test nothing)
    with pytest.raises(RuntimeError), torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
