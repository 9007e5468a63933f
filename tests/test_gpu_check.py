"""The GPU check (bench/bench_gpu.py, `make gpu-check`): where there is no GPU it stops at
once with one line; its training checks run end to end on CPU (float32 and bf16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_cuda_it_fails_with_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "bench", "gpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]


def test_precision_check_runs_both_stages_on_cpu():
    sys.path.insert(0, str(REPO))
    from bench.bench_gpu import precision_check

    rows = precision_check("cpu", steps=2, amps=("none", "bf16"), batch_size=2)
    assert [r["benchmark"].split()[0] for r in rows] == ["decoder", "voice"]
    for row in rows:
        assert len(row["curve"]) == len(row["reference_curve"]) == 1
        assert row["ok"], row


def test_precision_check_runs_deterministic_in_a_worker_process_on_cpu():
    """The GPU check runs its precision comparison in a process of its own (the
    deterministic settings are process-wide); the plumbing works on CPU too."""
    sys.path.insert(0, str(REPO))
    from bench.bench_gpu import in_worker

    rows = in_worker("precision", steps=2, device="cpu", amps=["none", "bf16"], batch_size=2)
    assert [r["benchmark"] for r in rows] == [
        "decoder stage, 2 steps, bf16 autocast vs float32, deterministic",
        "voice stage, 2 steps, bf16 autocast vs float32, deterministic"]
    assert all(r["ok"] and len(r["curve"]) == 1 for r in rows), rows


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # an SXM H100's own name: "peak unknown" before
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA L40", 181.0),  # was the L4's 121: an L40 run could print > 100 %
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10G", 70.0), ("Tesla T4", None),
])
def test_datasheet_peak_takes_the_most_specific_name(name, peak):
    from bench.bench_gpu import datasheet_peak

    assert datasheet_peak(name) == peak


def test_bench_runs_every_benchmark_named_and_says_which_failed(tmp_path):
    """One failing benchmark (gpu, here without CUDA) stopped the others with a
    CalledProcessError traceback."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu benchmark would run")
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "gpu", "identities"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "python -m bench: error: failed: gpu (exit 2)" in result.stderr
    assert "== identities" in result.stdout and "quick run: not recorded" in result.stdout
