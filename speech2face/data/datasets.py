"""Dataset readers: VoxCeleb1, VoxCeleb2 and AVSpeech folders as lists of work units.

A work unit is a video (:class:`Unit`): its identity, split, speech clips and face frames.
The listers read the published layouts (docs/data.md) and decide the identity-disjoint
splits; nothing here decodes audio or images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speech2face.audio import AUDIO_SUFFIXES, MIN_SECONDS, VIDEO_SUFFIXES
from speech2face.errors import DataError

DATASETS = ("voxceleb1", "voxceleb2", "avspeech")
SPLITS = ("train", "val", "test")
CLIP_SECONDS = 6.0  # paper section 3.1: 6 s of speech per example
FRAMES_PER_VIDEO = 4  # face frames used per video (evenly spaced)
# Validation identities carved from the training ("dev") identities: this fraction,
# chosen by a hash of the identity so that every machine and rerun agrees.
VAL_FRACTION = 0.05
# VoxCeleb1's official verification split: test identities id10270 - id10309.
VOX1_TEST_IDENTITIES = frozenset(f"id{n}" for n in range(10270, 10310))
# The values of the metadata's Set column (vox1_meta.csv, vox2_meta.csv), case aside.
VOXCELEB_SETS = ("dev", "test")
SPLIT_FILE = "identity_split.csv"  # optional: identity,split (train/val/test) overrides
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
SEGMENTS_DIR = "segments"  # AVSpeech segment files (speech2face download)


# ============================================================================ work units


@dataclass(frozen=True)
class Clip:
    """One speech clip: a file, or the segment [start, end) seconds of one."""

    name: str
    path: str
    start: float = 0.0
    end: float | None = None
    offset: float = 0.0  # where ``path`` starts in the source video (AVSpeech segment files)


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
    # clips the dataset lists that the folder lacks (AVSpeech segments not downloaded)
    missing: tuple[str, ...] = ()

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


def _read_text(path: Path) -> str:
    """A metadata file's text; DataError naming it when it is not a readable UTF-8 file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except IsADirectoryError:
        raise DataError(path, "is a folder, expected a table") from None
    except UnicodeDecodeError:
        raise DataError(path, "is not UTF-8 text (a binary file?)") from None
    except OSError as error:
        raise DataError(path, f"unreadable ({error.strerror or error})") from None


def _read_table(path: Path, required: Sequence[Sequence[str]] = ()) -> list[dict[str, str]]:
    """A CSV or tab-separated table with a header; keys and values stripped.

    required: for each needed column, the names it may have (case-insensitive); a header
    without one of them is an error naming the file.
    """
    text = _read_text(path)
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if "\t" in first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if any("\n" in field or "\r" in field for field in row):
                raise DataError(path, f"line {reader.line_num}: a field runs over several "
                                      "lines (an unbalanced '\"'?)")
            rows.append(row)
    except csv.Error as error:
        raise DataError(path, f"line {reader.line_num}: not a table row ({error})") from None
    if not rows:
        raise DataError(path, "empty table")
    header = [h.strip() for h in rows[0]]
    lowered = {h.lower() for h in header}
    for names in required:
        if not lowered & {n.lower() for n in names}:
            raise DataError(path, f"no {names[0]!r} column in the header {header[:6]} "
                                  "(layouts: docs/data.md)")
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
    for row in _read_table(path, required=[("identity", "id"), ("split", "set")]):
        identity, split = _column(row, "identity", "id"), _column(row, "split", "set")
        if not identity or split not in SPLITS:
            raise DataError(path, f"bad row {row}: expected identity and a split in {SPLITS}")
        if splits.setdefault(identity, split) != split:
            raise DataError(path, f"{identity} is given two splits, {splits[identity]} and "
                                  f"{split}: keep one row")
    return splits


def _assign_splits(root: Path, meta: dict[str, dict], test_of) -> dict[str, str]:
    """identity -> split: the split file if present, else official test + carved validation."""
    split_file = root / SPLIT_FILE
    if split_file.exists():
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


# Files and folders a lister passes over, with the reason: each becomes a skipped unit
# (:func:`_unlisted`), so that the run's report names what it did not read.
Unread = list[tuple[Path, str]]

NOT_READABLE = "not a readable file (a broken link, a link loop, a FIFO or a device)"


