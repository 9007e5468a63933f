"""Paper-size voice encoder forward on CPU (batch 4): achieved GFLOP/s against the same
run's float32 matrix multiply and against the machine's peak, on 1 thread and on all.

The FLOP count is checked against ``torch.utils.flop_counter`` and every rate against the
peak from the CPU's own report (:mod:`bench.common`): a rate above it stops the benchmark.
"""

from __future__ import annotations

import time

import torch

from bench.common import check_below_peak, peak
from speech2face.voice_encoder import KERNEL, POOL, VoiceEncoder, VoiceEncoderConfig


def forward_flops(config: VoiceEncoderConfig, n_frames: int = 598) -> int:
    """Multiply-adds x 2 of one clip's forward pass (convolutions and FC layers)."""
    flops, c_in, t, f = 0, 2, n_frames, config.n_freq
    for item in config.layers:
        if item == POOL:
            t //= 2
            continue
        c_out, stride = item
        t, f = (t - KERNEL) // stride + 1, (f - KERNEL) // stride + 1
        flops += 2 * c_in * c_out * KERNEL * KERNEL * t * f
        c_in = c_out
    return flops + 2 * (config.flat_dim * config.fc_dim + config.fc_dim * config.output_dim)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn`` after one warm-up call (oneDNN set-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def run(quick: bool = False) -> dict:
    config = VoiceEncoderConfig.paper()
    model = VoiceEncoder(config).eval()
    # Batch 4: a paper-size forward of 4 clips is ~0.7 TFLOP, tens of seconds of CPU; on a
    # shared 2-core machine batch 8 with 3 repeats on 1 and 2 threads takes half an hour.
    batch = 2 if quick else 4
    repeats = 1 if quick else 2
    x = torch.randn(batch, 2, 598, 257)
    flops = forward_flops(config) * batch
    with torch.inference_mode():
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model(x[:1])
    counted = counter.get_total_flops()
    if abs(counted - flops / batch) > 0.01 * counted:
        raise RuntimeError(f"FLOP count {flops / batch:.4g} disagrees with torch's {counted:.4g}")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    rows, details = [], {"gflop_per_clip": flops / batch / 1e9}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        limit = peak(threads)
        mm_wall, mm_cpu = timed(lambda: a @ b, 5)
        with torch.inference_mode():
            wall, cpu = timed(lambda: model(x), repeats)
        # Two rates: per second of wall time (against the peak of the cores used) and per
        # CPU-second (against one core's peak), which the other jobs on a shared machine
        # disturb far less. A rate above either peak stops the benchmark.
        rate, rate_cpu = flops / wall / 1e9, flops / cpu / 1e9
        mm, mm_per_cpu = 2 * n**3 / mm_wall / 1e9, 2 * n**3 / mm_cpu / 1e9
        of_peak = check_below_peak(rate, "voice encoder forward", threads)
        of_core = check_below_peak(rate_cpu, "voice encoder forward per CPU-second", 1)
        mm_of_peak = check_below_peak(mm, "float32 matmul", threads)
        mm_of_core = check_below_peak(mm_per_cpu, "float32 matmul per CPU-second", 1)
        details[f"{threads}_threads"] = {
            "forward_wall_s": wall, "forward_cpu_s": cpu, "gflops_wall": rate,
            "gflops_per_cpu_second": rate_cpu, "matmul_gflops_wall": mm,
            "matmul_gflops_per_cpu_second": mm_per_cpu, "peak": limit.describe()}
        rows.append({
            "benchmark": f"paper voice encoder forward, batch {batch}, {threads} thread"
                         f"{'s' * (threads > 1)} ({wall:.2f} s wall, {cpu:.2f} s CPU)",
            "result": f"{rate:.0f} GFLOP/s = {of_peak:.0%} of {limit.gflops:.0f} peak; per "
                      f"CPU-second {rate_cpu:.0f} = {of_core:.0%} of one core's peak",
            "reference": f"2048^3 matmul {mm:.0f} GFLOP/s = {mm_of_peak:.0%}; per CPU-second "
                         f"{mm_per_cpu:.0f} = {mm_of_core:.0%}",
            "ratio": f"{rate / mm:.2f} of matmul (wall), {rate_cpu / mm_per_cpu:.2f} (CPU)",
            "target": ">= 0.5 of matmul"})
    return {"rows": rows, "details": details}
