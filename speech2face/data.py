"""Datasets to WebDataset shards (``prepare``), and shards to training batches (``ShardDataset``).

``prepare`` reads VoxCeleb1, VoxCeleb2 or AVSpeech in their published layouts
(``docs/data.md``) and writes, per split, tar shards of a fixed number of samples. A
sample is one speech clip paired with a face of the same video::

    <identity>/<video>/<clip>.flac          6 s of 16 kHz audio (repeated if shorter)
    <identity>/<video>/<clip>.face.jpg      the aligned 224 x 224 crop (faces.align_face)
    <identity>/<video>/<clip>.landmarks.npy (68, 2) float32, (x, y) in the crop
    <identity>/<video>/<clip>.feature.npy   (D,) float32, the face encoder's feature
    <identity>/<video>/<clip>.json          identity, video, clip, split, gender, ...

(``.face.1.jpg``, ``.landmarks.1.npy``, ``.feature.1.npy``... hold further crops when
``crops_per_sample > 1``.) Spectrograms are not stored; the loader computes them.

Scale and faults. The work unit is a video. With ``num_shards = n`` a run only takes the
videos whose stable hash is ``shard_index`` mod n, so a cluster job array needs no
coordination. Within a run, videos are processed by a worker pool but written in a
fixed order (split, identity, video), so the output is a deterministic function of the
inputs and the arguments. Shards are written under a temporary name and renamed when
complete; after each completed shard a progress file records where the run is. Killed
at any moment and rerun with the same arguments, a run continues from the last
completed shard (re-processing the video it was in and dropping the samples it already
wrote), so its final shards are byte-identical to an uninterrupted run's. Each run
writes a part manifest; the run that completes the last part merges all parts into
``manifest.json`` (``merge_manifests`` does it by hand).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from speech2face.audio import AUDIO_SUFFIXES, VIDEO_SUFFIXES
from speech2face.errors import DataError, Speech2FaceError
from speech2face.utils import atomic_write

DATASETS = ("voxceleb1", "voxceleb2", "avspeech")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
CLIP_SECONDS = 6.0  # paper section 3.1: 6 s of speech per example
SAMPLES_PER_SHARD = 1000  # ~150 MB shards: 6 s of FLAC is ~100-150 kB, a crop ~15 kB
FRAMES_PER_VIDEO = 4  # face frames used per video (evenly spaced)
CROPS_PER_SAMPLE = 1
JPEG_QUALITY = 95
# Validation identities carved from the training ("dev") identities: this fraction,
# chosen by a hash of the identity so that every machine and rerun agrees.
VAL_FRACTION = 0.05
# VoxCeleb1's official verification split: test identities id10270 - id10309.
VOX1_TEST_IDENTITIES = frozenset(f"id{n}" for n in range(10270, 10310))
SPLIT_FILE = "identity_split.csv"  # optional: identity,split (train/val/test) overrides
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


# ============================================================================ work units


@dataclass(frozen=True)
class Clip:
    """One speech clip: a file, or the segment [start, end) seconds of one."""

    name: str
    path: str
    start: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class Frame:
    """One face frame: an image file, or the frame of a video at ``time`` (None: middle).

    ``centre``: the speaker's face centre (x, y) as fractions of width and height, when
    the dataset gives it (AVSpeech); the detected face nearest to it is used.
    """

    path: str
    time: float | None = None
    centre: tuple[float, float] | None = None

    @property
    def item(self) -> str:
        return self.path if self.time is None else f"{self.path}@{self.time:.2f}s"


@dataclass(frozen=True)
class Unit:
    """A video: the unit of work, of sharding across machines and of resuming."""

    identity: str
    video: str
    split: str | None  # None when the unit is skipped before processing
    gender: str | None
    clips: tuple[Clip, ...]
    frames: tuple[Frame, ...]
    skip: str | None = None  # reason the whole video is skipped without processing

    @property
    def key(self) -> str:
        return f"{self.identity}/{self.video}"


def stable_hash(text: str) -> int:
    """A hash that is the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _evenly(items: Sequence, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[int(i)] for i in np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))]


def _read_table(path: Path) -> list[dict[str, str]]:
    """A CSV or tab-separated table with a header; keys and values stripped."""
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if "\t" in first else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        raise DataError(path, "empty table")
    header = [h.strip() for h in rows[0]]
    return [
        {h: v.strip() for h, v in zip(header, row, strict=False)}
        for row in rows[1:]
        if any(c.strip() for c in row)
    ]


def _column(row: dict[str, str], *names: str) -> str | None:
    lowered = {k.lower(): v for k, v in row.items()}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def _carve_validation(dev_identities: Sequence[str], fraction: float = VAL_FRACTION) -> set[str]:
    """The validation identities: the ``fraction`` of dev identities with the lowest hash."""
    ranked = sorted(set(dev_identities), key=lambda i: (stable_hash("val:" + i), i))
    n = int(round(fraction * len(ranked)))
    if len(ranked) >= 2:
        n = max(1, n)
    return set(ranked[:n])


def _read_split_file(path: Path) -> dict[str, str]:
    splits = {}
    for row in _read_table(path):
        identity, split = _column(row, "identity", "id"), _column(row, "split", "set")
        if not identity or split not in SPLITS:
            raise DataError(path, f"bad row {row}: expected identity and a split in {SPLITS}")
        splits[identity] = split
    return splits


def _assign_splits(root: Path, meta: dict[str, dict], test_of) -> dict[str, str]:
    """identity -> split: the split file if present, else official test + carved validation."""
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        return _read_split_file(split_file)
    dev = [i for i in meta if not test_of(i)]
    val = _carve_validation(dev)
    return {i: "test" if test_of(i) else "val" if i in val else "train" for i in meta}


def _find(root: Path, name: str, depth: int = 2) -> Path | None:
    """``root/name`` or ``root/*/name`` (e.g. ``vox1_dev_wav/wav``), first in sorted order."""
    for level in range(depth):
        pattern = "/".join(["*"] * level + [name])
        hits = sorted(p for p in root.glob(pattern))
        if hits:
            return hits[0]
    return None


