"""``speech2face download avspeech``: the part of each AVSpeech segment that ``prepare`` needs.

AVSpeech is published as CSV rows ``YouTube id, start s, end s, face centre x, y`` (no
header; x, y are fractions of the frame). For each row this fetches only the segment's
audio and the video frames around its middle, never the whole video: yt-dlp (as a
library) resolves the video page to its media URLs, and FFmpeg (PyAV) reads those
through ``_RangeReader``, which fetches fixed byte ranges on demand, so that only the
file's index and the ranges the segment spans travel. It writes::

    ROOT/avspeech_train.csv, avspeech_test.csv  the CSVs as given: the split of each video
    ROOT/segments/<id>/s<start ms>.mkv          the segment: its audio (FLAC, 16 kHz mono)
                                                and the frames around its middle (H.264),
                                                timed from the segment's start
    ROOT/segments/<id>/s<start ms>.face.npy     dlib's 128-D descriptor of the speaker's
                                                face at the middle (identity merging)
    ROOT/download_log/shard-<i>-of-<n>.jsonl    one line per failed attempt

which ``speech2face prepare avspeech --root ROOT`` reads as it is (docs/data.md).

Faults. A segment's two files appear together or not at all (``utils.staged_writes``;
the segment renamed into place last), so a segment whose files exist is done, whatever
happened to the run. A stop (Ctrl-C, SIGTERM) ends each thread's video at its next
segment or byte range. A failure is
appended to the log with its kind: permanent ones (private, removed, geo-blocked, no
audio track, no face at the middle...) are not tried again; transient ones (timeout,
network, truncated download, rate limited) are retried by the next run, up to
``max_attempts`` in all. A full disk, or an output that cannot be written, stops the run
with one line naming the file; the rerun continues where it stopped.
``shard_index``/``num_shards`` take the videos whose stable hash is ``shard_index`` mod
``num_shards``, so a job array needs no coordination.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import string
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from speech2face.data.datasets import (
    SEGMENTS_DIR,
    AvspeechSegment,
    read_avspeech_csvs,
    stable_hash,
)
from speech2face.data.identities import DESCRIPTOR_SUFFIX, face_descriptor
from speech2face.errors import ConfigError, DataError
from speech2face.utils import json_records

YOUTUBE_URL = "https://www.youtube.com/watch?v={id}"
LOG_DIR = "download_log"
SEGMENT_SUFFIX = ".mkv"
SPLITS = ("train", "test")
SAMPLE_RATE = 16_000  # what prepare reads (audio.SAMPLE_RATE): resampled once, here
# Frames kept around the middle: prepare reads the middle one; its neighbours are there
# for a detector that misses on one frame (blur, a blink) without a second download.
FRAMES_AROUND_MIDDLE = 3
MAX_HEIGHT = 720  # a talking face in 720p is ~200-300 px: enough for 224 x 224 crops
VIDEO_CRF = 18  # x264 constant quality: visually lossless for the crops
# Media is read over HTTP in byte ranges of this size, so that seeking to a segment costs
# one request and never streams the video up to it (FFmpeg's own http reader reads
# forward rather than seek whenever it judges the connection cheap).
RANGE_BYTES = 256 * 1024
CACHED_RANGES = 16  # per open file: the index at the front and the segment's ranges
MAX_ATTEMPTS = 3  # transient failures of one segment before it is given up
TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 86_400.0  # one day
# --rate-limit, requests a minute: the slowest spaces requests 1000 min (< 1 day) apart.
MIN_RATE_LIMIT, MAX_RATE_LIMIT = 0.001, 1_000_000.0
WORKERS = 4
# yt-dlp error text -> failure kind, first match wins; (kind, transient, lowercase parts).
_FAILURE_KINDS: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    ("private", False, ("private video", "video is private", "members-only", "join this channel")),
    ("geo-blocked", False, ("in your country", "geo restrict", "geo-restrict",
                             "http error 451", "unavailable for legal reasons")),
    ("age-restricted", False, ("confirm your age", "age-restricted", "age restricted")),
    ("rate-limited", True, ("http error 429", "too many requests", "not a bot")),
    # YouTube also answers 403 to a bot check or an expired media link: worth a retry.
    ("forbidden", True, ("http error 403", "forbidden")),
    ("no-format", False, ("requested format is not available", "unsupported url")),
    ("removed", False, (
        "video unavailable", "has been removed", "no longer available", "account associated",
        "terminated", "http error 404", "http error 410", "does not exist",
    )),
    ("timeout", True, ("timed out", "timeout")),
    ("truncated", True, ("invalid data found when processing input",)),
    ("network", True, (
        "connection", "temporary failure", "http error 5", "unreachable", "name resolution",
        "remote end closed", "incomplete read", "ssl", "broken pipe",
    )),
)


# One CSV row (datasets.read_avspeech_csvs, shared with prepare).
Segment = AvspeechSegment


class Failure(Exception):
    """One segment (or a whole video) could not be fetched: kind, transient, message."""

    def __init__(self, kind: str, message: str, transient: bool = False):
        super().__init__(message)
        self.kind, self.message, self.transient = kind, message, transient


def classify(message: str) -> Failure:
    """A failure from an error's text (yt-dlp's, FFmpeg's); unknown ones count as transient."""
    text = message.lower()
    for kind, transient, parts in _FAILURE_KINDS:
        if any(p in text for p in parts):
            return Failure(kind, message, transient)
    return Failure("error", message, transient=True)


