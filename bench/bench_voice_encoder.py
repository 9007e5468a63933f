"""Paper-size voice encoder forward on CPU (batch 8): achieved GFLOP/s against a float32
matrix multiply's GFLOP/s measured in the same run, with the same threads."""

from __future__ import annotations

import time

import torch

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


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(quick: bool = False) -> dict:
    config = VoiceEncoderConfig.paper()
    model = VoiceEncoder(config).eval()
    batch = 2 if quick else 8
    repeats = 1 if quick else 3
    x = torch.randn(batch, 2, 598, 257)
    flops = forward_flops(config) * batch
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n**3 / best_seconds(lambda: a @ b, 5) / 1e9
    results = {}
    with torch.inference_mode():
        # The model converts its input to channels-last; "NCHW" runs its layers directly
        # on a contiguous tensor, to show what that choice is worth.
        nchw = lambda: model.fc(model.pool_norm(model.features(x).mean(2).relu()).flatten(1))  # noqa: E731
        results["NCHW"] = flops / best_seconds(nchw, repeats) / 1e9
        results["channels_last"] = flops / best_seconds(lambda: model(x), repeats) / 1e9
    matmul_after = 2 * n**3 / best_seconds(lambda: a @ b, 5) / 1e9
    matmul = max(matmul, matmul_after)
    best = max(results, key=results.get)
    return {
        "rows": [
            {
                "benchmark": f"paper voice encoder forward, batch {batch}, CPU "
                f"({torch.get_num_threads()} threads, {best})",
                "result": f"{results[best]:.1f} GFLOP/s",
                "reference": f"fp32 matmul {matmul:.1f} GFLOP/s",
                "ratio": f"{results[best] / matmul:.0%}",
                "target": ">= 50%",
            }
        ],
        "details": {
            "gflop_per_clip": forward_flops(config) / 1e9,
            "layouts_gflops": results,
            "matmul_gflops": matmul,
        },
    }
