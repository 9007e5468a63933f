"""The identity classifier at VoxCeleb2 scale: 200,000 face features of 128 dimensions
(dlib's) in 6,000 identities, fitted and calibrated on this machine.

Rows:
- ``identity classifier fit``: wall and CPU time of
  :func:`speech2face.face_encoders.fit_identity_classifier` with its defaults, against the
  bare arithmetic it cannot avoid (the same number of minibatch matmuls, forward and
  weight gradient, timed alone in this run). Target: a few minutes.
- ``identity classifier peak memory``: the process's peak resident memory after the fit,
  against the features themselves and against one float32 ``(N, K)`` logit matrix (what
  the former full-batch fit held, in float64, several times). Target < 3 GB.
- ``identity classifier calibration``: held-out NLL after the temperature against before.

The features are generated: 6,000 identity centres on the unit sphere, each clip its
centre plus Gaussian noise, scaled like dlib embeddings (norm ~ 0.6, identities ~0.6
apart), 5 % of each identity's clips held out.
"""

from __future__ import annotations

import resource
import time

import torch

N_SAMPLES = 200_000
N_CLASSES = 6_000
DIM = 128


def _features(n: int, k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) * 0.45
    labels = torch.randint(0, k, (n,), generator=g)
    noise = torch.randn(n, d, generator=g) * (0.4 / d**0.5)
    return centres[labels] + noise, labels


def _bare_matmuls(x: torch.Tensor, k: int, epochs: int, batch: int) -> float:
    """Seconds for ``epochs`` passes of ``x_b W^T`` and ``g^T x_b``: the floor of any fit."""
    w = torch.randn(k, x.shape[1])
    start = time.perf_counter()
    for _ in range(epochs):
        for s in range(0, len(x), batch):
            xb = x[s:s + batch]
            z = xb @ w.T
            _ = z.T @ xb
    return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    from speech2face.face_encoders import (
        CLASSIFIER_BATCH,
        CLASSIFIER_EPOCHS,
        fit_identity_classifier,
    )

    n, k = (20_000, 600) if quick else (N_SAMPLES, N_CLASSES)
    x, y = _features(n, k, DIM)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fit = fit_identity_classifier(x, y.numpy(), seed=0, progress=True)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    # One epoch of bare matmuls, scaled: the reference floor (same minibatch size).
    floor = _bare_matmuls(x, k, 1, CLASSIFIER_BATCH) * CLASSIFIER_EPOCHS
    logit_gb = n * k * 4 / 2**30
    rows = [
        {"benchmark": f"identity classifier fit, {n:,} x {DIM} features, {k:,} identities, "
                      f"{CLASSIFIER_EPOCHS} epochs, {torch.get_num_threads()} threads",
         "result": f"{wall:.0f} s wall ({cpu:.0f} s CPU)",
         "reference": f"bare matmuls {floor:.0f} s", "ratio": f"{wall / floor:.2f}",
         "target": "a few minutes"},
        {"benchmark": "identity classifier peak memory (whole process, incl. torch)",
         "result": f"{peak_gb:.2f} GB", "reference": f"one float32 N x K logit matrix "
                                                     f"{logit_gb:.1f} GB",
         "ratio": f"{peak_gb / logit_gb:.2f}", "target": "< 3 GB"},
        {"benchmark": f"identity classifier calibration ({fit.heldout_samples:,} held-out "
                      f"clips, T = {fit.temperature:.2f})",
         "result": f"held-out NLL {fit.heldout_nll:.3f}",
         "reference": f"uncalibrated {fit.heldout_nll_uncalibrated:.3f}",
         "ratio": f"{fit.heldout_nll / fit.heldout_nll_uncalibrated:.3f}",
         "target": "<= 1 (calibration never hurts)"},
    ]
    details = {"n": n, "classes": k, "dim": DIM, "wall_s": wall, "cpu_s": cpu,
               "peak_rss_gb": peak_gb, "bare_matmul_s": floor,
               "temperature": fit.temperature, "heldout_accuracy": fit.heldout_accuracy,
               "train_accuracy": fit.train_accuracy, "heldout_nll": fit.heldout_nll,
               "heldout_nll_uncalibrated": fit.heldout_nll_uncalibrated}
    return {"rows": rows, "details": details}
