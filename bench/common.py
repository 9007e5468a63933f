"""What every benchmark shares: the machine's peak, wall and CPU clocks, the seed's path.

A figure a benchmark prints must be possible: :func:`peak_gflops` is the machine's
single-precision peak from the CPU's own report, and :func:`check_below_peak` stops a
benchmark whose measured rate is above it (that is a bug in the benchmark, not a result).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Fused multiply-add units per core. Every x86 core made so far has at most two for its
# widest vectors (Intel Xeon Gold/Platinum, AMD Zen); two is an upper bound, so the peak
# is never under-estimated and an efficiency against it never flattered.
FMA_UNITS_PER_CORE = 2
# float32 lanes of the widest FMA the flags announce.
_LANES = (("avx512f", 16), ("fma", 8))
# AMD cores whose FMA units are narrower than the widest vectors they take: Zen and Zen+
# (family 0x17 below model 0x30) split a 256-bit FMA into two 128-bit halves, and Zen 4
# (family 0x19, the first with AVX-512) a 512-bit one into two 256-bit halves (Zen 3,
# the same family, has no AVX-512). Their peak is half of what the flags suggest.
_DATAPATH_LANES = ((0x17, range(0x00, 0x30), 4), (0x19, range(0x00, 0x100), 8))


def fma_lanes(cpu: dict[str, str]) -> int:
    """float32 lanes one FMA unit of ``cpu`` (a /proc/cpuinfo block) does per cycle."""
    flags = set(cpu.get("flags", "").split())
    lanes = next((n for flag, n in _LANES if flag in flags), 4)  # SSE: 4 lanes, mul + add
    if cpu.get("vendor_id") == "AuthenticAMD":
        family, model = int(cpu.get("cpu family", 0)), int(cpu.get("model", 0))
        for f, models, width in _DATAPATH_LANES:
            if family == f and model in models:
                lanes = min(lanes, width)
    return lanes


def _cpuinfo() -> list[dict[str, str]]:
    blocks, block = [], {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            if block:
                blocks.append(block)
            block = {}
            continue
        key, _, value = line.partition(":")
        block[key.strip()] = value.strip()
    if block:
        blocks.append(block)
    return blocks


# x86-64 code of ``int64 f(int64 n)``: n times a chain of 24 dependent ``add rax, rax``.
# Each add waits for the one before (one cycle on every x86-64 core; not ``add rax, 1``,
# which newer Intel cores fold away when renaming); the loop's own ``dec``/``jnz`` run
# beside the chain, so an iteration takes 24 cycles.
_CHAIN = 24


def chain_code(step: str, start: str = "31c0") -> bytes:
    """x86-64 code of ``int64 f(int64 n)``: ``start``, then n times 24 copies of ``step``
    (hex machine code; ``start`` defaults to ``xor eax, eax``)."""
    body = bytes.fromhex(step) * _CHAIN
    jump = -(len(body) + 5)  # back over the body, dec rcx and jnz itself
    return (bytes.fromhex("4889f9" + start) + body  # mov rcx, rdi
            + bytes.fromhex("48ffc975") + jump.to_bytes(1, "little", signed=True)  # dec; jnz
            + bytes.fromhex("c3"))  # ret


_CLOCK_CODE = chain_code("4801c0")  # add rax, rax


def measured_mhz(iterations: int = 400_000, trials: int = 15) -> float | None:
    """The clock a busy core of this machine runs at, timed (None where it cannot be).

    A virtual machine often reports only its nominal clock, which turbo exceeds: an Intel
    Xeon reporting 2.6 GHz ran a float32 matmul at 177 GFLOP/s on one core, above the
    166 that 2.6 GHz allows. The fastest of a few runs of a chain of dependent adds gives
    the clock itself (a run interrupted by another process only looks slower).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        code = mmap.mmap(-1, len(_CLOCK_CODE),
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):  # a system that forbids executable memory
        return None
    code.write(_CLOCK_CODE)
    chain = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(
        ctypes.addressof(ctypes.c_char.from_buffer(code)))
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        chain(iterations)
        best = min(best, time.perf_counter() - start)
    del chain
    return iterations * _CHAIN / best / 1e6


@functools.cache
def _timed_mhz() -> float | None:
    """:func:`measured_mhz`, once per process: every peak a run prints or checks against
    uses the same clock."""
    return measured_mhz()


def _max_mhz(cpus: list[dict[str, str]]) -> tuple[float, str]:
    """The highest clock of the CPU's own report and of :func:`measured_mhz`, and its source."""
    reported, source = _reported_mhz(cpus)
    measured = _timed_mhz()
    if measured is not None and measured > reported:
        return measured, f"timed, above the {reported:.0f} MHz of {source}"
    return reported, source


