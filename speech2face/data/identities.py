"""AVSpeech identities: videos whose faces belong to one person become one identity.

AVSpeech has no identity labels, and one person (a lecturer, a vlogger) often appears in
several of its videos. If ``prepare`` split by video, that person could land in train
and in test, and the test numbers would then measure memorisation. So, before the split,
the videos are clustered on their faces and each cluster becomes one identity.

Method (docs/data.md, "AVSpeech identities"):

- a video's feature is the mean of dlib's 128-D face descriptors over its segments;
- two videos are "the same person" at Euclidean distance <= ``threshold``, by default
  dlib's own guidance for its embedding, 0.6;
- **average linkage** (UPGMA) cut at the threshold: two groups merge when the *mean*
  distance between their videos is <= threshold. Single linkage (connected components of
  the threshold graph) would chain: A ~ B ~ C ~ ... merges people who only look like
  their neighbours, and on a large corpus grows one giant cluster. ``linkage="single"``
  is kept for small corpora where any pair under the threshold must share a split.

Why our own code and not ``scipy.cluster.hierarchy.linkage``: scipy needs the full
condensed distance matrix, N (N - 1) / 2 values: for AVSpeech's ~290,000 videos that is
340 GB. Average-linkage clusters cut at t never straddle two connected components of the
t-graph (a merge needs a mean distance <= t, hence some pair <= t), so we find those
components first, in blocks (memory O(block^2)), and run the nearest-neighbour-chain
algorithm (exact for average linkage, O(m^2)) inside each one. The tests check the result
against scipy's ``linkage`` + ``fcluster`` on the whole matrix.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from speech2face.data.datasets import _carve_validation, processing_order
from speech2face.errors import DataError, Speech2FaceError
from speech2face.face_resnet import DESCRIPTOR_DIM

# dlib's guidance for its 128-D face descriptor: faces at Euclidean distance < 0.6 are the
# same person (dlib's face_recognition example; 99.38 % on LFW).
SAME_PERSON_DISTANCE = 0.6
LINKAGES = ("average", "single")
# Average linkage keeps a dense float64 matrix of one component: 20,000 videos = 3.2 GB.
MAX_COMPONENT = 20_000
_BLOCK = 2048  # rows of the distance matrix computed at once (2048^2 float32 = 16 MB)
# dlib's descriptor elements lie within about +-0.5 (norms about 1 to 1.5). A stored one
# beyond this is not a descriptor; and features beyond MAX_FEATURE would overflow the
# float32 distance blocks (their squares summed), so that no pair at all would merge.
MAX_DESCRIPTOR_VALUE = 10.0
MAX_FEATURE = 1e6


def threshold_components(features: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph "distance <= threshold" (single linkage).

    features: ``(N, D)``. Returns ``(N,)`` int labels, each the smallest index of its
    component. Memory O(N + edges + block^2): distances are computed block by block.

    The blocks are float32 matrix products of the centred features (twice float64's
    speed, half its memory; the N^2 blocks are all of the time at AVSpeech's size), which
    only sort the pairs: those farther than the threshold by more than float32's
    rounding bound are out, those nearer by more are in, and the few in between are
    decided by their exact float64 distance, as ``scipy.spatial.distance.pdist`` takes it.
    """
    x = np.asarray(features, dtype=np.float64)
    n, dim = x.shape
    if n == 0:
        return np.arange(0)
    centred = x - x.mean(axis=0)  # distances unchanged; small norms: less cancellation
    x32 = centred.astype(np.float32)
    norms = np.einsum("ij,ij->i", x32, x32)[:, None]
    ones = np.ones_like(norms)
    # One product gives the squared distances: [x, |x|^2, 1] . [-2y, 1, |y|^2].
    left = np.hstack([x32, norms, ones])
    right = np.hstack([-2.0 * x32, ones, norms])
    limit = threshold * threshold
    # |float32 d^2 - exact d^2| <= (6 D + 32) u max|x|^2 (the norms' and the product's
    # sums of D + 2 terms, the features rounded to float32); twice that for safety.
    margin = (12 * dim + 64) * 2.0**-24 * float(np.einsum("ij,ij->i", centred, centred).max())
    rows, cols = [], []
    for a in range(0, n, _BLOCK):
        for b in range(a, n, _BLOCK):
            d2 = left[a : a + _BLOCK] @ right[b : b + _BLOCK].T
            i, j = np.nonzero(d2 <= limit + margin)
            keep = i + a < j + b
            i, j = i[keep] + a, j[keep] + b
            unsure = d2[i - a, j - b] > limit - margin
            if unsure.any():
                diff = x[i[unsure]] - x[j[unsure]]
                keep = ~unsure
                keep[unsure] = np.einsum("ij,ij->i", diff, diff) <= limit
                i, j = i[keep], j[keep]
            rows.append(i)
            cols.append(j)
    return _components(n, np.concatenate(rows), np.concatenate(cols))


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Labels (smallest member index) of the components of an undirected edge list, by
    hooking each edge's roots onto the smaller one and pointer jumping until no edge
    joins two roots (vectorised union-find)."""
    parent = np.arange(n)
    i, j = i.astype(np.intp), j.astype(np.intp)
    while True:
        pi, pj = parent[i], parent[j]
        differ = pi != pj
        if not differ.any():
            return parent
        low = np.minimum(pi[differ], pj[differ])
        np.minimum.at(parent, pi[differ], low)
        np.minimum.at(parent, pj[differ], low)
        while True:  # pointer jumping: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def average_linkage(distances: np.ndarray, threshold: float, overwrite: bool = False) -> np.ndarray:
    """Average-linkage (UPGMA) clusters cut at ``threshold``, by the nearest-neighbour chain.

    distances: ``(m, m)`` symmetric, zero diagonal. Returns ``(m,)`` labels, each the
    smallest member index of its cluster; the same partition as scipy's ``linkage(...,
    "average")`` + ``fcluster(..., threshold, "distance")`` (up to ties). ``overwrite``:
    work in ``distances`` (float64) instead of a copy (half the memory).

    Average linkage is reducible (a merged group is never nearer to a third than the
    nearer of its parts), so merging reciprocal nearest neighbours in any order builds
    the same tree, and a group whose nearest neighbour is farther than the threshold can
    never merge again: it is retired at once, and the loop ends when all are.
    """
    d = np.array(distances, dtype=np.float64, copy=not overwrite)
    m = len(d)
    np.fill_diagonal(d, np.inf)
    size = np.ones(m)
    parent = np.arange(m)  # each point's group: the index of the row that holds it
    active = m
    chain: list[int] = []
    first = 0
    while active > 1:
        if not chain:
            while not np.isfinite(size[first]):  # retired or merged away
                first += 1
            chain.append(first)
        a = chain[-1]
        b = int(np.argmin(d[a]))
        if len(chain) > 1 and d[a, chain[-2]] <= d[a, b]:
            b = chain[-2]  # prefer the chain's previous group on ties: guarantees progress
        if d[a, b] > threshold:
            chain.pop()  # nothing within reach now or after any later merge
            d[a, :] = d[:, a] = np.inf
            size[a] = np.inf
            active -= 1
            continue
        if len(chain) > 1 and b == chain[-2]:
            chain.pop()
            chain.pop()
            # Lance-Williams update for average linkage: b joins a.
            merged = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
            merged[a] = np.inf
            d[a, :] = d[:, a] = merged
            d[b, :] = d[:, b] = np.inf
            size[a] += size[b]
            size[b] = np.inf
            parent[parent == b] = a
            active -= 1
        else:
            chain.append(b)
    # Label each point by its group's smallest member.
    smallest = np.full(m, m)
    np.minimum.at(smallest, parent, np.arange(m))
    return smallest[parent]


def cluster_identities(
    features: np.ndarray, threshold: float = SAME_PERSON_DISTANCE, linkage: str = "average"
) -> np.ndarray:
    """Cluster videos by face: ``(N, D)`` per-video features -> ``(N,)`` labels, each the
    smallest index in its cluster. ``linkage``: "average" (default) or "single"."""
    if linkage not in LINKAGES:
        raise DataError(None, f"unknown linkage {linkage!r}; expected one of {LINKAGES}")
    if not threshold > 0:
        raise DataError(None, f"identity threshold must be > 0, got {threshold}")
    x = np.asarray(features, dtype=np.float64)
    if x.size and not (np.isfinite(x).all() and np.abs(x).max() <= MAX_FEATURE):
        raise DataError(None, f"face features must be finite and within +-{MAX_FEATURE:g} "
                              "to be clustered (is a descriptor damaged?)")
    labels = threshold_components(x, threshold)
    if linkage == "single":
        return labels
    out = np.arange(len(x))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if len(members) == 1:
            continue
        if len(members) > MAX_COMPONENT:
            raise DataError(
                None,
                f"{len(members)} videos are chained within identity distance {threshold}; "
                f"average linkage handles at most {MAX_COMPONENT} at once: lower the threshold",
            )
        sub = x[members]
        sq = np.einsum("ij,ij->i", sub, sub)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * sub @ sub.T, 0.0))
        np.fill_diagonal(dist, 0.0)
        out[members] = members[average_linkage(dist, threshold, overwrite=True)]
    return out


def merge_names(
    names: Sequence[str], features: np.ndarray, threshold: float = SAME_PERSON_DISTANCE,
    linkage: str = "average",
) -> dict[str, str]:
    """Video name -> identity name: the alphabetically first video of its cluster."""
    order = sorted(range(len(names)), key=lambda k: names[k])
    labels = cluster_identities(np.asarray(features)[order], threshold, linkage)
    return {names[order[k]]: names[order[labels[k]]] for k in range(len(order))}


# ============================================================== per-video face features

DESCRIPTOR_SUFFIX = ".face.npy"  # beside a segment file: written by `speech2face download`
SPLIT_PREFERENCE = ("test", "val", "train")  # a tie goes to the first: never train on doubt


def face_descriptor(image: np.ndarray, centre: tuple[float, float] | None = None,
                    detector: str = "hog", encoder=None) -> np.ndarray | None:
    """dlib's 128-D descriptor of the face at ``centre`` (x, y as fractions of the image;
    None: the largest face) in an RGB image, or None when there is no such face.

    At the centre means: the detected face nearest to it, if it is less than one face
    width away (another person's face elsewhere in the frame is not the speaker's).
    ``encoder``: a loaded dlib FaceEncoder to reuse (loaded here when None)."""
    from speech2face import faces
    from speech2face.face_encoders import load_face_encoder

    found = faces.detect_faces(image, detector=detector)
    if not found:
        return None
    face = found[0]
    if centre is not None:
        h, w = image.shape[:2]
        cx, cy = centre[0] * w, centre[1] * h

        def offset(f) -> float:
            return math.hypot((f.box[0] + f.box[2]) / 2 - cx, (f.box[1] + f.box[3]) / 2 - cy)

        face = min(found, key=offset)
        if offset(face) > face.box[2] - face.box[0]:
            return None
    crop, _ = faces.align_face(image, face)
    encoder = encoder or load_face_encoder("dlib")
    return encoder.embed(crop[None]).numpy()[0].astype(np.float32)


def descriptor_path(segment_file: str | os.PathLike) -> Path:
    """Where ``download`` puts the descriptor of a segment file."""
    path = Path(segment_file)
    return path.with_name(path.stem + DESCRIPTOR_SUFFIX)


def read_descriptor(path: str | os.PathLike) -> np.ndarray:
    """A stored descriptor, validated: (128,) float32, finite and within
    +-``MAX_DESCRIPTOR_VALUE`` (DataError otherwise)."""
    try:
        # Mapped, not read: a header can claim any size (373 GiB was allocated), and a
        # map longer than the file is a ValueError. The checks below copy it out.
        value = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # (EOFError: an empty file)
        raise DataError(path, f"not a face descriptor file ({error or 'empty'})") from None
    if value.shape != (DESCRIPTOR_DIM,) or value.dtype.kind != "f" or not np.isfinite(value).all():
        raise DataError(path, f"not a 128-D face descriptor (shape {value.shape}, {value.dtype})")
    if (largest := float(np.abs(value).max())) > MAX_DESCRIPTOR_VALUE:
        raise DataError(path, f"not a face descriptor: values up to {largest:.3g}, "
                              f"a dlib descriptor's lie within +-0.5")
    return np.array(value, dtype=np.float32)  # (a copy: not the mapped file)


# prepare keeps the descriptors it computes from frames (videos/ layout, or segments
# without download's .face.npy) under OUT/parts/descriptors, in files of STORE_CHUNK
# videos: every job of an array needs all of them before it can split the corpus, and
# a rerun after a kill should not embed them again.
STORE_DIR = "descriptors"
STORE_CHUNK = 1000
_STORE_FILE = re.compile(r"(?P<tag>[0-9A-Za-z-]+)-(?P<chunk>\d{6})\.npz")


def read_store(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """Video -> mean descriptor (all NaN: no face in its frames) from the store's files,
    validated, and the files that were not valid (ignored: their videos are embedded
    again). A store file holds ``videos`` (names) and ``descriptors`` ``(n, 128)``."""
    known: dict[str, np.ndarray] = {}
    invalid = []
    folder = Path(folder)
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        try:
            with np.load(path, allow_pickle=False) as f:
                videos, values = f["videos"], f["descriptors"]
            ok = (_STORE_FILE.fullmatch(path.name) is not None and videos.ndim == 1
                  and videos.dtype.kind == "U" and values.shape == (len(videos), DESCRIPTOR_DIM)
                  and values.dtype == np.float32
                  and bool(np.all(np.isfinite(values).all(1) | np.isnan(values).all(1))))
        # (a damaged zip; a member whose header claims more memory than there is)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError):
            ok = False
        if not ok:
            invalid.append(str(path))
            continue
        known.update(zip(videos.tolist(), values, strict=True))
    return known, invalid


class _StoreWriter:
    """Appends computed descriptors to ``folder`` as ``TAG-NNNNNN.npz`` files of
    STORE_CHUNK videos (each written whole, atomically; a kill loses at most one)."""

    def __init__(self, folder: Path, tag: str):
        self.folder, self.tag = folder, tag
        taken = [int(m["chunk"]) for p in folder.glob(f"{tag}-*.npz")
                 if (m := _STORE_FILE.fullmatch(p.name)) and m["tag"] == tag]
        self.next = max(taken, default=-1) + 1
        self.videos: list[str] = []
        self.values: list[np.ndarray] = []

    def add(self, video: str, value: np.ndarray) -> None:
        self.videos.append(video)
        self.values.append(value)
        if len(self.videos) >= STORE_CHUNK:
            self.flush()

    def flush(self) -> None:
        from speech2face.utils import atomic_write

        if not self.videos:
            return
        with atomic_write(self.folder / f"{self.tag}-{self.next:06d}.npz") as f:
            np.savez(f, videos=np.array(self.videos),
                     descriptors=np.stack(self.values).astype(np.float32))
        self.next += 1
        self.videos, self.values = [], []


def video_descriptors(
    units, detector: str = "hog", progress: bool = True, store: Path | None = None,
    tag: str = "prepare",
) -> tuple[np.ndarray, list[str], Counter]:
    """``(N, 128)`` mean face descriptor of each unit (a row of NaN: no face found),
    download's descriptor files that were not valid (ignored), and where the descriptors
    came from (counts: ``stored``, ``downloaded``, ``computed``). Store files that are not
    valid are removed (their videos are embedded and stored again).

    In order: the store (``store``: prepare's, see STORE_DIR), the descriptors that
    ``download`` put beside the segments, else the unit's frames, read and embedded here
    (dlib, as download does), and added to the store under ``tag``."""
    from speech2face.data.prepare import read_video_frame
    from speech2face.face_encoders import load_face_encoder
    from speech2face.utils import progress as tqdm

    known, damaged = read_store(store) if store is not None else ({}, [])
    for path in damaged:  # ours, and written again below: not the inputs' fault
        Path(path).unlink(missing_ok=True)
    unreadable: list[str] = []
    writer = _StoreWriter(store, tag) if store is not None else None
    sources: Counter = Counter()
    encoder = None
    out = np.full((len(units), DESCRIPTOR_DIM), np.nan, np.float32)
    for i, unit in enumerate(tqdm(units, desc="identities: faces", unit="video",
                                  disable=not progress)):
        if unit.video in known:
            out[i] = known[unit.video]
            sources["stored"] += 1
            continue
        found = []
        for path in (descriptor_path(c.path) for c in unit.clips):
            try:
                if path.is_file():
                    found.append(read_descriptor(path))
            except DataError:
                unreadable.append(str(path))
        if found:
            out[i] = np.mean(found, axis=0)
            sources["downloaded"] += 1
            continue
        encoder = encoder or load_face_encoder("dlib")
        for frame in unit.frames:
            try:
                image = read_video_frame(frame.path, frame.time)
            except Speech2FaceError:
                continue
            one = face_descriptor(image, frame.centre, detector, encoder)
            if one is not None:
                found.append(one)
        if found:
            out[i] = np.mean(found, axis=0)
        sources["computed"] += 1
        if writer is not None:
            writer.add(unit.video, out[i])
    if writer is not None:
        writer.flush()
    return out, unreadable, sources


def merge_units(units, threshold: float = SAME_PERSON_DISTANCE, linkage: str = "average",
                detector: str = "hog", progress: bool = True, store: Path | None = None,
                tag: str = "prepare") -> tuple[list, dict]:
    """AVSpeech videos clustered by face into identities, before the split.

    units: ``data.Unit`` per video (identity = video). Returns the units (in processing
    order, ``datasets.processing_order``) with
    ``identity`` = the cluster's name (its alphabetically first video) and ``split`` = the
    split most of its videos had (ties: test, then val), and a report: videos, identities,
    ``merged_videos`` (videos that joined another's identity), ``moved_videos`` (whose
    split changed), videos without a face (left alone: prepare skips them), download's
    descriptor files that were not valid (ignored), threshold, linkage; and
    ``descriptor_sources`` (:func:`video_descriptors`' counts; not part of a run's
    identity: a rerun finds in the store what the first run computed).
    store, tag: :func:`video_descriptors`'.
    """
    listed = [u for u in units if u.skip is None]
    features, unreadable, sources = video_descriptors(listed, detector, progress, store, tag)
    has_face = ~np.isnan(features).any(axis=1)
    names = [u.video for u, ok in zip(listed, has_face, strict=True) if ok]
    identity = merge_names(names, features[has_face], threshold, linkage)
    votes: dict[str, Counter] = {}
    for u in listed:
        votes.setdefault(identity.get(u.video, u.video), Counter())[u.split] += 1
    rank = {s: i for i, s in enumerate(SPLIT_PREFERENCE)}
    split_of = {  # max() keeps the first of equals: the preferred split wins a tie
        name: max(sorted(count, key=lambda s: rank.get(s, len(rank))), key=count.__getitem__)
        for name, count in votes.items()
    }
    # The CSV's validation videos (carved from the train CSV's before anything was
    # fetched) may all have failed to download or joined training identities: then the
    # validation identities are carved again, as datasets does, from the merged ones.
    if "val" not in split_of.values():
        for name in _carve_validation([n for n, s in split_of.items() if s == "train"]):
            split_of[name] = "val"
    out, moved = [], 0
    for u in units:
        if u.skip is not None:
            out.append(u)
            continue
        name = identity.get(u.video, u.video)
        moved += split_of[name] != u.split
        out.append(replace(u, identity=name, split=split_of[name]))
    report = {
        "videos": len(listed),
        "identities": len(votes),
        "merged_videos": len(listed) - len(votes),
        "moved_videos": moved,
        "videos_without_face": int((~has_face).sum()),
        "unreadable_descriptor_files": unreadable,
        "threshold": threshold,
        "linkage": linkage,
        "descriptor_sources": dict(sources),
    }
    return processing_order(out), report