# ================================================================================ input


def split_of_csv(path: str | os.PathLike) -> str:
    """"train" or "test" from a CSV's name: ``*_train.csv`` or ``*_test.csv`` (the official
    ``avspeech_train.csv``, ``avspeech_test.csv``) or just ``train.csv``, ``test.csv``, in
    any case."""
    name = "_" + Path(path).name.lower()
    for split in SPLITS:
        if name.endswith(f"_{split}.csv"):
            return split
    raise DataError(path, "cannot tell the split from the name: call it *_train.csv or "
                          "*_test.csv (as the official avspeech_train.csv, avspeech_test.csv)")


def _csv_file(path: str | os.PathLike) -> Path:
    """``path``, refused (DataError) unless it is a file: checked before anything else
    about a CSV, since a mistyped path is the likelier error."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder, expected a CSV file")
    if path.exists() and not path.is_file():
        raise DataError(path, "is not a regular file, expected a CSV file")
    if not path.is_file():
        raise DataError(path, "CSV file not found")
    return path


def check_url_template(template: str) -> str:
    """The template, or ConfigError unless it is an http(s) URL with a plain ``{id}``
    field and no other (``{{id}}`` is a literal "{id}", not a field)."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion
                  in string.Formatter().parse(template) if name is not None]
    except ValueError as error:  # a lone "{" or "}"
        raise ConfigError("--url-template", f"only {{id}} may be filled in: {error}") from None
    other = [field for field in fields if field != ("id", "", None)]
    if other:
        name, spec, conversion = other[0]
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (
            f":{spec}" if spec else "") + "}"
        raise ConfigError("--url-template", f"only a plain {{id}} may be filled in, got "
                          f"{shown!r} in {template!r}")
    if not fields:
        raise ConfigError("--url-template", f"must contain {{id}}, got {template!r}")
    try:
        url = urlsplit(template.format(id="ID"))
    except ValueError as error:  # "Invalid IPv6 URL"
        raise ConfigError("--url-template", f"{error}: {template!r}") from None
    if url.scheme.lower() not in ("http", "https") or not url.netloc:
        raise ConfigError("--url-template", f"must be an http:// or https:// URL, got {template!r}")
    try:
        url.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError as error:
        raise ConfigError("--url-template", f"{error}: {template!r}") from None
    if not url.hostname:
        raise ConfigError("--url-template", f"has no host name: {template!r}")
    return template


# ============================================================================== the log


def log_path(root: Path, shard_index: int, num_shards: int) -> Path:
    return root / LOG_DIR / f"shard-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def read_failures(root: str | os.PathLike) -> dict[str, list[dict]]:
    """Segment key -> its failure records, from every log under ``root`` (any sharding).

    A line a killed run left half-written is not JSON and is ignored."""
    failures: dict[str, list[dict]] = defaultdict(list)
    folder = Path(root) / LOG_DIR
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "is in the way: expected the folder of download logs")
    for path in sorted(folder.glob("*.jsonl")):
        if not path.is_file():
            raise DataError(path, "is in the way: expected a download log file")
        for record in json_records(path, "key"):
            failures[record["key"]].append(record)
    return failures


def _gave_up(records: Sequence[dict], max_attempts: int) -> bool:
    return any(not r.get("transient", True) for r in records) or len(records) >= max_attempts