def _utf8(path: Path, bad: Unread | None) -> bool:
    """Whether the name is valid UTF-8 (it becomes a key and JSON); if not, noted in ``bad``."""
    try:
        path.name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        if bad is not None:
            bad.append((path, "name is not valid UTF-8"))
        return False


def _files(folder: Path, suffixes: Sequence[str], bad: Unread | None = None) -> list[Path]:
    files = []
    for p in folder.iterdir():
        if p.suffix.lower() not in suffixes or not _utf8(p, bad):
            continue
        if p.is_file():
            files.append(p)
        elif not p.is_dir() and bad is not None:
            bad.append((p, NOT_READABLE))
    return sorted(files)


def _subdirs(folder: Path, bad: Unread | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _utf8(p, bad))


def _unlisted(bad: Unread) -> list[Unit]:
    """Skipped units for what a lister passed over (names shown escaped)."""
    units = []
    for path, reason in sorted(set(bad)):
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        units.append(Unit(shown, "", None, None, (), (), skip=reason))
    return units


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
    for row in _read_table(meta_path, required=[(id_column, "id")]):
        identity = _column(row, id_column, "id")
        if identity:
            found = {
                "gender": (_column(row, "Gender") or "").lower() or None,
                "set": (_column(row, "Set") or "").lower(),
                **{key: _column(row, *columns) for key, columns in extra.items()},
            }
            if found["set"] not in ("", *VOXCELEB_SETS):
                raise DataError(meta_path, f"{identity}: unknown Set {_column(row, 'Set')!r} "
                                           f"(expected {' or '.join(VOXCELEB_SETS)})")
            if meta.setdefault(identity, found) != found:
                raise DataError(meta_path, f"{identity} has two rows that differ: keep one")
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
    bad: Unread = []
    faces_root = _find(root, "unzippedFaces")
    if faces_root is None:
        raise DataError(root, "no unzippedFaces/ folder (VoxCeleb1's face frames: "
                              "unzippedFaces/<VGGFace1 ID>/1.6/<video>/<frame>.jpg)")
    clips: dict[tuple[str, str], list[Clip]] = {}
    for wav_root in wav_roots:
        for id_dir in _subdirs(wav_root, bad):
            for video_dir in _subdirs(id_dir, bad):
                files = _files(video_dir, AUDIO_SUFFIXES, bad)
                clips.setdefault((id_dir.name, video_dir.name), []).extend(
                    Clip(p.stem, str(p)) for p in files
                )
    frames: dict[tuple[str, str], list[Frame]] = {}
    name_to_id = {m["name"]: i for i, m in meta.items()}
    for name_dir in _subdirs(faces_root, bad):
        identity = name_to_id.get(name_dir.name)
        if identity is None:
            continue
        # Videos under the crop-scale folder ("1.6" in the release); the first
        # scale folder in sorted order wins when there are several.
        seen = set()
        for scale_dir in _subdirs(name_dir, bad):
            for video_dir in _subdirs(scale_dir, bad):
                if video_dir.name in seen:
                    continue
                seen.add(video_dir.name)
                images = _files(video_dir, FRAME_SUFFIXES, bad)
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
    return units + _unlisted(bad)


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
    if not (root / SPLIT_FILE).exists() and meta and all(not m["set"] for m in meta.values()):
        raise DataError(meta_path, f"has no 'Set' column (dev/test): the test identities are "
                                   f"not known; add it, or a {SPLIT_FILE}")
    unset = [i for i, m in meta.items() if not m["set"]]
    if not (root / SPLIT_FILE).exists() and unset:
        raise DataError(meta_path, f"{unset[0]}: no Set value (expected dev or test)")
    splits = _assign_splits(root, meta, lambda i: meta[i]["set"] == "test")
    bad: Unread = []

    def collect(roots, suffixes):
        found: dict[tuple[str, str], list[Path]] = {}
        for r in roots:
            for id_dir in _subdirs(r, bad):
                for video_dir in _subdirs(id_dir, bad):
                    found.setdefault((id_dir.name, video_dir.name), []).extend(
                        _files(video_dir, suffixes, bad)
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
    return units + _unlisted(bad)


def _video_unit(identity: str, video: str, clips: tuple, frames: tuple, meta: dict,
                splits: dict, meta_name: str, no_frames: str) -> Unit:
    """A VoxCeleb video as a unit, or as a skipped one with the reason."""
    if identity not in meta:
        return Unit(identity, video, None, None, clips, frames,
                    skip=f"no metadata row for {identity} in {meta_name}")
    if identity not in splits:
        return Unit(identity, video, None, None, clips, frames,
                    skip=f"{identity} is not in {SPLIT_FILE}")
    reason = None
    if not clips:
        reason = "video has no audio clips"
    elif not frames:
        reason = no_frames
    return Unit(identity, video, None if reason else splits[identity], meta[identity]["gender"],
                clips, frames, skip=reason)


def list_avspeech(root: str | os.PathLike, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """The videos of an AVSpeech folder: ``avspeech_{train,test}.csv`` (rows: YouTube
    id, start s, end s, face centre x, y as fractions) and ``videos/<id>.<ext>``, or
    ``segments/<id>/<clip>.mkv`` (one file per segment, as ``speech2face download`` writes).

    Each video is its own identity here (prepare merges the videos of one person:
    ``identities.merge_units``). Its segments are the video's clips.
    """
    root = Path(root)
    tables = {split: root / f"avspeech_{split}.csv" for split in ("train", "test")}
    for path in tables.values():
        if path.exists() and not path.is_file():
            raise DataError(path, "is not a file, expected an AVSpeech CSV")
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
    for row in read_avspeech_csvs((p, split) for split, p in tables.items() if p.is_file()):
        segments.setdefault(row.video, []).append((row.start, row.end, row.x, row.y))
        # A video with segments in both CSVs is test: never train on a test video.
        split_of[row.video] = "test" if "test" in (row.split, split_of.get(row.video)) \
            else row.split
    if not segments:
        raise DataError(root, "avspeech_train.csv and avspeech_test.csv hold no rows")
    overrides = _read_split_file(root / SPLIT_FILE) if (root / SPLIT_FILE).exists() else {}
    val = _carve_validation([v for v, s in split_of.items() if s == "train"])
    units = []
    for ytid in sorted(segments):
        split = overrides.get(ytid) or ("val" if ytid in val else split_of[ytid])
        segs = sorted(segments[ytid])
        path = downloaded.get(ytid)
        if path is not None:
            clips = tuple(Clip(segment_name(s), str(path), s, e) for s, e, _, _ in segs)
            frames = tuple(
                Frame(str(path), (s + e) / 2, (x, y))
                for s, e, x, y in _evenly(segs, frames_per_video)
            )
        else:  # segment files, each timed from its segment's start
            files = {s: root / SEGMENTS_DIR / ytid / f"{segment_name(s)}.mkv" for s, *_ in segs}
            missing = tuple(segment_name(s) for s, *_ in segs if not files[s].is_file())
            segs = [seg for seg in segs if files[seg[0]].is_file()]
            clips = tuple(
                Clip(segment_name(s), str(files[s]), 0.0, e - s, offset=s) for s, e, _, _ in segs
            )
            frames = tuple(
                Frame(str(files[s]), (e - s) / 2, (x, y))
                for s, e, x, y in _evenly(segs, frames_per_video)
            )
        if not clips:
            units.append(Unit(ytid, ytid, None, None, (), (), skip="video not downloaded",
                              missing=tuple(segment_name(s) for s, *_ in segments[ytid])))
            continue
        units.append(Unit(ytid, ytid, split, None, clips, frames,
                          missing=() if path is not None else missing))
    return units


# An AVSpeech id becomes a folder and a file name: YouTube ids are 11 of [A-Za-z0-9_-].
AVSPEECH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)  # millions of them: no __dict__ each
class AvspeechSegment:
    """One AVSpeech CSV row: ``[start, end)`` seconds of a video, the face centre as
    fractions of the frame, the split of its CSV and where it is ("file:line")."""

    video: str
    start: float
    end: float
    x: float
    y: float
    split: str
    row: str = field(compare=False)  # "file:line", for messages

    @property
    def clip(self) -> str:
        """The segment's clip name (``segment_name``)."""
        return segment_name(self.start)

    @property
    def key(self) -> str:
        return f"{self.video}/{self.clip}"

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2


def read_avspeech_csvs(tables: Iterable[tuple[str | os.PathLike, str]]) -> list[AvspeechSegment]:
    """The rows of AVSpeech CSVs, ``(path, split)`` pairs, validated: the one reader of
    ``download avspeech`` and ``prepare avspeech``.

    Blank lines are skipped. Anything else that is not ``id,start,end,x,y`` with an id of
    ``[A-Za-z0-9_-]``, ``0 <= start < end`` and ``x, y`` in ``[0, 1]`` is a DataError
    naming the file and line. A row repeated exactly (in any of the CSVs) is one segment;
    two rows for one segment (same id, same start to the ms) that differ otherwise are
    refused, naming both lines.
    """
    segments: list[AvspeechSegment] = []
    seen: dict[str, AvspeechSegment] = {}
    for path, split in tables:
        path = Path(path)
        rows = csv.reader(io.StringIO(_read_text(path)))
        source = str(path)  # one string shared by the rows' "file:line"
        for line, row in enumerate(_csv_rows(path, rows), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            segment = _avspeech_row(path, source, line, row, split)
            first = seen.setdefault(segment.key, segment)
            if first is segment:
                segments.append(segment)
            elif segment != first:
                raise DataError(
                    path, f"line {line}: segment {segment.key} is also at {first.row} with "
                    "another start, end, face centre or split: keep one of the rows"
                )
    return segments


def _csv_rows(path: Path, rows) -> Iterator[list[str]]:
    """The reader's rows, one at a time (a CSV's rows as lists take ~0.4 kB each)."""
    try:
        yield from rows
    except csv.Error as error:
        raise DataError(path, f"not a CSV text file ({error})") from None


def _avspeech_row(path: Path, source: str, line: int, row: list[str],
                  split: str) -> AvspeechSegment:
    where = f"line {line}"
    shown = ",".join(row)[:80]
    if len(row) != 5:
        raise DataError(
            path, f"{where}: expected 5 columns (YouTube id, start, end, face x, face y; "
            f"no header), got {len(row)}: {shown!r}"
        )
    video = row[0].strip()
    if not AVSPEECH_ID.fullmatch(video):
        raise DataError(path, f"{where}: {video!r} is not a video id (1 to 64 of A-Z a-z "
                        f"0-9 _ -): {shown!r}")
    if any("_" in v for v in row[1:]):  # float() would read "4_0" as 40
        raise DataError(path, f"{where}: start, end, x, y must be plain numbers, without '_': "
                        f"{shown!r}")
    try:
        start, end, x, y = (float(v) for v in row[1:])
    except ValueError:
        hint = " (AVSpeech CSVs have no header row)" if line == 1 else ""
        raise DataError(
            path, f"{where}: start, end, x, y must be numbers: {shown!r}{hint}"
        ) from None
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
        raise DataError(path, f"{where}: need 0 <= start < end, got {start}, {end}")
    if end - start < MIN_SECONDS:  # (download fetched it; prepare then refused its audio)
        raise DataError(path, f"{where}: the segment {start}-{end} s is shorter than "
                              f"{MIN_SECONDS} s, the least audio a clip can have")
    if end > MAX_SEGMENT_SECONDS:  # (1e300 made a 300-digit file name, a traceback)
        raise DataError(path, f"{where}: end {end} s is past {MAX_SEGMENT_SECONDS:,} s, "
                              "longer than any video (YouTube's longest are 12 hours)")
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise DataError(path, f"{where}: face centre x, y must be fractions in [0, 1]: {shown!r}")
    return AvspeechSegment(video, start, end, x, y, sys.intern(split), f"{source}:{line}")


# The latest time a segment may end: segment names hold 9 digits of milliseconds.
MAX_SEGMENT_SECONDS = 999_999


def segment_name(start: float) -> str:
    """An AVSpeech segment's clip name: ``s`` + its start in ms (``s000090000``)."""
    return f"s{int(round(start * 1000)):09d}"


LISTERS = {"voxceleb1": list_voxceleb1, "voxceleb2": list_voxceleb2, "avspeech": list_avspeech}


def list_units(dataset: str, root, frames_per_video: int = FRAMES_PER_VIDEO) -> list[Unit]:
    """All videos of a dataset, in the processing order: by split, identity, video.

    Units skipped before processing (no metadata, nothing downloaded) come last.
    """
    if dataset not in LISTERS:
        raise DataError(None, f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if not Path(root).is_dir():
        exists = Path(root).exists()
        raise DataError(root, "is a file, not the dataset's folder" if exists
                        else "dataset folder not found")
    return processing_order(LISTERS[dataset](root, frames_per_video))


def processing_order(units: Sequence[Unit]) -> list[Unit]:
    """Units by split, identity, video; those skipped before processing last."""
    rank = {s: i for i, s in enumerate(SPLITS)}
    return sorted(units, key=lambda u: (rank.get(u.split, len(SPLITS)), u.identity, u.video))

