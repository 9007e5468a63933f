"""AVSpeech identity merging at scale: clustering videos by face before the split.

Rows (CPU time, one thread; the same generated features for both sides of a row):

- ``cluster_identities`` (average linkage cut at 0.6) on 20,000 video features against
  scipy's ``pdist`` + ``linkage(..., "average")`` + ``fcluster``, the library way, which
  needs all N (N - 1) / 2 distances in memory (1.6 GB here, 340 GB at AVSpeech's 290,000
  videos). The partitions must be equal.
- The N^2 part, ``threshold_components`` (connected components of "distance <= 0.6",
  computed block by block), on 80,000 features against the same blocks in float64 (the
  method before float32 blocks, kept here as the reference), and both extrapolated to
  AVSpeech's ~290,000 videos as N^2. Every job of a ``prepare avspeech`` job array does
  this once before it splits the corpus.

The features are generated like dlib's per-video means: people's centres ~0.9 apart,
one person's videos ~0.3 apart, 1 to 6 videos a person.
"""

from __future__ import annotations

import time

import numpy as np

THRESHOLD = 0.6
AVSPEECH_VIDEOS = 290_000


def _features(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    videos = rng.integers(1, 7, size=n)  # per person
    people = int(np.searchsorted(np.cumsum(videos), n)) + 1
    centres = rng.normal(size=(people, 128)) * (0.9 / np.sqrt(2 * 128))
    owner = np.repeat(np.arange(people), videos[:people])[:n]
    x = 0.2 + centres[owner] + rng.normal(size=(n, 128)) * (0.3 / np.sqrt(2 * 128))
    return x[rng.permutation(n)].astype(np.float32)


def _float64_components(features: np.ndarray, threshold: float, block: int = 2048):
    """The reference: the same blocks in float64 (``identities.py`` before float32)."""
    from speech2face.data.identities import _components

    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    norms = np.einsum("ij,ij->i", x, x)
    rows, cols = [], []
    for a in range(0, n, block):
        for b in range(a, n, block):
            d2 = norms[a : a + block, None] + norms[None, b : b + block]
            d2 -= 2.0 * x[a : a + block] @ x[b : b + block].T
            i, j = np.nonzero(d2 <= threshold * threshold)
            keep = i + a < j + b
            rows.append(i[keep] + a)
            cols.append(j[keep] + b)
    return _components(n, np.concatenate(rows), np.concatenate(cols))


def _cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _canonical(labels) -> list[int]:
    first: dict = {}
    return [first.setdefault(label, len(first)) for label in labels]


def run(quick: bool = False) -> dict:
    import threadpoolctl
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    from speech2face.data.identities import cluster_identities, threshold_components

    small, large = (4_000, 12_000) if quick else (20_000, 80_000)
    rows, details = [], {}
    with threadpoolctl.threadpool_limits(1):
        x = _features(small)
        ours, ours_s = _cpu(lambda: cluster_identities(x, THRESHOLD, "average"))
        theirs, theirs_s = _cpu(lambda: fcluster(
            linkage(pdist(x.astype(np.float64)), "average"), THRESHOLD, "distance"))
        same = _canonical(ours) == _canonical(theirs)
        rows.append({
            "benchmark": f"AVSpeech identities: average linkage cut at {THRESHOLD}, "
                         f"{small:,} videos, 1 thread, CPU; {len(set(ours)):,} identities, "
                         f"partition {'equal to' if same else 'DIFFERENT from'} scipy's",
            "result": f"{ours_s:.2f} s", "reference": f"scipy pdist + linkage + fcluster "
                                                      f"{theirs_s:.2f} s",
            "ratio": f"{theirs_s / ours_s:.2f}x", "target": "same partition" +
            (" (met)" if same else " (NOT met)")})
        details.update(videos=small, cluster_s=ours_s, scipy_s=theirs_s, scipy_equal=same)
        x = _features(large, seed=1)
        ours, ours_s = _cpu(lambda: threshold_components(x, THRESHOLD))
        ref, ref_s = _cpu(lambda: _float64_components(x, THRESHOLD))
        same = np.array_equal(ours, ref)
        scale = (AVSPEECH_VIDEOS / large) ** 2
        rows.append({
            "benchmark": f"AVSpeech identities: the N^2 distance blocks, {large:,} videos, "
                         f"float32 blocks + exact float64 near the threshold vs float64 blocks, "
                         f"1 thread, CPU (components {'equal' if same else 'DIFFERENT'}); "
                         f"as N^2 at {AVSPEECH_VIDEOS:,} videos: {ours_s * scale / 60:.1f} "
                         f"against {ref_s * scale / 60:.1f} min per prepare job",
            "result": f"{ours_s:.2f} s", "reference": f"float64 blocks {ref_s:.2f} s",
            "ratio": f"{ref_s / ours_s:.2f}x", "target": "same components" +
            (" (met)" if same else " (NOT met)")})
        details.update(block_videos=large, blocks_s=ours_s, float64_blocks_s=ref_s,
                       blocks_equal=same)
    return {"rows": rows, "details": details}
