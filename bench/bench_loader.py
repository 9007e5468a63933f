"""The shard loader against training: can it feed the voice stage?

The loader (``speech2face.data.make_loader``: tar reading, FLAC and JPEG decoding,
``fit_duration``, batching and on-the-fly spectrograms, batch 8) with 0, 1 and 2
DataLoader workers, in samples/s, against the training step's consumption rate at paper
size: one forward and backward pass of ``VoiceEncoder(VoiceEncoderConfig.paper(
output_dim=128))`` at batch 8 (quick: batch 2), measured in the same run on the same CPU.

The shards are the demo corpus's (``make-demo-data --speakers 40 --seed 0``; quick: 12)
prepared with 16 samples a shard, so that each of 2 workers has shards to read: the loader
splits a split by shard, and at prepare's default of 1000 samples a shard the demo's
training split is one shard, which one worker reads while the other idles (this
benchmark's first version measured exactly that, and reported 0 and 2 workers alike).
The settings run in alternating rounds; each rate is the median over rounds, the first
batch of each epoch (workers starting) left out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import load_average
from speech2face.data import load_manifest, make_loader, prepare
from speech2face.demo_data import make_demo_data

WORKERS = (0, 1, 2)
ROUNDS = 3
SAMPLES_PER_SHARD = 16


def _loader_rate(shards: Path, workers: int, samples: int) -> float:
    """Samples/s of the training split's batches, after the first."""
    loader = make_loader(shards, "train", batch_size=8, num_workers=workers, shuffle=16,
                         spectrogram=True, repeat=True)
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
    details = {"load_average_at_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_demo_data(tmp / "corpus", speakers=12 if quick else 40, seed=0,
                                progress=False)
        shards = tmp / "shards"
        prepare("voxceleb1", corpus, shards, samples_per_shard=SAMPLES_PER_SHARD, workers=2,
                progress=False)
        train = load_manifest(shards)["splits"]["train"]
        details["train_split"] = {"samples": train["samples"], "shards": len(train["shards"])}
        samples = 64 if quick else 256
        rates: dict[int, list[float]] = {w: [] for w in WORKERS}
        for round_ in range(ROUNDS):
            order = WORKERS if round_ % 2 == 0 else WORKERS[::-1]
            for workers in order:
                rates[workers].append(_loader_rate(shards, workers, samples))
    median = {w: statistics.median(r) for w, r in rates.items()}
    details["loader"] = {"samples_per_s": median, "per_round": rates, "batch_size": 8,
                         "spectrogram": True, "samples_per_shard": SAMPLES_PER_SHARD}
    batch = 2 if quick else 8
    train_rate, step_s = _training_rate(batch)
    details["training"] = {
        "model": "VoiceEncoder(VoiceEncoderConfig.paper(output_dim=128))",
        "batch_size": batch,
        "seconds_per_step": step_s,
        "samples_per_s": train_rate,
        "threads": torch.get_num_threads(),
    }
    rows = []
    split = details["train_split"]
    for w in WORKERS:
        rows.append({
            "benchmark": f"loader, spectrograms on the fly, {w} workers, demo train split "
                         f"({split['samples']} clips in {split['shards']} shards), median of "
                         f"{ROUNDS} rounds, vs paper voice encoder fwd+bwd batch {batch} (CPU)",
            "result": f"{median[w]:.1f} samples/s",
            "reference": f"training consumes {train_rate:.2f} samples/s",
            "ratio": f"{median[w] / train_rate:.0f}x",
            "target": ">= 1x (loader never the bottleneck)",
        })
    details["load_average_at_end"] = load_average()
    return {"rows": rows, "details": details}
