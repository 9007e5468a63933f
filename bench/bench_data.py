"""Data pipeline throughput: ``prepare`` with 1 and 2 workers, and the loader against training.

1. ``prepare voxceleb1`` on two generated demo corpora (3 face frames and 3 clips per
   video; 2 speakers and ``speakers``), each with ``workers=1`` and ``workers=2``. The
   difference of the two corpora's times cancels the fixed start-up cost (dlib models;
   for 2 workers, two spawned processes importing torch), which a dataset-sized run
   amortises: clips/s in steady state and the 2-vs-1 scaling ratio (raw rates in the
   details). The shards of 1 and 2 workers are also checked to be identical.
2. The loader (``ShardDataset``: tar reading, FLAC and JPEG decoding, ``fit_duration``,
   batching and on-the-fly spectrograms, batch 8) with 0 and 2 DataLoader workers, in
   samples/s, against the training step's consumption rate at paper size: one forward
   and backward pass of ``VoiceEncoder(VoiceEncoderConfig.paper(output_dim=128))`` at
   batch 8 (quick: batch 2), measured in the same run on the same CPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from speech2face import data
from speech2face.demo_data import make_demo_data


def _loader_rate(out: Path, workers: int, samples: int) -> float:
    loader = data.make_loader(
        out, "train", batch_size=8, num_workers=workers, shuffle=16, spectrogram=True, repeat=True
    )
    seen, start = 0, None
    for batch in loader:
        if start is None:  # the first batch pays for worker start-up
            start = time.perf_counter()
            continue
        seen += batch["spectrogram"].shape[0]
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def _training_rate(batch_size: int) -> tuple[float, float]:
    """Samples/s of a paper-size voice encoder forward + backward; and seconds per step."""
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    model = VoiceEncoder(VoiceEncoderConfig.paper(output_dim=128))
    model.train()
    x = torch.randn(batch_size, 2, 598, 257)
    model(x[:1]).sum().backward()  # warm-up: allocator, kernels
    model.zero_grad()
    start = time.perf_counter()
    model(x).square().mean().backward()
    seconds = time.perf_counter() - start
    return batch_size / seconds, seconds


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)
    speakers = 8 if quick else 16
    # Other processes' load (1-minute average) bounds what a second worker can gain.
    rows, details = [], {"load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A large and a small corpus: the difference of their prepare times cancels the
        # fixed start-up cost (spawning workers, loading dlib's models), leaving the
        # steady-state rate that matters for a dataset-sized run.
        sizes = {"large": speakers, "small": 2}
        corpora = {
            name: make_demo_data(
                tmp / name,
                speakers=n,
                seed=0,
                videos=(2, 2),
                clips=(3, 3),
                frames=3,
                progress=False,
            )
            for name, n in sizes.items()
        }
        clips = {name: n * 2 * 3 for name, n in sizes.items()}
        seconds, cpu_seconds = {}, {}
        for workers in (1, 2):
            for name, corpus in corpora.items():
                cpu = cpu_seconds()
                start = time.perf_counter()
                data.prepare(
                    "voxceleb1",
                    corpus,
                    tmp / f"shards-{name}-{workers}",
                    workers=workers,
                    samples_per_shard=16,
                    progress=False,
                )
                seconds[(name, workers)] = time.perf_counter() - start
                cpu_seconds[(name, workers)] = cpu_seconds() - cpu
        steady = {
            w: (clips["large"] - clips["small"]) / (seconds[("large", w)] - seconds[("small", w)])
            for w in (1, 2)
        }
        raw = {w: clips["large"] / seconds[("large", w)] for w in (1, 2)}
        one, two = (sorted((tmp / f"shards-large-{w}").glob("*/*.tar")) for w in (1, 2))
        same = bool(one) and [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
        details["prepare"] = {
            "clips": clips,
            "frames_per_video": 3,
            "seconds": {f"{k[0]}-{k[1]}w": v for k, v in seconds.items()},
            # CPU time of this process and its (joined) workers: equal CPU cost per clip
            # with 1 and 2 workers means the pool adds no overhead, and the wall-clock
            # scaling is bounded by the free cores of the machine.
            "cpu_seconds": {f"{k[0]}-{k[1]}w": v for k, v in cpu_seconds.items()},
            "steady_clips_per_s": steady,
            "raw_clips_per_s": raw,
            "identical_shards_1_vs_2_workers": same,
        }
        rows.append(
            {
                "benchmark": "prepare voxceleb1 (demo corpus, steady state), 2 workers vs 1",
                "result": f"{steady[2]:.1f} clips/s",
                "reference": f"1 worker {steady[1]:.1f} clips/s",
                "ratio": f"{steady[2] / steady[1]:.2f}x",
                "target": ">= 1.6x on 2 free cores",
            }
        )
        shards = tmp / "shards-large-1"
        loader = {w: _loader_rate(shards, w, 64 if quick else 256) for w in (0, 2)}
        batch = 2 if quick else 8
        train_rate, step_s = _training_rate(batch)
        details["loader"] = {"samples_per_s": loader, "batch_size": 8, "spectrogram": True}
        details["training"] = {
            "model": "VoiceEncoder(VoiceEncoderConfig.paper(output_dim=128))",
            "batch_size": batch,
            "seconds_per_step": step_s,
            "samples_per_s": train_rate,
            "threads": torch.get_num_threads(),
        }
        for w in (0, 2):
            rows.append(
                {
                    "benchmark": f"loader, spectrograms on the fly, {w} workers, vs paper "
                    f"voice encoder fwd+bwd batch {batch} (CPU)",
                    "result": f"{loader[w]:.1f} samples/s",
                    "reference": f"training consumes {train_rate:.2f} samples/s",
                    "ratio": f"{loader[w] / train_rate:.0f}x",
                    "target": ">= 1x (loader never the bottleneck)",
                }
            )
    details["load_average_at_end"] = os.getloadavg()[0]
    return {"rows": rows, "details": details}