class _Log:
    """Appends failure records, a line each, to an O_APPEND file that no other run writes
    (the output's lock). A record is whole or absent: a write that fails part-way (a full
    disk) is cut off again, and a line left half-written anyway (a crash in the middle of
    a write) is cut off before the next record, which would otherwise join it."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._checked = False

    def _cut_torn_line(self, fd: int) -> None:
        """Once a run: cut the file after its last newline (a no-op when it ends in one)."""
        if self._checked:
            return
        self._checked = True
        end = size = os.fstat(fd).st_size
        while end > 0:
            start = max(0, end - 4096)
            newline = os.pread(fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            os.ftruncate(fd, end)

    def add(self, segment: Segment, failure: Failure, attempt: int) -> None:
        record = {
            "key": segment.key, "row": segment.row, "video": segment.video, "start": segment.start,
            "end": segment.end, "kind": failure.kind, "transient": failure.transient,
            "attempt": attempt, "message": failure.message[:500],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock, _disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                self._cut_torn_line(fd)
                size = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                except OSError:
                    os.ftruncate(fd, size)  # no half record left behind
                    raise
            finally:
                os.close(fd)


@contextlib.contextmanager
def _disk_errors(path: Path):
    """A full disk (or quota) or an output that cannot be written (read-only, no
    permission) stops the run: one line naming the file, no traceback. It is no fault of
    the video, so nothing is logged against it."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(path, "no space left on device; free some and rerun") from None
        if error.errno == errno.EFBIG:
            raise DataError(path, "file too large for the file system or the process's "
                            "file size limit (ulimit -f)") from None
        if error.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            # os.replace's error names the temporary file first, then the one in the way
            raise DataError(error.filename2 or error.filename or path,
                            f"cannot be written: something in its way ({error.strerror})"
                            ) from None
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise DataError(path, f"cannot write ({error.strerror}); make the folder "
                            "writable and rerun") from None
        raise


@contextlib.contextmanager
def _as_failure():
    """Anything unforeseen in one video (a codec FFmpeg chokes on, an extractor bug) is
    that video's failure, logged as "error" and retried, not the end of the run; a full
    disk (DataError) still ends it."""
    try:
        yield
    except (Failure, DataError, _Stopped):
        raise
    except Exception as error:  # noqa: BLE001 (logged with its type and message)
        raise Failure("error", f"{type(error).__name__}: {error}", transient=True) from None


class _Stopped(Exception):
    """The run is stopping (Ctrl-C, SIGTERM): the segment in hand is left, not logged."""


class _RateLimit:
    """At most ``per_minute`` video requests a minute, spaced evenly, across threads."""

    def __init__(self, per_minute: float | None, stopping: threading.Event | None = None):
        self.gap = 60.0 / per_minute if per_minute else 0.0  # finite: see MIN_RATE_LIMIT
        self._next = 0.0
        self._lock = threading.Lock()
        self.stopping = stopping or threading.Event()

    def wait(self) -> None:
        if not self.gap:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.gap
        if self.stopping.wait(max(0.0, slot - now)):
            raise _Stopped


# ============================================================================ fetching


@dataclass(frozen=True)
class _Source:
    url: str
    headers: dict
    audio: bool
    video: bool


