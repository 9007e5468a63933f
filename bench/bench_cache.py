"""Work the demo's training does not redo: what keeping samples across epochs
(``sample_cache_mb``, ``data.loader.SampleCache``), keeping texture targets and not
rendering unused images save.

The demo trains on a 191-clip split for about 67 epochs (decoder) and 8 (voice encoder),
without loader workers. Without the cache every epoch reads each shard again (size and
SHA-256 checked), decodes its JPEGs, landmarks and FLAC, and cuts the audio; with it,
epochs after the first take the decoded samples from memory and only draw the crops,
windows and order (the same draws: the batches are identical, ``tests/test_data.py``).

Measured here on the demo's own shards (``speech2face demo``: 40 speakers, seed 0; quick:
12), one thread as the demo trains: CPU seconds of an epoch of training batches as each
stage reads them (decoder: faces and features, no audio; voice: 3-s windows turned into
spectrograms), with and without the cache, alternating in rounds so the machine's load
falls on both alike. Epochs after the first are compared; the first, which fills the
cache, is reported beside them. The saving over the demo's whole run is that per-epoch
difference times the demo's epochs.

A third row does the same for the face decoder's texture targets
(``train.KeptTargets``): CPU seconds an epoch spends in the decoder stage's
``_targets`` (each face warped to the mean landmarks at 64 pixels), kept after the first
epoch or warped at every step.

A fourth row times a whole decoder training step (tiny decoder, the demo's batch of 8, its
targets kept, Adam) that leaves out the rendered image, as the stage does when no
perceptual term needs it, against the same step rendering it as every step did before.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from speech2face.config import TrainConfig
from speech2face.data import load_manifest, prepare
from speech2face.data.loader import ShardData
from speech2face.demo import DECODER_OVERRIDES, DECODER_STEPS, VOICE_OVERRIDES, VOICE_STEPS
from speech2face.demo_data import make_demo_data

# The demo's batch sizes, which set its epochs (steps * batch / clips).
_BATCH = {"decoder": DECODER_OVERRIDES["batch_size"], "voice": VOICE_OVERRIDES["batch_size"]}
ROUNDS = 3
EPOCHS = 4  # per round and setting; the first fills the cache
STEPS = 60  # decoder steps per round and setting


def _epochs(shards: Path, stage: str, cache_mb: int, epochs: int) -> list[float]:
    """CPU seconds of each of ``epochs`` epochs of ``stage``'s training batches."""
    voice = stage == "voice"
    config = TrainConfig.tiny(stage, sample_cache_mb=cache_mb, batch_size=_BATCH[stage],
                              train_seconds=3.0 if voice else None)
    train = ShardData(shards, "train", config.batch_size, config, spectrogram=voice)
    seconds = []
    for epoch in range(epochs):
        start = time.process_time()
        for _ in train.batches(epoch):
            pass
        seconds.append(time.process_time() - start)
    return seconds


def _target_epochs(shards: Path, keep: bool, epochs: int) -> list[float]:
    """CPU seconds the decoder stage spends on its texture targets in each epoch."""
    from speech2face.train import KeptTargets, decoder_stage

    config = TrainConfig.tiny("decoder", batch_size=_BATCH["decoder"])
    stage = decoder_stage(shards, config)
    stage.kept_targets = KeptTargets((1 << 30) if keep else 0)
    train = ShardData(shards, "train", config.batch_size, config)
    seconds = []
    for epoch in range(epochs):
        spent = 0.0
        for batch in train.batches(epoch):
            start = time.process_time()
            stage._targets(batch)
            spent += time.process_time() - start
        seconds.append(spent)
    return seconds


