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

    rows = precision_check("cpu", steps=2, amps=("none", "bf16"))
    assert [r["benchmark"].split()[0] for r in rows] == ["decoder", "voice"]
    for row in rows:
        assert len(row["curve"]) == len(row["reference_curve"]) == 1
        assert row["ok"], row


def test_precision_check_runs_deterministic_in_a_worker_process_on_cpu():
    """The GPU check runs its precision comparison in a process of its own (the
    deterministic settings are process-wide); the plumbing works on CPU too."""
    sys.path.insert(0, str(REPO))
    from bench.bench_gpu import in_worker

    rows = in_worker("precision", steps=2, device="cpu", amps=["none", "bf16"])
    assert [r["benchmark"] for r in rows] == [
        "decoder stage, 2 steps, bf16 autocast vs float32, deterministic",
        "voice stage, 2 steps, bf16 autocast vs float32, deterministic"]
    assert all(r["ok"] and len(r["curve"]) == 1 for r in rows), rows