class _Fetcher:
    """Fetches the segments of one video at a time; shared by the worker threads."""

    def __init__(self, root: Path, url_template: str, timeout: float, max_height: int,
                 rate_limit: float | None, log: _Log):
        self.root, self.url_template, self.timeout = root, url_template, timeout
        self.max_height, self.log = max_height, log
        # Set when the run stops: each thread leaves its video at the next segment or
        # byte range (a request in flight still runs to its end or its timeout).
        self.stopping = threading.Event()
        self.rate = _RateLimit(rate_limit, self.stopping)
        self._face_lock = threading.Lock()  # dlib's models are not documented thread-safe
        self._encoder = None
        self._local = threading.local()
        self._opened: list = []  # every thread's yt-dlp, closed by close()

    def close(self) -> None:
        """Close the threads' yt-dlp instances and with them their pooled connections
        (left to the garbage collector, each was an "unclosed socket" warning)."""
        for ydl in self._opened:
            ydl.close()
        self._opened.clear()

    def video(self, video: str, segments: Sequence[Segment], attempts: dict[str, int]) -> Counter:
        """Fetch, check and write each segment; log each failure. Returns counts by kind."""
        counts: Counter = Counter()

        def failed(segment: Segment, failure: Failure) -> None:
            self.log.add(segment, failure, attempts.get(segment.key, 0) + 1)
            counts[failure.kind] += 1

        try:
            self.rate.wait()
            try:
                with _as_failure():
                    sources = self.resolve(self.url_template.format(id=video))
            except Failure as failure:
                for segment in segments:
                    failed(segment, failure)
                return counts
            for segment in segments:
                if self.stopping.is_set():
                    break
                try:
                    with _as_failure():
                        self.segment(sources, segment)
                    counts["ok"] += 1
                except Failure as failure:
                    failed(segment, failure)
        except _Stopped:
            pass
        return counts

    def resolve(self, url: str) -> list[_Source]:
        """The media URLs of a page (yt-dlp): one with audio and video, or one of each."""
        import yt_dlp

        try:
            info = self._ydl().extract_info(url, download=False)
        except yt_dlp.utils.YoutubeDLError as error:
            raise classify(re.sub(r"^ERROR:\s*", "", str(error))) from None
        formats = info.get("requested_formats") or [info]
        sources = []
        for fmt in formats:
            if not fmt.get("url"):
                continue
            sources.append(_Source(
                fmt["url"], {**(info.get("http_headers") or {}), **(fmt.get("http_headers") or {})},
                audio=fmt.get("acodec") != "none", video=fmt.get("vcodec") != "none",
            ))
        if not sources:
            raise Failure("no-format", f"{url}: no media URL found")
        return sources

    def _ydl(self):
        """This thread's yt-dlp (its network settings: proxy, cookies, timeouts)."""
        import yt_dlp

        ydl = getattr(self._local, "ydl", None)
        if ydl is None:
            h = self.max_height
            ydl = self._local.ydl = yt_dlp.YoutubeDL({
                "format": f"bv*[height<=?{h}]+ba/b[height<=?{h}]/bv*+ba/b",
                "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": True,
                "socket_timeout": self.timeout, "retries": 0, "extractor_retries": 0,
                "cachedir": False, "logger": _QuietLogger(),
            })
            self._opened.append(ydl)
        return ydl

    def segment(self, sources: Sequence[_Source], segment: Segment) -> None:
        """Audio of [start, end) and the frames around the middle -> the segment's files."""
        audio_source = next((s for s in sources if s.audio), sources[0])
        video_source = next((s for s in sources if s.video), sources[0])
        with self._open(audio_source) as container:
            wave = self._audio(container, segment)
            if video_source is audio_source:
                frames = self._frames(container, segment)
        if video_source is not audio_source:
            with self._open(video_source) as container:
                frames = self._frames(container, segment)
        encoded = io.BytesIO()
        _write_segment(encoded, wave, frames)
        media = encoded.getvalue()
        # The face is checked on the frames as stored (H.264), which is what prepare
        # reads: on the originals a face dlib's detector just finds (score 0.323 against
        # its cut-off 0.3) could be lost in the re-encoding (0.273) and the segment,
        # counted as fetched here, skipped by prepare as "no face found".
        descriptor = self._face(_stored_frames(media), segment)
        self._write(segment, media, descriptor)

    @contextlib.contextmanager
    def _open(self, source: _Source):
        """The media as an open container. Over HTTP, a request that fails while FFmpeg
        reads (a 404 midway, a short body, the run stopping) ends the reading quietly and
        is raised here, in place of whatever FFmpeg made of the missing bytes: raised
        inside FFmpeg's read callback, PyAV would print its traceback."""
        import av

        reader = None
        try:
            if source.url.startswith(("http:", "https:")):
                reader = _RangeReader(self._ydl(), source, self.stopping)
            with av.open(reader or source.url, timeout=self.timeout) as container:
                yield container
        except (av.error.FFmpegError, Failure) as error:
            if reader is not None and reader.failure is not None:
                raise reader.failure from None
            if isinstance(error, Failure):
                raise
            raise classify(_av_message(error)) from None
        if reader is not None and reader.failure is not None:
            raise reader.failure

    def _audio(self, container, segment: Segment) -> np.ndarray:
        """float32 mono at SAMPLE_RATE of exactly [start, end)."""
        import av
        import soxr

        if not container.streams.audio:
            raise Failure("no-audio", "the video has no audio track")
        stream = container.streams.audio[0]
        duration = _duration(container)
        if duration is not None and segment.start >= duration:
            raise Failure("outside-video", f"segment starts at {segment.start:.2f} s, "
                          f"after the video's end ({duration:.2f} s)")
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=stream.rate)
        chunks, t0, n = [], None, 0
        try:
            container.seek(int(segment.start * av.time_base), backward=True)
            for frame in container.decode(stream):
                if t0 is None and frame.time is not None:
                    t0 = frame.time
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
                    n += chunks[-1].size
                if t0 is not None and t0 + n / stream.rate >= segment.end:
                    break
        except av.error.FFmpegError as error:
            raise Failure("truncated", f"audio: {_av_message(error)}", transient=True) from None
        rate = stream.rate
        wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        got = None if t0 is None else t0 + wave.size / rate
        if got is None or got < segment.end - 0.05:
            if duration is not None and segment.end > duration + 0.05:
                raise Failure("outside-video", f"segment ends at {segment.end:.2f} s, after the "
                              f"video's end ({duration:.2f} s)")
            stops = "has no timed frame" if got is None else f"stops at {got:.2f} s"
            raise Failure("truncated", f"audio {stops}, before the segment's end "
                          f"({segment.end:.2f} s)", transient=True)
        first = max(0, int(round((segment.start - t0) * rate)))
        last = int(round((segment.end - t0) * rate))
        wave = wave[first:last]
        if not np.isfinite(wave).all() or not wave.any():
            raise Failure("no-audio", "the segment's audio is silent")
        return soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)

    def _frames(self, container, segment: Segment) -> list[tuple[float, np.ndarray]]:
        """The FRAMES_AROUND_MIDDLE frames nearest the middle: (time from start, rgb)."""
        import av

        if not container.streams.video:
            raise Failure("no-video", "the video has no picture track")
        stream = container.streams.video[0]
        middle = segment.middle
        before: deque = deque(maxlen=FRAMES_AROUND_MIDDLE)
        after = []
        try:
            container.seek(int(max(0.0, middle - 1.0) * av.time_base), backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                (before if frame.time < middle else after).append(frame)
                if len(after) >= FRAMES_AROUND_MIDDLE:
                    break
        except av.error.FFmpegError as error:
            raise Failure("truncated", f"video: {_av_message(error)}", transient=True) from None
        near = sorted([*before, *after], key=lambda f: abs(f.time - middle))
        near = near[:FRAMES_AROUND_MIDDLE]
        if not near or abs(near[0].time - middle) > 0.5:
            raise Failure("truncated", f"no video frame near the segment's middle "
                          f"({middle:.2f} s)", transient=True)
        return [(f.time - segment.start, f.to_ndarray(format="rgb24"))
                for f in sorted(near, key=lambda f: f.time)]

    def _face(self, frames: list[tuple[float, np.ndarray]], segment: Segment) -> np.ndarray:
        """dlib's descriptor of the face nearest the CSV's centre, on the middle frame."""
        from speech2face.face_encoders import load_face_encoder

        half = (segment.end - segment.start) / 2
        image = min(frames, key=lambda tf: abs(tf[0] - half))[1]
        with self._face_lock:
            self._encoder = self._encoder or load_face_encoder("dlib")
            descriptor = face_descriptor(image, (segment.x, segment.y), encoder=self._encoder)
        if descriptor is None:
            raise Failure("no-face", f"no face at the segment's middle ({segment.middle:.2f} s) "
                          f"near the centre ({segment.x:.2f}, {segment.y:.2f})")
        return descriptor

    def _write(self, segment: Segment, media_bytes: bytes, descriptor: np.ndarray) -> None:
        from speech2face.utils import remove_stale_temps, staged_writes

        folder = self.root / SEGMENTS_DIR / segment.video
        media = folder / f"{segment.clip}{SEGMENT_SUFFIX}"
        face = folder / f"{segment.clip}{DESCRIPTOR_SUFFIX}"
        # A run killed while writing this segment left its temporary files; no other run
        # writes this segment now (one job per video and the output's lock), so they go.
        if folder.exists() and not folder.is_dir():
            raise DataError(folder, "is in the way: expected the folder of a video's segments")
        for path in (media, face):
            remove_stale_temps(path, folder=False)
        # Renamed into place in this order: the segment, which marks it done, comes last.
        with _disk_errors(media), staged_writes() as stage:
            with stage(face) as f:
                np.save(f, descriptor, allow_pickle=False)
            with stage(media) as f:
                f.write(media_bytes)


class _RangeReader(io.RawIOBase):
    """A read-only, seekable file over HTTP byte ranges (through yt-dlp's networking),
    for FFmpeg: fixed, aligned ranges of RANGE_BYTES, the last CACHED_RANGES kept.

    A range that fails once FFmpeg reads (the first is fetched here, before) is kept in
    ``failure`` and reads as the end of the file from then on: an exception raised into
    FFmpeg's callback would be printed by PyAV, again at each retry. The caller raises
    ``failure`` (``_Fetcher._open``). Stopping (``stopping``) is such a failure too."""

    def __init__(self, ydl, source: _Source, stopping: threading.Event):
        self.ydl, self.source, self.stopping = ydl, source, stopping
        self.pos, self.size = 0, None
        self.failure: Exception | None = None
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self._range(0)  # learns the size; errors (404, timeout) surface here

    def _range(self, index: int) -> bytes:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        import http.client

        from yt_dlp.networking import Request
        from yt_dlp.networking.exceptions import IncompleteRead
        from yt_dlp.utils import YoutubeDLError

        if self.stopping.is_set():
            raise _Stopped
        first = index * RANGE_BYTES
        headers = {**self.source.headers, "Range": f"bytes={first}-{first + RANGE_BYTES - 1}"}
        try:
            with self.ydl.urlopen(Request(self.source.url, headers=headers)) as response:
                if response.status != 206 and first > 0:
                    raise Failure("no-range", "the server ignores byte ranges")
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                length = response.headers.get("Content-Length")
                data = response.read(RANGE_BYTES)
        except (IncompleteRead, http.client.IncompleteRead) as error:  # a response cut short
            raise Failure("network", f"incomplete read ({error})", transient=True) from None
        except (YoutubeDLError, OSError, http.client.HTTPException) as error:
            raise classify(str(error)) from None
        if self.size is None:
            self.size = int(total) if total.isdigit() else (
                int(length) if length and response.status == 200 else None)
        self.cache[index] = data
        if len(self.cache) > CACHED_RANGES:
            self.cache.popitem(last=False)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            if self.size is None:  # (a server answering "Content-Range: bytes a-b/*")
                # FFmpeg's own "cannot seek" (AVERROR(ESPIPE)), handed back by PyAV: an
                # exception here would be printed as PyAV's traceback.
                return -errno.ESPIPE
            offset += self.size
        elif whence == io.SEEK_CUR:
            offset += self.pos
        self.pos = max(0, offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        if self.failure is not None or (self.size is not None and self.pos >= self.size):
            return 0
        index, skip = divmod(self.pos, RANGE_BYTES)
        try:
            data = self._range(index)[skip : skip + len(buffer)]
        except (Failure, _Stopped) as failure:
            self.failure = failure
            return 0
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _stored_frames(media: bytes) -> list[tuple[float, np.ndarray]]:
    """The frames of a segment as :func:`_write_segment` stored them: (time, rgb)."""
    from speech2face.audio import open_media

    with open_media(io.BytesIO(media)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24"))
                for frame in container.decode(container.streams.video[0])
                if frame.time is not None]


def _write_segment(f, wave: np.ndarray, frames: list[tuple[float, np.ndarray]]) -> None:
    """Matroska: FLAC audio (16-bit, SAMPLE_RATE, mono) and H.264 frames, times in ms.
    Bit-exact (no random track UIDs, no muxer version): the same segment gives the same
    bytes on every run."""
    import av

    ms = Fraction(1, 1000)
    f = _KeptError(f)
    with av.open(f, "w", format="matroska", options={"fflags": "+bitexact"}) as out:
        audio = out.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        video = out.add_stream("libx264", options={"crf": str(VIDEO_CRF), "preset": "medium"})
        height, width = frames[0][1].shape[:2]
        video.width, video.height = width - width % 2, height - height % 2
        video.pix_fmt = "yuv420p"
        video.time_base = video.codec_context.time_base = ms
        for t, image in frames:
            frame = av.VideoFrame.from_ndarray(image[: video.height, : video.width], format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), ms
            out.mux(video.encode(frame))
        out.mux(video.encode())
        pcm = (np.clip(wave, -1.0, 32767 / 32768) * 32768).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, 0, Fraction(1, SAMPLE_RATE)
        out.mux(audio.encode(frame))
        out.mux(audio.encode())
    if f.error is not None:
        raise f.error


class _KeptError(io.RawIOBase):
    """A file for FFmpeg to write through PyAV that keeps its first OSError (a full disk)
    in ``error`` and takes no more writes: raised inside FFmpeg's write callback, it
    would be printed by PyAV, again at each following write. The caller raises it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.f.write(data)
            except OSError as error:
                self.error = error
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def _duration(container) -> float | None:
    import av

    return container.duration / av.time_base if container.duration else None


def _av_message(error) -> str:
    return str(getattr(error, "strerror", None) or error)


class _QuietLogger:
    """yt-dlp writes to this instead of the terminal; errors come back as exceptions."""

    def debug(self, message):
        pass

    info = warning = error = debug


# ================================================================================= main


def download_avspeech(
    csvs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    url_template: str = YOUTUBE_URL,
    shard_index: int = 0,
    num_shards: int = 1,
    workers: int = WORKERS,
    rate_limit: float | None = None,
    timeout: float = TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
    max_height: int = MAX_HEIGHT,
    progress: bool = True,
) -> Counter:
    """Fetch the segments of AVSpeech CSVs into ``out`` (layout: module docstring).

    Returns counts: "ok" (fetched now), "done" (already there), "given-up" (failed for
    good before), one count per failure kind of this run, and "retriable": the segments
    that failed for a transient reason with attempts left (a rerun tries them again).
    """
    from speech2face.utils import atomic_write

    check_url_template(url_template)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError("--shard-index", f"need 0 <= index < {num_shards}, got {shard_index}")
    for option, value in (("--workers", workers), ("--max-attempts", max_attempts)):
        if value < 1:
            raise ConfigError(option, f"must be at least 1, got {value}")
    if rate_limit is not None and not MIN_RATE_LIMIT <= rate_limit <= MAX_RATE_LIMIT:
        raise ConfigError("--rate-limit", f"must be from {MIN_RATE_LIMIT} to {MAX_RATE_LIMIT:g} "
                          f"requests a minute, got {rate_limit}")
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError("--timeout", f"must be > 0 and at most {MAX_TIMEOUT_S:g} s, "
                          f"got {timeout}")
    csvs = [_csv_file(p) for p in csvs]
    if not csvs:
        raise ConfigError("--csv", "give at least one AVSpeech CSV")
    splits = [split_of_csv(p) for p in csvs]
    if len(set(splits)) < len(splits):
        raise ConfigError("--csv", f"two CSVs of one split: {[str(p) for p in csvs]}")
    tables = list(zip(csvs, splits, strict=True))
    segments = read_avspeech_csvs(tables)
    for path, split in tables:  # one CSV a split
        if not any(s.split == split for s in segments):
            raise DataError(path, "no rows: expected YouTube id, start, end, face x, face y")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError(root, "output exists and is not a folder")
    # Everything in the way is found before anything is written.
    segments_dir = root / SEGMENTS_DIR
    if segments_dir.exists() and not segments_dir.is_dir():
        raise DataError(segments_dir, "is in the way: expected the folder of segments")
    if segments_dir.is_dir():
        videos = {segment.video for segment in segments}
        with os.scandir(segments_dir) as entries:
            for entry in entries:
                if entry.name in videos and not entry.is_dir():
                    raise DataError(Path(entry.path), "is in the way: expected the folder of "
                                    "a video's segments")
    failures = read_failures(root)
    # prepare reads each video's split from these copies.
    copies = []
    for path, split in tables:
        copy = root / f"avspeech_{split}.csv"
        data = path.read_bytes()
        if copy.exists() and not copy.is_file():
            raise DataError(copy, f"is in the way: expected a copy of {path}")
        if copy.is_file() and copy.read_bytes() != data:
            raise DataError(copy, f"already holds a different CSV than {path}; "
                            "use another --out or remove it")
        copies.append((copy, data))
    from speech2face.utils import sharding_claim

    with sharding_claim(root, num_shards, "download"):
        for copy, data in copies:
            if not copy.is_file():
                with _disk_errors(copy), atomic_write(copy) as f:
                    f.write(data)
        return _fetch(root, segments, failures, url_template, shard_index, num_shards, workers,
                      rate_limit, timeout, max_attempts, max_height, progress)


def _fetch(root: Path, segments: Sequence[Segment], failures: dict, url_template: str,
           shard_index: int, num_shards: int, workers: int, rate_limit: float | None,
           timeout: float, max_attempts: int, max_height: int, progress: bool) -> Counter:
    """The segments of this shard that are neither done nor given up, fetched."""
    from speech2face.utils import progress as tqdm

    by_video: dict[str, list[Segment]] = defaultdict(list)
    for segment in segments:
        if stable_hash(segment.video) % num_shards == shard_index:
            by_video[segment.video].append(segment)
    counts: Counter = Counter()
    todo: dict[str, list[Segment]] = {}
    for video, group in sorted(by_video.items()):
        for segment in group:  # one per segment: read_avspeech_csvs drops repeated rows
            if _is_done(root, segment):
                counts["done"] += 1
            elif _gave_up(failures.get(segment.key, ()), max_attempts):
                counts["given-up"] += 1
            else:
                todo.setdefault(video, []).append(segment)
    attempts = {k: len(v) for k, v in failures.items()}
    log = _Log(log_path(root, shard_index, num_shards))
    fetcher = _Fetcher(root, url_template, timeout, max_height, rate_limit, log)
    pool = ThreadPoolExecutor(max(1, min(workers, len(todo) or 1)))
    bar = tqdm(total=sum(map(len, todo.values())), desc="download", unit="segment",
               disable=not progress)
    try:
        jobs = [pool.submit(fetcher.video, v, s, attempts) for v, s in todo.items()]
        for job in as_completed(jobs):
            result = job.result()
            counts.update(result)
            bar.update(sum(result.values()))
    finally:
        bar.close()  # before the command's last line (an interrupted one too)
        fetcher.stopping.set()  # (at the end: nothing left to stop)
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()
    after = read_failures(root)  # the log as this run leaves it
    counts["retriable"] = sum(
        1 for group in todo.values() for segment in group
        if not _is_done(root, segment) and not _gave_up(after.get(segment.key, ()), max_attempts))
    return counts


def _is_done(root: Path, segment: Segment) -> bool:
    """Both of a segment's files are there (the media alone: an older run's, fetched again)."""
    media = root / SEGMENTS_DIR / segment.video / f"{segment.clip}{SEGMENT_SUFFIX}"
    return media.is_file() and media.with_suffix(DESCRIPTOR_SUFFIX).is_file()


# ================================================================================== CLI


def add_download_arguments(parser) -> None:
    from speech2face.cli import bounded

    parser.add_argument("dataset", choices=["avspeech"], help="the dataset to fetch")
    parser.add_argument(
        "--csv", action="append", required=True, metavar="CSV",
        help="AVSpeech CSV, avspeech_train.csv or avspeech_test.csv (the split is the name's "
        "end: *_train.csv or *_test.csv); repeat for both",
    )
    parser.add_argument("--out", required=True, help="dataset folder for `prepare avspeech --root`")
    parser.add_argument(
        "--url-template", default=YOUTUBE_URL,
        help="URL of a video, {id} replaced by the CSV's id (default: the YouTube watch URL)",
    )
    parser.add_argument("--workers", type=bounded(int, 1, None, "number of workers"),
                        default=WORKERS,
                        help="videos fetched at once (threads; default %(default)s)")
    parser.add_argument("--rate-limit", default=None, metavar="PER_MINUTE",
                        type=bounded(float, MIN_RATE_LIMIT, MAX_RATE_LIMIT, "rate limit"),
                        help="at most this many video requests a minute (default: no limit)")
    parser.add_argument("--timeout", default=TIMEOUT_S,
                        type=bounded(float, 0.001, MAX_TIMEOUT_S, "timeout in seconds"),
                        help="seconds without data before a request fails (default %(default)s)")
    parser.add_argument("--max-attempts", type=bounded(int, 1, None, "number of attempts"),
                        default=MAX_ATTEMPTS,
                        help="tries of a segment that fails for a transient reason "
                        "(timeout, network, truncated) before it is given up (default %(default)s)")
    parser.add_argument("--max-height", type=bounded(int, 1, None, "height"),
                        default=MAX_HEIGHT,
                        help="tallest video format fetched, in pixels (default %(default)s)")
    parser.add_argument("--shard-index", type=bounded(int, 0, None, "shard index"), default=0,
                        help="this job's index in a job array (default 0)")
    parser.add_argument("--num-shards", type=bounded(int, 1, None, "number of shards"),
                        default=1,
                        help="jobs in the array; each takes the videos whose hash is its "
                        "index mod this (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def download_output(args) -> tuple[Path, bool]:
    """What a download run locks (``cli.main``): the whole ``--out``, except one job of a
    job array (``--num-shards`` > 1), which locks its own log: the other jobs write their
    segments into the same folder at the same time."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; the output is a folder")
    if args.num_shards > 1:
        return log_path(out, args.shard_index, args.num_shards), False
    return out, True