def _find_all(root: Path, name: str, depth: int = 2) -> list[Path]:
    hits: list[Path] = []
    for level in range(depth):
        pattern = "/".join(["*"] * level + [name])
        hits += sorted(p for p in root.glob(pattern) if p.is_dir())
    return hits


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _read_voxceleb_meta(
    root: Path, filename: str, id_column: str, dataset: str, **extra: tuple[str, ...]
) -> tuple[Path, dict[str, dict]]:
    """``(path, {identity: {"gender", "set", *extra}})`` from a VoxCeleb metadata table.

    ``extra`` maps an output key to the column names it may have (first found wins).
    """
    meta_path = _find(root, filename)
    if meta_path is None:
        raise DataError(root, f"no {filename} ({dataset}'s identity metadata)")
    meta = {}
    for row in _read_table(meta_path):
        identity = _column(row, id_column, "id")
        if identity:
            meta[identity] = {
                "gender": (_column(row, "Gender") or "").lower() or None,
                "set": (_column(row, "Set") or "").lower(),
                **{key: _column(row, *columns) for key, columns in extra.items()},
            }
    return meta_path, meta


def list_voxceleb1(root: str | os.PathLike, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """The videos of a VoxCeleb1 folder (layout: docs/data.md), sorted by identity, video.

    Audio ``wav/<id>/<video>/<clip>.wav`` (or ``vox1_*_wav/wav/...``), face frames
    ``unzippedFaces/<VGGFace1 ID>/1.6/<video>/<frame>.jpg``, metadata ``vox1_meta.csv``
    (gender, nationality, set) and optionally ``identity_split.csv``.
    """
    root = Path(root)
    wav_roots = _find_all(root, "wav")
    if not wav_roots:
        raise DataError(root, "no wav/ folder (expected wav/<id>/<video>/<clip>.wav)")
    meta_path, meta = _read_voxceleb_meta(
        root, "vox1_meta.csv", "VoxCeleb1 ID", "VoxCeleb1",
        name=("VGGFace1 ID", "name"), nationality=("Nationality",),
    )
    for identity, row in meta.items():
        row["name"] = row["name"] or identity

    def is_test(identity: str) -> bool:
        s = meta[identity]["set"]
        return s == "test" if s else identity in VOX1_TEST_IDENTITIES

    splits = _assign_splits(root, meta, is_test)
    faces_root = _find(root, "unzippedFaces")
    clips: dict[tuple[str, str], list[Clip]] = {}
    for wav_root in wav_roots:
        for id_dir in _subdirs(wav_root):
            for video_dir in _subdirs(id_dir):
                files = _files(video_dir, AUDIO_SUFFIXES)
                clips.setdefault((id_dir.name, video_dir.name), []).extend(
                    Clip(p.stem, str(p)) for p in files
                )
    frames: dict[tuple[str, str], list[Frame]] = {}
    if faces_root is not None:
        name_to_id = {m["name"]: i for i, m in meta.items()}
        for name_dir in _subdirs(faces_root):
            identity = name_to_id.get(name_dir.name)
            if identity is None:
                continue
            # Videos under the crop-scale folder ("1.6" in the release); the first
            # scale folder in sorted order wins when there are several.
            seen = set()
            for scale_dir in _subdirs(name_dir):
                for video_dir in _subdirs(scale_dir):
                    if video_dir.name in seen:
                        continue
                    seen.add(video_dir.name)
                    images = _files(video_dir, FRAME_SUFFIXES)
                    frames[(identity, video_dir.name)] = [
                        Frame(str(p)) for p in _evenly(images, frames_per_video)
                    ]
    units = []
    for identity, video in sorted(set(clips) | set(frames)):
        video_clips = tuple(sorted(clips.get((identity, video), []), key=lambda c: c.name))
        video_frames = tuple(frames.get((identity, video), []))
        units.append(
            _video_unit(identity, video, video_clips, video_frames, meta, splits, meta_path.name,
                        no_frames="video has no face frames")
        )
    return units


def list_voxceleb2(root: str | os.PathLike, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """The videos of a VoxCeleb2 folder: ``[dev|test/]aac/<id>/<video>/<clip>.m4a`` and
    ``[dev|test/]mp4/<id>/<video>/<clip>.mp4``, metadata ``vox2_meta.csv``.

    Audio comes from the ``.m4a`` clips, or from the ``.mp4`` clips' audio tracks when
    there is no ``aac`` folder; face frames are the middle frames of the ``.mp4`` clips.
    """
    root = Path(root)
    aac_roots, mp4_roots = _find_all(root, "aac"), _find_all(root, "mp4")
    if not mp4_roots:
        raise DataError(root, "no mp4/ folder (expected mp4/<id>/<video>/<clip>.mp4)")
    meta_path, meta = _read_voxceleb_meta(root, "vox2_meta.csv", "VoxCeleb2 ID", "VoxCeleb2")
    splits = _assign_splits(root, meta, lambda i: meta[i]["set"] == "test")

    def collect(roots, suffixes):
        found: dict[tuple[str, str], list[Path]] = {}
        for r in roots:
            for id_dir in _subdirs(r):
                for video_dir in _subdirs(id_dir):
                    found.setdefault((id_dir.name, video_dir.name), []).extend(
                        _files(video_dir, suffixes)
                    )
        return found

    audio, videos = collect(aac_roots, AUDIO_SUFFIXES), collect(mp4_roots, VIDEO_SUFFIXES)
    units = []
    for identity, video in sorted(set(audio) | set(videos)):
        sources = sorted(audio.get((identity, video)) or videos.get((identity, video)) or [])
        video_clips = tuple(Clip(p.stem, str(p)) for p in sources)
        video_frames = tuple(
            Frame(str(p))
            for p in _evenly(sorted(videos.get((identity, video), [])), frames_per_video)
        )
        units.append(
            _video_unit(identity, video, video_clips, video_frames, meta, splits, meta_path.name,
                        no_frames="video has no mp4 clips for face frames")
        )
    return units


def _video_unit(identity: str, video: str, clips: tuple, frames: tuple, meta: dict,
                splits: dict, meta_name: str, no_frames: str) -> Unit:
    """A VoxCeleb video as a unit, or as a skipped one with the reason."""
    if identity not in meta or identity not in splits:
        return Unit(identity, video, None, None, clips, frames,
                    skip=f"no metadata row for {identity} in {meta_name}")
    reason = None
    if not clips:
        reason = "video has no audio clips"
    elif not frames:
        reason = no_frames
    return Unit(identity, video, None if reason else splits[identity], meta[identity]["gender"],
                clips, frames, skip=reason)


def list_avspeech(root: str | os.PathLike, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """The videos of an AVSpeech folder: ``avspeech_{train,test}.csv`` (rows: YouTube
    id, start s, end s, face centre x, y as fractions) and ``videos/<id>.<ext>``.

    AVSpeech has no identity labels: each video is its own identity (one speaker per
    video, as the dataset was built). Its segments are the video's clips.
    """
    root = Path(root)
    tables = {split: root / f"avspeech_{split}.csv" for split in ("train", "test")}
    if not any(p.is_file() for p in tables.values()):
        raise DataError(root, "no avspeech_train.csv or avspeech_test.csv")
    video_dir = root / "videos"
    downloaded: dict[str, Path] = {}
    if video_dir.is_dir():
        for p in sorted(video_dir.iterdir()):
            if p.suffix.lower() in VIDEO_SUFFIXES:
                downloaded.setdefault(p.stem, p)
    segments: dict[str, list[tuple[float, float, float, float]]] = {}
    split_of: dict[str, str] = {}
    for split, path in tables.items():
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row or not row[0].strip():
                    continue
                try:
                    ytid = row[0].strip()
                    start, end, x, y = (float(v) for v in row[1:5])
                except (ValueError, IndexError):
                    raise DataError(
                        path, f"line {line}: expected id,start,end,x,y, got {row}"
                    ) from None
                segments.setdefault(ytid, []).append((start, end, x, y))
                split_of[ytid] = split
    overrides = _read_split_file(root / SPLIT_FILE) if (root / SPLIT_FILE).is_file() else {}
    val = _carve_validation([v for v, s in split_of.items() if s == "train"])
    units = []
    for ytid in sorted(segments):
        split = overrides.get(ytid) or ("val" if ytid in val else split_of[ytid])
        segs = sorted(segments[ytid])
        path = downloaded.get(ytid)
        if path is None:
            units.append(Unit(ytid, ytid, None, None, (), (), skip="video not downloaded"))
            continue
        clips = tuple(Clip(f"s{int(round(s * 1000)):09d}", str(path), s, e) for s, e, _, _ in segs)
        frames = tuple(
            Frame(str(path), (s + e) / 2, (x, y)) for s, e, x, y in _evenly(segs, frames_per_video)
        )
        units.append(Unit(ytid, ytid, split, None, clips, frames))
    return units


LISTERS = {"voxceleb1": list_voxceleb1, "voxceleb2": list_voxceleb2, "avspeech": list_avspeech}


def list_units(dataset: str, root, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """All videos of a dataset, in the processing order: by split, identity, video.

    Units skipped before processing (no metadata, nothing downloaded) come last.
    """
    if dataset not in LISTERS:
        raise DataError(None, f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if not Path(root).is_dir():
        raise DataError(root, "dataset folder not found")
    units = LISTERS[dataset](root, frames_per_video)
    rank = {s: i for i, s in enumerate(SPLITS)}
    return sorted(units, key=lambda u: (rank.get(u.split, len(SPLITS)), u.identity, u.video))


# ========================================================================== processing


@dataclass
class Options:
    """What a worker needs to turn a unit into samples (also part of the run's identity)."""

    dataset: str
    encoder: str = "dlib"
    encoder_weights: str | None = None
    detector: str = "hog"
    seconds: float = CLIP_SECONDS
    crops_per_sample: int = CROPS_PER_SAMPLE
    frames_per_video: int = FRAMES_PER_VIDEO
    samples_per_shard: int = SAMPLES_PER_SHARD


@dataclass
class UnitResult:
    samples: list[dict]  # {"key", "files": {ext: bytes}, "landmarks": (68,2)}
    skipped: list[tuple[str, str]]  # (item, reason)
    counts: Counter = field(default_factory=Counter)


class _Processor:
    """Turns units into encoded samples; holds the face encoder (loaded once per process)."""

    def __init__(self, options: Options):
        self.options = options
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from speech2face.face_encoders import load_face_encoder

            self._encoder = load_face_encoder(
                self.options.encoder, weights=self.options.encoder_weights
            )
        return self._encoder

    def __call__(self, unit: Unit) -> UnitResult:
        result = UnitResult([], [])
        if unit.skip is not None:
            result.skipped.append((unit.key, unit.skip))
            result.counts.update(videos_skipped=1, clips_skipped=len(unit.clips))
            return result
        crops, landmarks = [], []
        for frame in unit.frames:
            try:
                crop, lm = self._face(frame)
            except Speech2FaceError as error:
                result.skipped.append((frame.item, error.problem))
                result.counts.update(frames_skipped=1)
                continue
            crops.append(crop)
            landmarks.append(lm)
        result.counts.update(frames=len(crops))
        if not crops:
            result.skipped.append((unit.key, "no face found in any frame"))
            result.counts.update(videos_skipped=1, clips_skipped=len(unit.clips))
            return result
        # Encode the crops as stored, then embed the decoded JPEGs, so that the stored
        # feature is what the face encoder gives for the stored crop.
        jpegs = [_encode_jpeg(c) for c in crops]
        decoded = np.stack([_decode_jpeg(j) for j in jpegs])
        features = self.encoder.embed(decoded).detach().cpu().numpy().astype(np.float32)
        waves = self._audio(unit, result)
        if not waves:
            result.skipped.append((unit.key, "no usable audio clip"))
            result.counts.update(videos_skipped=1)
            return result
        result.counts.update(videos=1)
        c = self.options.crops_per_sample
        for j, (clip, flac) in enumerate(waves):
            picks = [(j * c + t) % len(crops) for t in range(c)]
            meta = {
                "identity": unit.identity,
                "video": unit.video,
                "clip": clip.name,
                "split": unit.split,
                "gender": unit.gender,
                "dataset": self.options.dataset,
            }
            if clip.end is not None:
                meta.update(start=clip.start, end=clip.end)
            files = {"flac": flac}
            for t, i in enumerate(picks):
                suffix = "" if t == 0 else f".{t}"
                files[f"face{suffix}.jpg"] = jpegs[i]
                files[f"landmarks{suffix}.npy"] = _npy(landmarks[i])
                files[f"feature{suffix}.npy"] = _npy(features[i])
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            result.samples.append(
                {
                    "key": f"{unit.key}/{clip.name}",
                    "files": files,
                    "landmarks": landmarks[picks[0]],
                    "identity": unit.identity,
                }
            )
        return result

    def _face(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        from speech2face import faces

        image = (
            read_video_frame(frame.path, frame.time)
            if _is_video(frame.path)
            else faces.load_image(frame.path)
        )
        found = faces.detect_faces(image, detector=self.options.detector)
        if not found:
            from speech2face.errors import NoFaceError

            raise NoFaceError(frame.item, "no face found")
        face = found[0]
        if frame.centre is not None:
            h, w = image.shape[:2]
            cx, cy = frame.centre[0] * w, frame.centre[1] * h
            face = min(
                found,
                key=lambda f: math.hypot(
                    (f.box[0] + f.box[2]) / 2 - cx, (f.box[1] + f.box[3]) / 2 - cy
                ),
            )
        return faces.align_face(image, face)

    def _audio(self, unit: Unit, result: UnitResult) -> list[tuple[Clip, bytes]]:
        from speech2face.audio import SAMPLE_RATE, fit_duration, load_audio
        from speech2face.errors import AudioError

        seconds = self.options.seconds
        # Segments of one file (AVSpeech) are decoded once, up to the last one's end.
        needed: dict[str, float] = {}
        for clip in unit.clips:
            end = clip.start + seconds if clip.end is None else min(clip.end, clip.start + seconds)
            needed[clip.path] = max(needed.get(clip.path, 0.0), end)
        cache: dict[str, np.ndarray | AudioError] = {}
        out = []
        for clip in unit.clips:
            if clip.path not in cache:
                try:
                    cache[clip.path] = load_audio(clip.path, max_seconds=needed[clip.path])
                except AudioError as error:
                    cache[clip.path] = error
            wave = cache[clip.path]
            if isinstance(wave, AudioError):
                result.skipped.append(
                    (
                        f"{clip.path}" if clip.end is None else f"{clip.path}@{clip.start:.2f}s",
                        wave.problem,
                    )
                )
                result.counts.update(clips_skipped=1)
                continue
            if clip.end is not None:
                end = min(clip.end, clip.start + seconds)
                wave = wave[int(round(clip.start * SAMPLE_RATE)) : int(round(end * SAMPLE_RATE))]
                if wave.size == 0 or not wave.any():
                    result.skipped.append(
                        (f"{clip.path}@{clip.start:.2f}s", "segment has no audio")
                    )
                    result.counts.update(clips_skipped=1)
                    continue
            out.append((clip, _encode_flac(fit_duration(wave, seconds))))
            result.counts.update(clips=1)
        return out


def _is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_video_frame(path: str | os.PathLike, time_s: float | None = None) -> np.ndarray:
    """The frame of a video at ``time_s`` seconds (None: the middle) as uint8 ``(H, W, 3)``.

    Raises ImageError naming the file when it cannot be opened or has no video track.
    """
    import av

    from speech2face.errors import ImageError

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(path, "no video track")
            stream = container.streams.video[0]
            if time_s is None:
                duration = (
                    stream.duration * stream.time_base
                    if stream.duration
                    else (container.duration or 0) / av.time_base
                )
                time_s = float(duration) / 2
            if time_s > 0 and stream.time_base:
                container.seek(
                    int(time_s / stream.time_base), stream=stream, backward=True, any_frame=False
                )
            last = None
            for frame in container.decode(stream):
                last = frame
                if frame.time is None or frame.time >= time_s - 1e-3:
                    break
            if last is None:
                raise ImageError(path, "no decodable video frame")
            return last.to_ndarray(format="rgb24")
    except av.error.FFmpegError as error:
        raise ImageError(
            path, f"cannot decode video: {getattr(error, 'strerror', None) or error}"
        ) from None


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _encode_flac(wave: np.ndarray) -> bytes:
    import soundfile as sf

    from speech2face.audio import SAMPLE_RATE

    buffer = io.BytesIO()
    sf.write(
        buffer, np.clip(wave, -1.0, 32767 / 32768), SAMPLE_RATE, format="FLAC", subtype="PCM_16"
    )
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


_WORKER: _Processor | None = None


def _worker_init(options: Options) -> None:
    global _WORKER
    torch.set_num_threads(1)  # one process per core: no oversubscription
    _WORKER = _Processor(options)


def _worker_run(unit: Unit) -> UnitResult:
    return _WORKER(unit)


# ============================================================================ writing


class _HashingFile:
    """A write-only file that also computes the SHA-256 of what goes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)


class _ShardWriter:
    """Writes one split's shards: ``<split>-NNNNNN.tar`` under a temporary name first."""

    def __init__(
        self, out: Path, split: str, prefix: str, first_index: int, samples_per_shard: int
    ):
        self.out, self.split, self.prefix = out, split, prefix
        self.index, self.capacity = first_index, samples_per_shard
        self.tar = self.file = self.hasher = None
        self.count = 0

    @property
    def name(self) -> str:
        return f"{self.split}/{self.split}-{self.prefix}{self.index:06d}.tar"

    def add(self, sample: dict) -> None:
        if self.tar is None:
            path = self.out / self.name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path.with_name(f".{path.name}.partial"), "wb")
            self.hasher = _HashingFile(self.file)
            self.tar = tarfile.open(fileobj=self.hasher, mode="w|", format=tarfile.USTAR_FORMAT)
        for ext, data in sample["files"].items():
            info = tarfile.TarInfo(f"{sample['key']}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed: byte-identical reruns
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def finish(self) -> dict | None:
        """Complete the current shard and rename it into place; its manifest entry."""
        if self.tar is None:
            return None
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        path = self.out / self.name
        os.replace(path.with_name(f".{path.name}.partial"), path)
        entry = {"path": self.name, "samples": self.count, "sha256": self.hasher.sha.hexdigest()}
        self.tar = self.file = self.hasher = None
        self.count = 0
        self.index += 1
        return entry


def _part_name(shard_index: int, num_shards: int) -> str:
    return f"{shard_index:05d}-of-{num_shards:05d}"


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _new_state() -> dict:
    return {
        "next_unit": 0,
        "samples_done": 0,
        "splits": {},
        "skipped": [],
        "counts": {},
        "landmarks_sum": None,
        "landmarks_count": 0,
        "feature_dim": None,
    }


def prepare(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    encoder: str = "dlib",
    samples_per_shard: int = SAMPLES_PER_SHARD,
    *,
    encoder_weights: str | os.PathLike | None = None,
    detector: str = "hog",
    frames_per_video: int = FRAMES_PER_VIDEO,
    crops_per_sample: int = CROPS_PER_SAMPLE,
    progress: bool = True,
) -> dict:
    """Turn a dataset into WebDataset shards under ``out`` (module docstring, docs/data.md).

    dataset: "voxceleb1", "voxceleb2" or "avspeech"; root: its folder.
    workers: processes decoding, detecting and embedding in parallel (videos).
    shard_index, num_shards: this run takes the videos whose stable hash is
        ``shard_index`` mod ``num_shards`` (a cluster job array runs every index).
    encoder: face encoder name (``face_encoders.load_face_encoder``).
    samples_per_shard: samples per tar shard (the last shard of a split may hold fewer).
    Resumable: rerun with the same arguments after a crash or kill to continue.

    Returns this run's part manifest (dict). When every part of the ``num_shards`` is
    complete, ``out/manifest.json`` is written too (:func:`merge_manifests`).
    Raises DataError for a bad folder, and when ``out`` holds a run with other arguments.
    """
    from tqdm import tqdm

    if not 0 <= shard_index < num_shards:
        raise DataError(None, f"--shard-index {shard_index} is not in [0, {num_shards})")
    if samples_per_shard < 1 or workers < 1 or crops_per_sample < 1 or frames_per_video < 1:
        raise DataError(None, "samples per shard, workers, crops and frames must be >= 1")
    from speech2face.errors import ConfigError
    from speech2face.face_encoders import ENCODERS

    if encoder not in ENCODERS:
        raise ConfigError(None, f"unknown face encoder {encoder!r}; expected one of {ENCODERS}")
    out = Path(out)
    options = Options(
        dataset=dataset,
        encoder=encoder,
        encoder_weights=None if encoder_weights is None else str(encoder_weights),
        detector=detector,
        crops_per_sample=crops_per_sample,
        frames_per_video=frames_per_video,
        samples_per_shard=samples_per_shard,
    )
    all_units = list_units(dataset, root, frames_per_video)
    units = [u for u in all_units if stable_hash(u.key) % num_shards == shard_index]
    part = _part_name(shard_index, num_shards)
    run_id = {
        "format": FORMAT_VERSION,
        "options": asdict(options),
        "part": part,
        "units": _fingerprint([asdict(u) for u in units]),
    }
    run_id["options"].pop("encoder_weights")  # where the weights lie is not what they are
    parts = out / PARTS_DIR
    part_manifest_path = parts / f"manifest-{part}.json"
    progress_path = parts / f"progress-{part}.json"

    if part_manifest_path.is_file():
        done = json.loads(part_manifest_path.read_text())
        if done.get("run") != run_id:
            raise DataError(
                out, f"holds part {part} prepared with other arguments or inputs; use a new --out"
            )
        _maybe_merge(out, num_shards)
        return done
    state = _new_state()
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        if saved.get("run") != run_id:
            raise DataError(
                out,
                f"holds an unfinished part {part} with other arguments or inputs; "
                "use a new --out or rerun with the same arguments",
            )
        state = saved["state"]
    elif (
        out.is_dir() and any(p for p in out.iterdir() if p.name != PARTS_DIR) and not parts.is_dir()
    ):
        raise DataError(out, "output folder exists, is not empty and is not a prepare output")
    prefix = "" if num_shards == 1 else f"p{shard_index:05d}-"
    _remove_partials(out, prefix)

    def checkpoint(next_unit: int, samples_done: int) -> None:
        if next_unit < len(units) and samples_done >= n_samples.get(next_unit, math.inf):
            next_unit, samples_done = next_unit + 1, 0
        state["next_unit"], state["samples_done"] = next_unit, samples_done
        with atomic_write(progress_path, "w") as f:
            json.dump({"run": run_id, "state": state}, f)

    n_samples: dict[int, int] = {}
    start, drop_first = state["next_unit"], state["samples_done"]
    writer: _ShardWriter | None = None
    counts = Counter(state["counts"])
    bar = tqdm(
        total=len(units),
        initial=start,
        desc=f"prepare {dataset} [{part}]",
        unit="video",
        disable=not progress,
    )
    results = _results(units[start:], options, workers)
    try:
        for index, result in enumerate(results, start):
            unit = units[index]
            n_samples[index] = len(result.samples)
            drop = drop_first if index == start else 0
            todo = result.samples[drop:]
            if todo and writer is not None and writer.split != unit.split:
                _finish(writer, state)
                checkpoint(index, 0)
                writer = None
            if drop == 0:  # this unit's skips and counts are not recorded yet
                state["skipped"].extend([item, reason] for item, reason in result.skipped)
                counts.update(result.counts)
                state["counts"] = dict(counts)
            for j, sample in enumerate(todo, drop):
                if writer is None:
                    done = state["splits"].setdefault(unit.split, {"shards": []})
                    writer = _ShardWriter(
                        out, unit.split, prefix, len(done["shards"]), samples_per_shard
                    )
                writer.add(sample)
                _record_sample(state, unit.split, sample)
                if writer.full:
                    _finish(writer, state)
                    checkpoint(index, j + 1)
            bar.update(1)
        if writer is not None:
            _finish(writer, state)
        checkpoint(len(units), 0)
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
    manifest = _part_manifest(state, run_id, options, dataset, part)
    with atomic_write(part_manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    progress_path.unlink(missing_ok=True)
    _maybe_merge(out, num_shards)
    return manifest


def _results(units: list[Unit], options: Options, workers: int) -> Iterator[UnitResult]:
    """Process units in order; with workers > 1 in a process pool, still yielded in order."""
    if workers == 1 or len(units) <= 1:
        processor = _Processor(options)
        return (processor(u) for u in units)
    import multiprocessing as mp

    # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would break.
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(options,))

    def generate():
        try:
            yield from pool.imap(_worker_run, units, chunksize=1)
        finally:
            pool.terminate()
            pool.join()

    return generate()


def _record_sample(state: dict, split: str, sample: dict) -> None:
    done = state["splits"][split]
    done["samples"] = done.get("samples", 0) + 1
    identities = done.setdefault("identity_set", [])
    if not identities or identities[-1] != sample["identity"]:  # samples come sorted by identity
        identities.append(sample["identity"])
    if split == "train":
        lm = np.asarray(sample["landmarks"], dtype=np.float64)
        total = lm if state["landmarks_sum"] is None else np.asarray(state["landmarks_sum"]) + lm
        state["landmarks_sum"] = total.tolist()
        state["landmarks_count"] += 1
    if state["feature_dim"] is None:
        state["feature_dim"] = int(np.load(io.BytesIO(sample["files"]["feature.npy"])).shape[0])


def _finish(writer: _ShardWriter, state: dict) -> None:
    entry = writer.finish()
    if entry is not None:
        state["splits"][writer.split]["shards"].append(entry)


def _remove_partials(out: Path, prefix: str) -> None:
    """Delete the temporary shards that a killed run of this part left behind."""
    if not out.is_dir():
        return
    for split_dir in _subdirs(out):
        pattern = re.compile(
            rf"\.{re.escape(split_dir.name)}-{re.escape(prefix)}\d{{6}}\.tar\.partial"
        )
        for path in split_dir.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _part_manifest(state: dict, run_id: dict, options: Options, dataset: str, part: str) -> dict:
    splits = {}
    for split, done in state["splits"].items():
        splits[split] = {
            "samples": done.get("samples", 0),
            "identities": done.get("identity_set", []),
            "shards": done["shards"],
        }
    return {
        "format": FORMAT_VERSION,
        "run": run_id,
        "part": part,
        "dataset": dataset,
        "encoder": options.encoder,
        "feature_dim": state["feature_dim"],
        "samples_per_shard": options.samples_per_shard,
        "crops_per_sample": options.crops_per_sample,
        "seconds": options.seconds,
        "splits": splits,
        "counts": state["counts"],
        "skipped": state["skipped"],
        "landmarks_sum": state["landmarks_sum"],
        "landmarks_count": state["landmarks_count"],
    }


def _maybe_merge(out: Path, num_shards: int) -> None:
    paths = [
        out / PARTS_DIR / f"manifest-{_part_name(i, num_shards)}.json" for i in range(num_shards)
    ]
    if all(p.is_file() for p in paths):
        merge_manifests(out, num_shards)


def merge_manifests(out: str | os.PathLike, num_shards: int | None = None) -> dict:
    """Merge the part manifests of ``out/parts`` into ``out/manifest.json`` and return it.

    Shards are listed part by part; identities, skipped inputs and counts are merged
    (sorted), the mean landmarks are the landmark sum over all training crops divided by
    their number. Raises DataError when a part is missing or parts disagree.
    """
    out = Path(out)
    parts_dir = out / PARTS_DIR
    found = sorted(parts_dir.glob("manifest-*-of-*.json")) if parts_dir.is_dir() else []
    if num_shards is None:
        if not found:
            raise DataError(out, "no part manifests to merge (run prepare first)")
        num_shards = int(found[0].stem.rsplit("-of-", 1)[1])
    parts = []
    for i in range(num_shards):
        path = parts_dir / f"manifest-{_part_name(i, num_shards)}.json"
        if not path.is_file():
            raise DataError(path, f"part {i} of {num_shards} is not complete yet")
        parts.append(json.loads(path.read_text()))
    first = parts[0]
    for p in parts[1:]:
        if p["run"]["options"] != first["run"]["options"]:
            raise DataError(out, "part manifests were prepared with different arguments")
    feature_dims = {p["feature_dim"] for p in parts if p["feature_dim"] is not None}
    if len(feature_dims) > 1:
        raise DataError(out, f"parts disagree on the feature size: {sorted(feature_dims)}")
    splits: dict[str, dict] = {}
    for split in SPLITS:
        entries = [p["splits"][split] for p in parts if split in p["splits"]]
        if entries:
            splits[split] = {
                "samples": sum(e["samples"] for e in entries),
                "identities": sorted({i for e in entries for i in e["identities"]}),
                "shards": [s for e in entries for s in e["shards"]],
            }
    counts: Counter = Counter()
    for p in parts:
        counts.update(p["counts"])
    skipped = sorted({(item, reason) for p in parts for item, reason in p["skipped"]})
    total = sum(p["landmarks_count"] for p in parts)
    mean = None
    if total:
        mean = sum(np.asarray(p["landmarks_sum"]) for p in parts if p["landmarks_count"]) / total
        mean = np.asarray(mean, dtype=np.float32).tolist()
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": first["dataset"],
        "encoder": first["encoder"],
        "feature_dim": next(iter(feature_dims), None),
        "samples_per_shard": first["samples_per_shard"],
        "crops_per_sample": first["crops_per_sample"],
        "seconds": first["seconds"],
        "num_parts": num_shards,
        "identities": sorted({i for s in splits.values() for i in s["identities"]}),
        "splits": splits,
        "counts": dict(sorted(counts.items())),
        "skipped": [{"item": item, "reason": reason} for item, reason in skipped],
        "skipped_by_reason": dict(sorted(Counter(reason for _, reason in skipped).items())),
        "mean_landmarks": mean,
    }
    with atomic_write(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    """Read ``manifest.json`` (``path`` is the file or the folder holding it).

    Adds ``"root"``: the folder that shard paths are relative to. Raises DataError for a
    missing or malformed manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        hint = (
            " (prepare not finished: some parts missing?)"
            if (path.parent / PARTS_DIR).is_dir()
            else ""
        )
        raise DataError(path, f"manifest not found{hint}")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise DataError(path, f"unsupported manifest format {manifest.get('format')!r}")
        for key in ("splits", "identities", "feature_dim", "encoder"):
            manifest[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(path, f"malformed manifest ({type(error).__name__}: {error})") from None
    manifest["root"] = str(path.parent)
    return manifest


def verify_shards(path: str | os.PathLike) -> list[str]:
    """Shards whose SHA-256 does not match the manifest (empty when all are intact)."""
    manifest = load_manifest(path)
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            file = Path(manifest["root"]) / shard["path"]
            digest = hashlib.sha256()
            try:
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                        digest.update(block)
            except OSError:
                bad.append(shard["path"])
                continue
            if digest.hexdigest() != shard["sha256"]:
                bad.append(shard["path"])
    return bad


# ============================================================================== loading


def iterate_tar(path: str | os.PathLike) -> Iterator[dict]:
    """The samples of one WebDataset shard: ``{"__key__": key, ext: bytes, ...}``.

    Members are grouped by key (the path up to the first dot of the file name), as
    WebDataset does. Raises DataError naming the shard when it is not a readable tar.
    """
    sample: dict | None = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key}
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        raise DataError(path, f"unreadable shard ({error})") from None
    if sample is not None:
        yield sample


def decode_sample(raw: dict, seconds: float = CLIP_SECONDS, crop: int = 0) -> dict:
    """Decode one raw sample: ``wave (N,)`` float32 (fitted to ``seconds``), ``face``
    uint8 ``(224, 224, 3)``, ``landmarks (68, 2)``, ``feature (D,)`` and ``meta``.

    crop: which stored crop to use (0: ``face.jpg``; k: ``face.k.jpg``).
    """
    import soundfile as sf

    from speech2face.audio import fit_duration

    suffix = "" if crop == 0 else f".{crop}"
    try:
        wave, _ = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
        return {
            "wave": fit_duration(wave, seconds),
            "face": _decode_jpeg(raw[f"face{suffix}.jpg"]),
            "landmarks": np.load(io.BytesIO(raw[f"landmarks{suffix}.npy"]), allow_pickle=False),
            "feature": np.load(io.BytesIO(raw[f"feature{suffix}.npy"]), allow_pickle=False),
            "meta": json.loads(raw["json"]),
        }
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        raise DataError(
            raw.get("__key__"), f"undecodable sample ({type(error).__name__}: {error})"
        ) from None


def collate(samples: list[dict], identity_index: dict[str, int], spectrogram: bool = False) -> dict:
    """Stack decoded samples into the batch of docs/architecture.md "Shards".

    Returns ``wave (B, N)`` (or ``spectrogram (B, 2, T, 257)``), ``feature (B, D)``,
    ``face (B, 3, 224, 224)`` float in [0, 1], ``landmarks (B, 68, 2)``,
    ``identity_index (B,)`` int64 and ``meta`` (list of dicts).
    """
    wave = torch.from_numpy(np.stack([s["wave"] for s in samples]))
    batch = {
        "feature": torch.from_numpy(np.stack([s["feature"] for s in samples])),
        "face": torch.from_numpy(np.stack([s["face"] for s in samples]))
        .permute(0, 3, 1, 2)
        .float()
        .div_(255.0),
        "landmarks": torch.from_numpy(np.stack([s["landmarks"] for s in samples])),
        "identity_index": torch.tensor([identity_index[s["meta"]["identity"]] for s in samples]),
        "meta": [s["meta"] for s in samples],
    }
    if spectrogram:
        from speech2face.audio import spectrogram as compute

        batch["spectrogram"] = compute(wave)
    else:
        batch["wave"] = wave
    return batch


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams one split of prepared shards as batches (or single samples).

    Reading is split by shard: with ``world_size`` ranks (from torch.distributed when it
    is initialised) and ``num_workers`` DataLoader workers, reader
    ``rank * num_workers + worker`` takes every ``world_size * num_workers``-th shard of
    the (per-epoch shuffled) shard list, so no sample is read twice. When the number of
    shards does not divide evenly, the first readers get one shard more (and a reader
    beyond the number of shards gets none): in a finite pass ranks then see different
    numbers of batches. For DDP training use ``repeat=True`` and a fixed number of steps.

    Each reader shuffles with a buffer of ``shuffle`` samples (0: file order), decodes,
    fits audio to ``seconds``, and (with ``batch_size``) collates, computing spectrograms
    in the worker process when ``spectrogram=True``.

    path: the prepare output folder or its manifest.json. split: "train", "val" or "test".
    random_crop: pick one of the stored crops at random (with ``crops_per_sample > 1``).
    """

    def __init__(
        self,
        path,
        split: str = "train",
        *,
        batch_size: int | None = None,
        shuffle: int = 0,
        seed: int = 0,
        seconds: float = CLIP_SECONDS,
        spectrogram: bool = False,
        repeat: bool = False,
        drop_last: bool = False,
        random_crop: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.manifest = load_manifest(path)
        if split not in self.manifest["splits"]:
            raise DataError(
                Path(self.manifest["root"]) / MANIFEST,
                f"no {split!r} split (has {sorted(self.manifest['splits'])})",
            )
        self.split = split
        self.root = Path(self.manifest["root"])
        self.shards = [self.root / s["path"] for s in self.manifest["splits"][split]["shards"]]
        self.num_samples = self.manifest["splits"][split]["samples"]
        self.identity_index = {
            identity: i for i, identity in enumerate(self.manifest["identities"])
        }
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.seconds, self.spectrogram, self.repeat = seconds, spectrogram, repeat
        self.drop_last, self.random_crop = drop_last, random_crop
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently in the next pass (as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if ready else 0) if rank is None else rank
            world = (dist.get_world_size() if ready else 1) if world is None else world
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return rank * workers + worker, world * workers

    def shards_for(self, reader: int, readers: int, epoch: int) -> list[Path]:
        """The shards a reader reads in an epoch (shuffled by epoch when shuffling)."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return [self.shards[i] for i in order[reader::readers]]

    def samples(self) -> Iterator[dict]:
        """Decoded single samples of this reader (all epochs when ``repeat``)."""
        reader, readers = self._reader()
        if (
            reader >= len(self.shards)
            and len(self.shards) > 0
            and not getattr(self, "_warned", False)
        ):
            self._warned = True
            warnings.warn(
                f"reader {reader} of {readers} has no shard to read ({len(self.shards)} shards)",
                stacklevel=2,
            )
        epoch = self.epoch
        while True:
            rng = np.random.default_rng([self.seed, epoch, reader])
            buffer: list[dict] = []
            for shard in self.shards_for(reader, readers, epoch):
                for raw in iterate_tar(shard):
                    if self.shuffle <= 1:
                        yield self._decode(raw, rng)
                        continue
                    if len(buffer) < self.shuffle:
                        buffer.append(raw)
                        continue
                    i = int(rng.integers(len(buffer)))
                    buffer[i], raw = raw, buffer[i]
                    yield self._decode(raw, rng)
            rng.shuffle(buffer)
            for raw in buffer:
                yield self._decode(raw, rng)
            epoch += 1
            if not self.repeat or not self.shards:
                return

    def _decode(self, raw: dict, rng: np.random.Generator) -> dict:
        crop = 0
        if self.random_crop:
            n = sum(1 for k in raw if k.startswith("face") and k.endswith(".jpg"))
            crop = int(rng.integers(n)) if n > 1 else 0
        return decode_sample(raw, self.seconds, crop)

    def __iter__(self) -> Iterator[dict]:
        if self.batch_size is None:
            for sample in self.samples():
                yield collate([sample], self.identity_index, self.spectrogram)
            return
        batch: list[dict] = []
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch, self.identity_index, self.spectrogram)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch, self.identity_index, self.spectrogram)


def make_loader(
    path,
    split: str = "train",
    batch_size: int = 8,
    num_workers: int = 0,
    *,
    pin_memory: bool = False,
    **dataset_options,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ShardDataset`; batching happens in the worker processes.

    dataset_options: passed to ShardDataset (shuffle, seed, spectrogram, repeat, ...).
    """
    dataset = ShardDataset(path, split, batch_size=batch_size, **dataset_options)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0 and dataset.repeat,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def load_split(
    path,
    split: str = "test",
    *,
    seconds: float = CLIP_SECONDS,
    spectrogram: bool = False,
    max_samples: int | None = None,
    batch_size: int = 64,
) -> dict:
    """A whole (small) split in memory, in manifest order: one batch dict (see :func:`collate`).

    For evaluation: no shuffling, single process. ``max_samples`` stops early.
    """
    dataset = ShardDataset(
        path,
        split,
        batch_size=batch_size,
        seconds=seconds,
        spectrogram=spectrogram,
        rank=0,
        world_size=1,
    )
    batches, n = [], 0
    for batch in dataset:
        batches.append(batch)
        n += len(batch["meta"])
        if max_samples is not None and n >= max_samples:
            break
    if not batches:
        raise DataError(
            Path(dataset.manifest["root"]) / MANIFEST, f"split {split!r} has no samples"
        )
    merged = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k != "meta"}
    merged["meta"] = [m for b in batches for m in b["meta"]]
    if max_samples is not None:
        merged = {k: v[:max_samples] for k, v in merged.items()}
    return merged


# ================================================================================== CLI


def add_prepare_arguments(parser) -> None:
    parser.add_argument(
        "dataset",
        nargs="?",
        choices=DATASETS,
        help="which dataset layout to read (not with --merge)",
    )
    parser.add_argument("--root", help="the dataset's folder (layouts: docs/data.md)")
    parser.add_argument(
        "-o", "--out", required=True, help="output folder for shards and manifest.json"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes working on videos (default 1)"
    )
    parser.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="this machine's index in [0, --num-shards) (default 0)",
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="machines splitting the videos between them (default 1)",
    )
    parser.add_argument(
        "--encoder", default="dlib", help="face encoder for the stored features (default dlib)"
    )
    parser.add_argument(
        "--encoder-weights", default=None, help="weights file for the face encoder (vggface)"
    )
    parser.add_argument(
        "--detector", default="hog", choices=("hog", "cnn"), help="dlib face detector (default hog)"
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=SAMPLES_PER_SHARD,
        help=f"samples per tar shard (default {SAMPLES_PER_SHARD})",
    )
    parser.add_argument(
        "--frames-per-video",
        type=int,
        default=FRAMES_PER_VIDEO,
        help=f"face frames used per video (default {FRAMES_PER_VIDEO})",
    )
    parser.add_argument(
        "--crops-per-sample",
        type=int,
        default=CROPS_PER_SAMPLE,
        help=f"face crops stored with each clip (default {CROPS_PER_SAMPLE})",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="only merge the finished parts' manifests into manifest.json",
    )


def prepare_command(args) -> int:
    start = time.perf_counter()
    if args.merge:
        manifest = merge_manifests(args.out)
    elif args.dataset is None or args.root is None:
        raise DataError(None, "give the dataset and --root (or --merge to merge finished parts)")
    else:
        part = prepare(
            args.dataset,
            args.root,
            args.out,
            workers=args.workers,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            encoder=args.encoder,
            samples_per_shard=args.samples_per_shard,
            encoder_weights=args.encoder_weights,
            detector=args.detector,
            frames_per_video=args.frames_per_video,
            crops_per_sample=args.crops_per_sample,
        )
        manifest = part
    sizes = ", ".join(f"{s}: {v['samples']}" for s, v in manifest["splits"].items())
    skipped = len(manifest["skipped"])
    print(
        f"{args.out}: samples {sizes or 'none'}; {skipped} inputs skipped "
        f"({time.perf_counter() - start:.1f} s)"
    )
    if (Path(args.out) / MANIFEST).is_file() and not args.merge:
        print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0
