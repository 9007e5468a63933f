"""The benchmarks' peak: the clock it uses must be one the cores can reach, not less."""

from __future__ import annotations

import platform

import pytest

from bench import common

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the clock is timed with x86-64 code")


@x86_only
def test_timed_clock_agrees_with_a_chain_of_multiplies(monkeypatch):
    # An independent reference: integer multiplies take three cycles each on every
    # x86-64 core since 2006, so a chain of them, timed the same way, gives the clock at
    # a third of the adds' rate.
    # Each is the fastest run of its chain (a run another process interrupts only looks
    # slower), compared round by round and the median ratio taken: a busy spell of the
    # machine or a change of its clock falls on one round.
    import statistics

    add_code = common._CLOCK_CODE
    multiply_code = common.chain_code("480fafc0", "b803000000")  # imul rax, rax; rax = 3
    ratios, best = [], 0.0
    for _ in range(7):
        monkeypatch.setattr(common, "_CLOCK_CODE", add_code)
        adds = common.measured_mhz(trials=5)
        monkeypatch.setattr(common, "_CLOCK_CODE", multiply_code)
        # a third of the iterations: both chains run equally long, as likely to fit
        # between two of another process's time slices (3x longer, the multiplies were
        # the slower to find one beside two busy processes: 2,172 against 4,504 MHz)
        multiplies = 3 * common.measured_mhz(iterations=400_000 // 3, trials=5)
        ratios.append(adds / multiplies)
        best = max(best, adds)
    assert 500 < best < 7000
    assert statistics.median(ratios) == pytest.approx(1.0, rel=0.15), ratios


@x86_only
def test_peak_takes_the_timed_clock_where_the_report_is_lower(monkeypatch):
    monkeypatch.setattr(common, "_reported_mhz", lambda cpus: (1000.0, "nominal"))
    monkeypatch.setattr(common, "_timed_mhz", lambda: 3500.0)
    limit = common.peak(1)
    assert limit.mhz == 3500.0 and "above the 1000 MHz of nominal" in limit.clock_source
    monkeypatch.setattr(common, "_reported_mhz", lambda cpus: (4000.0, "lscpu"))
    assert common.peak(1).mhz == 4000.0


def test_a_rate_above_the_peak_is_refused(monkeypatch):
    monkeypatch.setattr(common, "_reported_mhz", lambda cpus: (2000.0, "nominal"))
    monkeypatch.setattr(common, "_timed_mhz", lambda: None)
    limit = common.peak(1)
    assert common.check_below_peak(limit.gflops / 2, "half", 1) == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="benchmark bug: twice"):
        common.check_below_peak(2 * limit.gflops, "twice", 1)


@pytest.mark.parametrize("vendor, family, model, flags, lanes", [
    ("AuthenticAMD", 23, 1, "avx2 fma", 4),  # Zen 1: 128-bit FMA units
    ("AuthenticAMD", 23, 8, "avx2 fma", 4),  # Zen+
    ("AuthenticAMD", 23, 49, "avx2 fma", 8),  # Zen 2: 256-bit
    ("AuthenticAMD", 25, 1, "avx2 fma", 8),  # Zen 3
    ("AuthenticAMD", 25, 17, "avx2 fma avx512f", 8),  # Zen 4: AVX-512 in two halves
    ("AuthenticAMD", 26, 2, "avx2 fma avx512f", 16),  # Zen 5: 512-bit
    ("GenuineIntel", 6, 143, "avx2 fma avx512f", 16),  # Sapphire Rapids
    ("GenuineIntel", 6, 42, "avx", 4),  # Sandy Bridge: no FMA
])
def test_fma_lanes_follow_the_cores_datapath_not_only_its_flags(vendor, family, model, flags,
                                                                lanes):
    cpu = {"vendor_id": vendor, "cpu family": str(family), "model": str(model), "flags": flags}
    assert common.fma_lanes(cpu) == lanes


def test_prepare_startup_parts_from_a_timeline():
    """bench_startup's arithmetic on a made-up timeline, worked out by hand: the command
    started 0.05 s before its clock, the child loaded dlib's models at 0.2-0.8 s (beside
    the command's import of the shard writer, 0.2-1.3 s), the last unit ended at 5.9 s
    of a 6.0-s run; so 0.25 + 0.05 = 0.3 s serial, and 11 s on one worker halved but
    for that: 11 / (0.3 + 10.7 / 2) = 1.9469x."""
    from bench.bench_startup import _parts

    two = {"wall_s": 6.0, "processes": {
        "main": {"age_at_start": 0.05, "writer import": [0.2, 1.3], "first": None,
                 "last": None, "busy": 0.0},
        "child": {"models": [0.2, 0.8], "first": 0.85, "last": 5.9, "busy": 4.545},
        "pool": {"first": 0.85, "last": 5.85, "busy": 4.75}}}
    parts = _parts(two, {"wall_s": 11.0})
    assert parts["before_models_s"] == pytest.approx(0.25)
    assert parts["models_s"] == pytest.approx(0.6)
    assert parts["tail_s"] == pytest.approx(0.05)
    assert parts["serial_s"] == pytest.approx(0.3)
    assert parts["ceiling"] == pytest.approx(1.9469, abs=1e-4)
    assert parts["ratio"] == pytest.approx(11 / 6)
    assert parts["child_busy"] == pytest.approx(0.9) and parts["pool_busy"] == pytest.approx(0.95)
    assert parts["writer_import_s"] == pytest.approx(1.1)