def _decoder_steps(shards: Path, render: bool, steps: int) -> list[float]:
    """CPU seconds of each of ``steps`` decoder training steps on one demo batch."""
    from speech2face.train import KeptTargets, decoder_stage

    config = TrainConfig.tiny("decoder", batch_size=_BATCH["decoder"])
    stage = decoder_stage(shards, config)
    stage.kept_targets = KeptTargets(1 << 30)
    batch = next(iter(ShardData(shards, "train", config.batch_size, config).batches(0)))
    decoder = stage.trainable
    # The stage renders only for a perceptual term; the reference renders every step.
    forward = (lambda x, **_: decoder(x)) if render else decoder
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr, foreach=True)
    seconds = []
    for _ in range(steps + 2):  # two to warm up (and keep the targets)
        start = time.process_time()
        total, _ = stage.loss(forward, batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        seconds.append(time.process_time() - start)
    return seconds[2:]


def _medians(runs: dict, without: str, kept: str) -> tuple[float, float, float]:
    """Median CPU seconds of the later epochs without and with keeping, and of the first
    epoch with keeping (the one that fills what is kept)."""
    later = (statistics.median(s for r in runs[name] for s in r[1:]) for name in (without, kept))
    return (*later, statistics.median(r[0] for r in runs[kept]))


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_demo_data(tmp / "corpus", speakers=12 if quick else 40, seed=0,
                                progress=False)
        shards = tmp / "shards"
        prepare("voxceleb1", corpus, shards, workers=2, progress=False)
        clips = load_manifest(shards)["splits"]["train"]["samples"]
        runs: dict[str, list[list[float]]] = {}
        rounds, epochs = (1, 2) if quick else (ROUNDS, EPOCHS)
        for _ in range(rounds):
            for stage in ("decoder", "voice"):
                for cache_mb in (0, 1024):
                    runs.setdefault(f"{stage}_{cache_mb}", []).append(
                        _epochs(shards, stage, cache_mb, epochs))
            for keep in (False, True):
                runs.setdefault(f"targets_{keep}", []).append(
                    _target_epochs(shards, keep, epochs))
            for render in (True, False):
                runs.setdefault(f"render_{render}", []).append(
                    _decoder_steps(shards, render, 10 if quick else STEPS))
    rows, details = [], {"runs": runs, "train_clips": clips}
    for stage, steps in (("decoder", DECODER_STEPS), ("voice", VOICE_STEPS)):
        read, kept, first = _medians(runs, f"{stage}_0", f"{stage}_1024")
        demo_epochs = steps * _BATCH[stage] / clips
        saved = demo_epochs * (read - kept)
        details[stage] = {"later_epoch_cpu_s": {"read": read, "kept": kept},
                          "first_epoch_cached_cpu_s": first, "demo_epochs": demo_epochs,
                          "demo_cpu_s_saved": saved}
        what = "faces and features" if stage == "decoder" else "3-s spectrograms"
        rows.append({
            "benchmark": f"loader epoch, demo train split ({clips} clips), {stage} stage "
                         f"({what}), 0 workers, 1 thread: samples kept (sample_cache_mb) vs "
                         f"read from disk every epoch; median of epochs 2-{epochs} over "
                         f"{rounds} alternating rounds (the first epoch, filling the cache: "
                         f"{first:.2f} s); over the demo's {demo_epochs:.0f} epochs "
                         f"{saved:.0f} s of CPU saved",
            "result": f"{kept:.3f} s CPU",
            "reference": f"{read:.3f} s CPU",
            "ratio": f"{read / kept:.1f}x less CPU",
            "target": "",
        })
    warped, kept, first = _medians(runs, "targets_False", "targets_True")
    demo_epochs = DECODER_STEPS * _BATCH["decoder"] / clips
    saved = demo_epochs * (warped - kept)
    details["targets"] = {"later_epoch_cpu_s": {"warped": warped, "kept": kept},
                          "first_epoch_kept_cpu_s": first, "demo_cpu_s_saved": saved}
    rows.append({
        "benchmark": f"decoder stage's texture targets, an epoch of the demo train split "
                     f"({clips} clips), 1 thread: kept per sample (train.KeptTargets) vs "
                     f"warped at every step; median of epochs 2-{epochs} over {rounds} "
                     f"alternating rounds (the first epoch, which warps them all: "
                     f"{first:.2f} s); over the demo's {demo_epochs:.0f} epochs {saved:.0f} s "
                     f"of CPU saved",
        "result": f"{kept:.3f} s CPU",
        "reference": f"{warped:.3f} s CPU",
        "ratio": f"{warped / max(kept, 1e-6):.0f}x less CPU",
        "target": "",
    })
    rendered, bare = (statistics.median(s for r in runs[f"render_{render}"] for s in r)
                      for render in (True, False))
    saved = DECODER_STEPS * (rendered - bare)
    details["render"] = {"step_cpu_s": {"rendered": rendered, "not_rendered": bare},
                         "demo_cpu_s_saved": saved}
    rows.append({
        "benchmark": f"decoder training step, tiny, batch {_BATCH['decoder']}, 1 thread, "
                     f"targets kept: without the rendered image (no perceptual term) vs "
                     f"rendering it at every step; median step over {rounds} alternating "
                     f"rounds; over the demo's {DECODER_STEPS} steps {saved:.0f} s of CPU saved",
        "result": f"{1e3 * bare:.1f} ms CPU",
        "reference": f"{1e3 * rendered:.1f} ms CPU",
        "ratio": f"{rendered / bare:.2f}x less CPU",
        "target": "",
    })
    return {"rows": rows, "details": details}