def download_command(args) -> int:
    counts = download_avspeech(
        args.csv, args.out, url_template=args.url_template, shard_index=args.shard_index,
        num_shards=args.num_shards, workers=args.workers, rate_limit=args.rate_limit,
        timeout=args.timeout, max_attempts=args.max_attempts, max_height=args.max_height,
        progress=not args.no_progress,
    )
    failed = {k: v for k, v in sorted(counts.items())
              if k not in ("ok", "done", "given-up", "retriable")}
    retriable = counts["retriable"]
    log = log_path(Path(args.out), args.shard_index, args.num_shards)
    print(
        f"segments: {counts['ok']} fetched, {counts['done']} already there, "
        f"{sum(failed.values())} failed now"
        + (f" ({', '.join(f'{k} {v}' for k, v in failed.items())})" if failed else "")
        + f", {counts['given-up']} given up before; "
        + (f"log: {log}" if log.is_file() else f"logs: {log.parent}" if log.parent.is_dir()
           else "no failure logged")
        + (f"\n{retriable} segment(s) failed for a transient reason and will be tried again "
           "by the same command (exit 75)" if retriable else "")
    )
    return TRY_AGAIN if retriable else 0


# The exit status of a run that left segments to try again (sysexits.h's EX_TEMPFAIL):
# a job array's task fails, so that the scheduler (Kubernetes' restartPolicy OnFailure,
# SLURM's requeue) or a loop runs it again; 0 once nothing is left to try.
TRY_AGAIN = 75