def _reported_mhz(cpus: list[dict[str, str]]) -> tuple[float, str]:
    """The highest clock the CPU reports, and where it came from."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.M)
        if match:
            return float(match.group(1)), "lscpu 'CPU max MHz'"
    except (OSError, subprocess.SubprocessError):
        pass
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if freq.exists():
        return int(freq.read_text()) / 1000, str(freq)
    # A virtual machine often reports only the nominal clock; take the larger of that
    # and the one in the model name.
    mhz = max(float(c.get("cpu MHz", 0)) for c in cpus)
    named = re.search(r"@\s*([\d.]+)\s*GHz", cpus[0].get("model name", ""))
    if named and 1000 * float(named.group(1)) > mhz:
        return 1000 * float(named.group(1)), "/proc/cpuinfo model name"
    return mhz, "/proc/cpuinfo 'cpu MHz' (no max clock reported: nominal clock)"


@dataclass(frozen=True)
class Peak:
    cores: int
    lanes: int
    mhz: float
    clock_source: str
    model: str

    @property
    def gflops(self) -> float:
        """cores x FMA units x float32 lanes x 2 flops (multiply and add) x clock."""
        return self.cores * FMA_UNITS_PER_CORE * self.lanes * 2 * self.mhz / 1000

    def describe(self) -> str:
        return (f"{self.model}: {self.cores} cores x {FMA_UNITS_PER_CORE} FMA x "
                f"{self.lanes} float32 lanes x 2 x {self.mhz / 1000:.2f} GHz "
                f"({self.clock_source}) = {self.gflops:.0f} GFLOP/s")


def peak(threads: int | None = None) -> Peak:
    """float32 peak of the cores this process may use (of ``threads`` of them if given).

    Linux only (reads /proc/cpuinfo and lscpu).
    """
    cpus = _cpuinfo()
    lanes = fma_lanes(cpus[0])
    usable = len(os.sched_getaffinity(0))
    physical = len({(c.get("physical id"), c.get("core id")) for c in cpus}) or usable
    cores = min(usable, physical, threads or usable)
    mhz, source = _max_mhz(cpus)
    return Peak(cores, lanes, mhz, source, cpus[0].get("model name", "unknown CPU"))


def check_below_peak(gflops: float, what: str, threads: int) -> float:
    """``gflops / peak``; raises if the measured rate is above the hardware's peak."""
    limit = peak(threads)
    if gflops > limit.gflops:
        raise RuntimeError(
            f"benchmark bug: {what} measured {gflops:.1f} GFLOP/s, above this machine's "
            f"peak {limit.describe()}"
        )
    return gflops / limit.gflops


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Clock:
    """Wall and CPU seconds (this process and its finished children) of a ``with`` block."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = cpu_seconds() - self._cpu


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished, waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def round_ratios(slow: list[float], fast: list[float]) -> tuple[float, str]:
    """The median over rounds of each round's ``slow / fast``, and a text naming it with
    every round's ratio: the host's speed drifts between rounds more than within one, so
    a ratio is taken within a round (docs/benchmarks.md)."""
    ratios = [a / b for a, b in zip(slow, fast, strict=True)]
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    return statistics.median(ratios), f"median of {len(ratios)} rounds' ratios ({rounds})"


def load_by_path(file: str) -> str:
    """Python statements that load the bench file ``file`` by its path as the module
    ``b`` (not as ``bench.<name>``, so that a ``PYTHONPATH`` of another checkout's
    ``speech2face`` comes first), for ``python -c``."""
    return ("import importlib.util; "
            f"spec = importlib.util.spec_from_file_location('child', {str(file)!r}); "
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); ")


def in_fresh_process(file: str, function: str, args: tuple, env: dict[str, str],
                     cwd: Path | None = None) -> dict:
    """``function(*args)`` of the bench file ``file`` in a fresh Python process, with the
    environment ``env``, run from ``cwd`` (default: this checkout); returns what it
    returned, through JSON. The file is loaded by its path, not as ``bench.<name>``, so
    that a ``PYTHONPATH`` in ``env`` (an older ``speech2face``) comes first."""
    code = f"import json; {load_by_path(file)}print(json.dumps(b.{function}(*{tuple(args)!r})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=cwd or Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_ms(fn, repeats: int) -> dict:
    """Median wall and CPU milliseconds of ``fn`` (after one warm-up call), and minima.

    common.py needs only numpy and the standard library, so tf_warp_worker.py imports
    it inside TensorFlow's own venv."""
    fn()  # warm-up: tracing for tf.function, kernel set-up for eager and for ours
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), cpu_seconds()
        fn()
        wall.append(1000 * (time.perf_counter() - w))
        cpu.append(1000 * (cpu_seconds() - c))
    return {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu),
            "wall_ms_min": min(wall), "cpu_ms_min": min(cpu)}


# --------------------------------------------------------------- the seed's audio path

SEED_SECONDS = 5.98  # the seed's librosa.load(..., duration=5.98)


def seed_spectrogram(path) -> np.ndarray:
    """The seed's path: ``librosa.load(path, sr=16000, duration=5.98)`` (decodes only what
    it keeps), repeated to 6 s, ``librosa.stft`` (512, hop 160, window 400), power law."""
    import librosa

    wave, _ = librosa.load(path, sr=16000, duration=SEED_SECONDS)
    wave = np.tile(wave, -(-96000 // len(wave)))[:96000]
    spec = librosa.stft(wave, n_fft=512, hop_length=160, win_length=400)
    return np.stack([np.sign(p) * np.abs(p) ** 0.3 for p in (spec.real, spec.imag)])
