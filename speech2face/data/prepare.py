"""Datasets to WebDataset shards: per-video processing, writing, resuming, merging.

``prepare`` lists a dataset's videos (:mod:`speech2face.data.datasets`) and writes, per
split, tar shards of a fixed number of samples. A sample is one speech clip paired with
a face of the same video::

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
fixed, identity-mixed order (:func:`plan_windows`), so the output is a deterministic
function of the inputs and the arguments. Shards are written under a temporary name and renamed when
complete; after each completed shard a progress file records where the run is. Killed
at any moment and rerun with the same arguments, a run continues from the last
completed shard (re-processing the mixing window it was in and dropping the samples it already
wrote), so its final shards are byte-identical to an uninterrupted run's. Each run
writes a part manifest; the run that completes the last part merges all parts into
``manifest.json`` (``merge_manifests`` does it by hand).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speech2face.audio import VIDEO_SUFFIXES
from speech2face.data.datasets import (
    CLIP_SECONDS,
    DATASETS,
    FRAMES_PER_VIDEO,
    SPLIT_FILE,
    SPLITS,
    Clip,
    Frame,
    Unit,
    list_units,
    stable_hash,
)
from speech2face.data.identities import (
    LINKAGES,
    SAME_PERSON_DISTANCE,
    STORE_DIR,
    merge_units,
    video_descriptors,
)
from speech2face.data.parts import (
    check_siblings,
    files_fingerprint,
    listing_fingerprint,
    maybe_merge,
    merge,
    merge_manifests,
    new_state,
    part_counts,
    part_manifest,
    part_name,
    part_paths,
    read_part,
    remove_leftovers,
    resume_state,
)
from speech2face.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    _decode_jpeg,
    _encode_jpeg,
    load_manifest,
)
from speech2face.errors import ConfigError, DataError, OtherRunError, Speech2FaceError
from speech2face.utils import (
    SIGNAL_MASKS,
    atomic_write,
    output_entries,
    read_json,
    sharding_claim,
    sigint_held,
    staged_writes,
)

# What a video's processing produces (its frames chosen, detection, landmarks, crops,
# features, audio): raise it with any change to that output. An unfinished part begun by
# another processing is not continued, so that one folder never mixes samples of two
# (a finished part stays valid: a rerun over it is still a no-op).
# 2: detection at the size it needs, only the frames the clips use (issue 17 item 4).
PROCESSING_VERSION = 2
SAMPLES_PER_SHARD = 1000  # ~150 MB shards: 6 s of FLAC is ~100-150 kB, a crop ~15 kB
CROPS_PER_SAMPLE = 1
# Samples are written in a mixed order, not sorted by identity: consecutive samples of a
# sorted shard share an identity ~90% of the time, and a shuffle buffer of 1,000 over
# VoxCeleb2's ~180 clips per identity would hold only ~6 identities. Videos are put in
# a seeded hash order within their split and cut into windows of ~MIX_CLIPS clips; a
# window's samples are written in the hash order of their keys. A window is held in
# memory (~150 MB of FLAC and JPEG at 1,000 clips) and is the unit of resuming.
MIX_CLIPS = 1000


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
    seed: int = 0  # the mixed order of samples (plan_windows)
    mix_clips: int = MIX_CLIPS


@dataclass
class UnitResult:
    samples: list[dict]  # {"key", "files": {ext: bytes}, "landmarks": (68,2)}
    skipped: list[tuple[str, str]]  # (item, reason)
    counts: Counter = field(default_factory=Counter)
    # CPU seconds of this process's thread per stage (benchmarks; never written out).
    cpu: Counter = field(default_factory=Counter)


@contextlib.contextmanager
def _stage(cpu: Counter, name: str):
    start = time.thread_time()
    try:
        yield
    finally:
        cpu[name] += time.thread_time() - start


class _Processor:
    """Turns units into encoded samples; holds the face encoder (loaded once per process).

    The dlib path (the default) needs numpy, dlib, PIL, soundfile and PyAV, not torch:
    worker processes start without importing it. ``single_thread``: a torch encoder
    (vggface) runs on one thread, as each process must when there is one per core (the
    thread count is restored after each call: the parent process is one of them).
    """

    def __init__(self, options: Options, single_thread: bool = False):
        self.options = options
        self.single_thread = single_thread
        self._embed = None

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, 224, 224, 3) crops -> float32 (B, D) features, all in one batch."""
        from speech2face import faces

        if self.options.encoder == "dlib":
            return faces.face_descriptors(crops)
        if self._embed is None:
            encoder = _face_encoder(self.options.encoder, self.options.encoder_weights)
            self._embed = lambda x: encoder.embed(x).detach().cpu().numpy().astype(np.float32)
        if not self.single_thread:
            return self._embed(crops)
        from speech2face.runtime import torch_threads

        with torch_threads(1):  # one process per core: no oversubscription
            return self._embed(crops)

    def __call__(self, unit: Unit) -> UnitResult:
        result = UnitResult([], [])
        if unit.missing:
            result.counts.update(clips_skipped=len(unit.missing))
        if unit.skip is not None:
            result.skipped.append((unit.key, unit.skip))
            result.counts.update(videos_skipped=1, clips_skipped=len(unit.clips))
            return result
        result.skipped.extend((f"{unit.key}/{name}", "segment not downloaded")
                              for name in unit.missing)
        needed = self._crops_needed(unit)
        crops, landmarks = [], []
        for frame in unit.frames:
            if len(crops) >= needed:
                break
            try:
                crop, lm = self._face(frame, result.cpu)
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
        with _stage(result.cpu, "jpeg"):
            jpegs = [_encode_jpeg(c) for c in crops]
            decoded = np.stack([_decode_jpeg(j) for j in jpegs])
        with _stage(result.cpu, "descriptor"):
            features = self.embed(decoded)
        waves = self._audio(unit, result)
        if not waves:
            result.skipped.append((unit.key, "no usable audio clip"))
            result.counts.update(videos_skipped=1)
            return result
        result.counts.update(videos=1)
        c = self.options.crops_per_sample
        names = _key_names([clip.name for clip, _ in waves])
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
            if clip.end is not None:  # times in the source video (segment files: + offset)
                meta.update(start=clip.offset + clip.start, end=clip.offset + clip.end)
            files = {"flac": flac}
            for t, i in enumerate(picks):
                suffix = "" if t == 0 else f".{t}"
                files[f"face{suffix}.jpg"] = jpegs[i]
                files[f"landmarks{suffix}.npy"] = _npy(landmarks[i])
                files[f"feature{suffix}.npy"] = _npy(features[i])
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            result.samples.append(
                {
                    "key": f"{unit.key}/{names[j]}",
                    "files": files,
                    "landmarks": landmarks[picks[0]],
                    "identity": unit.identity,
                }
            )
        return result

    def _crops_needed(self, unit: Unit) -> int:
        """How many crops the clips can use. Clip j takes crops (j * c + t) % len(crops),
        so once len(clips) * c crops are found, the remaining frames would never be
        picked: with fewer clips than frames, they are not read."""
        return len(unit.clips) * self.options.crops_per_sample

    def _face(self, frame: Frame, cpu: Counter) -> tuple[np.ndarray, np.ndarray]:
        from speech2face import faces
        from speech2face.errors import NoFaceError

        with _stage(cpu, "read frame"):
            image = (
                read_video_frame(frame.path, frame.time)
                if _is_video(frame.path)
                else faces.load_image(frame.path)
            )
        with _stage(cpu, "detect + landmarks"):
            found = self._detect(image, frame)
        if not found:
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
        with _stage(cpu, "align"):
            return faces.align_face(image, face)

    def _detect(self, image: np.ndarray, frame: Frame) -> list:
        """Faces in a frame. A frame without a face centre is a dataset's face crop
        (VoxCeleb1's face frames, VoxCeleb2's face tracks), its face half the frame or
        more: it is detected at ``faces.FACE_CROP_DETECT_SIDE`` px, not upsampled, and at
        full size only when that finds nothing. AVSpeech frames are whole video frames in
        which the speaker may be small: full size."""
        from speech2face import faces

        detector = self.options.detector
        if frame.centre is None:
            found = faces.detect_faces(
                image, detector, upsample=0, max_side=faces.FACE_CROP_DETECT_SIDE
            )
            if found:
                return found
        return faces.detect_faces(image, detector=detector)

    def _audio(self, unit: Unit, result: UnitResult) -> list[tuple[Clip, bytes]]:
        from speech2face.audio import fit_duration, load_audio, seconds_samples
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
                    with _stage(result.cpu, "read audio"):
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
                wave = wave[seconds_samples(clip.start) : seconds_samples(end)]
                if wave.size == 0 or not wave.any():
                    result.skipped.append(
                        (f"{clip.path}@{clip.start:.2f}s", "segment has no audio")
                    )
                    result.counts.update(clips_skipped=1)
                    continue
            with _stage(result.cpu, "flac"):
                out.append((clip, _encode_flac(fit_duration(wave, seconds))))
            result.counts.update(clips=1)
        return out


@functools.lru_cache(maxsize=1)
def _face_encoder(name: str, weights: str | None):
    """A torch face encoder, loaded once per process (``prepare`` loads it before it
    creates anything, so that missing or bad weights are refused at once)."""
    from speech2face.face_encoders import load_face_encoder

    return load_face_encoder(name, weights=weights, option="--encoder-weights FILE")


def _key_names(clips: list[str]) -> list[str]:
    """Clip names as the last part of sample keys: WebDataset cuts a key at the first dot
    of the file name, so dots become ``_`` (``00001.part.2`` -> ``00001_part_2``), and a
    name already taken in the video (``a.wav`` and ``a.flac``) gets ``_2``, ``_3``..."""
    taken: set[str] = set()
    names = []
    for clip in clips:
        name = base = clip.replace(".", "_")
        n = 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names


def _is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_video_frame(path: str | os.PathLike, time_s: float | None = None) -> np.ndarray:
    """The frame of a video at ``time_s`` seconds (None: the middle) as uint8 ``(H, W, 3)``.

    Raises ImageError naming the file when it cannot be opened or has no video track.
    """
    import av

    from speech2face.audio import open_media
    from speech2face.errors import ImageError

    try:
        with open_media(path) as container:
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
                try:
                    container.seek(int(time_s / stream.time_base), stream=stream,
                                   backward=True, any_frame=False)
                except av.error.FFmpegError:  # FFmpeg says "Operation not permitted"
                    raise ImageError(path, f"cannot seek to the frame at {time_s:.2f} s "
                                           "(a truncated or damaged file?)") from None
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


def _worker_init(options: Options, parent: int) -> None:
    global _WORKER
    _worker_signals(parent)
    _WORKER = _Processor(options, single_thread=True)


def _worker_signals(parent: int) -> None:
    """A worker process's first step (the pool's and prepare's forked child)."""
    # Ctrl-C is the command's to handle (it reaches the whole process group): a worker
    # interrupted while handing over a result left the pool's pipe half-written, and the
    # command waiting for the rest of it for ever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Started with SIGINT blocked (:func:`_pool`, :func:`_from_child`): one sent
    # meanwhile, while a spawned worker was still importing, is ignored now instead of
    # printing its traceback.
    if SIGNAL_MASKS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when ``parent`` (the process that started it)
    ends, even by SIGKILL, instead of letting it finish a video for nobody and fail (a
    BrokenPipeError traceback) to hand it over. Elsewhere a no-op. The parent is named,
    not taken to be gone when this process's parent is 1: a command running as PID 1 (a
    container without an init) is the parent of its workers."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the call
        os._exit(1)


@contextlib.contextmanager
def _interrupt_between_units() -> Iterator[Callable[[], None]]:
    """Ctrl-C ends the run between units instead of inside dlib: a KeyboardInterrupt
    raised in its C++ code (pybind11) aborted the process ("terminate called after
    throwing..."). Yields ``check()``, which raises KeyboardInterrupt once one was asked
    for. Only in the main thread (where signal handlers live); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    asked: list[int] = []

    def check() -> None:
        if asked:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, lambda *_: asked.append(1))
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
        if asked:  # asked for after the last check (or while the consumer closes this):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as it would have come, now


def _stop(pool) -> None:
    """Terminate the pool, waiting for it at most STOP_SECONDS: a worker terminated while
    handing over a result leaves the pool's result thread waiting for the rest of it,
    and ``terminate`` waiting for that thread, for ever (both end with the process)."""
    stopping = threading.Thread(target=pool.terminate, daemon=True)
    stopping.start()
    stopping.join(STOP_SECONDS)
    if not stopping.is_alive():
        pool.join()


STOP_SECONDS = 10.0


def _worker_run(unit: Unit) -> UnitResult:
    try:
        return _WORKER(unit)
    except Exception as error:
        # pickled here, unpickled by the pool's result thread in the parent: an error
        # that cannot be rebuilt there killed that thread, and the parent waited for ever
        raise _sendable(error) from None


def _sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling and unpickling, else a RuntimeError naming it
    (with its traceback)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001  (whatever pickling or rebuilding raises)
        return RuntimeError(f"{type(error).__name__}: {error}").with_traceback(
            error.__traceback__)
    return error


# ============================================================================== order



def _mix_rank(key: str, seed: int) -> tuple[int, str]:
    return stable_hash(f"mix:{seed}:{key}"), key


def plan_windows(units: list[Unit], mix_clips: int = MIX_CLIPS, seed: int = 0) -> list[list[Unit]]:
    """Units in writing order, cut into mixing windows.

    Split by split (train, val, test; units skipped before processing last), videos in
    the hash order of ``seed`` and their key; a window ends when it holds ``mix_clips``
    listed clips or at the end of a split. The plan depends only on the inputs.
    """
    rank = {s: i for i, s in enumerate(SPLITS)}
    ordered = sorted(
        units, key=lambda u: (rank.get(u.split, len(SPLITS)), _mix_rank(u.key, seed))
    )
    windows: list[list[Unit]] = []
    clips = 0
    for unit in ordered:
        if not windows or unit.split != windows[-1][-1].split or clips >= mix_clips:
            windows.append([])
            clips = 0
        windows[-1].append(unit)
        clips += len(unit.clips)
    return windows


def mix_samples(samples: list[dict], seed: int = 0) -> list[dict]:
    """A window's samples in their writing order: the hash order of their keys."""
    return sorted(samples, key=lambda s: _mix_rank(s["key"], seed))


# ============================================================================ writing


class _HashingFile:
    """A write-only file that also counts and hashes (SHA-256) what goes through it."""

    def __init__(self, path: Path):
        self.f, self.sha, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> int:
        if self.f.closed:  # discarded: what tarfile still flushes goes nowhere
            return len(data)
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class _SplitWriter:
    """One split's shards, through webdataset's ShardWriter and TarWriter.

    A shard is written as ``SPLIT/.SPLIT-[pIIIII-]NNNNNN.tar.partial``, and when it holds
    ``samples_per_shard`` samples (or the split ends) it is fsynced, renamed to its
    final name and passed to ``on_shard`` as a manifest entry (path, samples, size,
    sha256). Members get mtime 0, no owner and mode 0444, so shards are byte-identical
    across reruns. What ShardWriter does not do, done here: the temporary name, the
    fsync and rename, the hash, and closing a shard as soon as it is full (ShardWriter
    closes it only when the next sample arrives, too late for a checkpoint).
    """

    def __init__(self, out: Path, split: str, prefix: str, first_index: int,
                 samples_per_shard: int, on_shard):
        import webdataset as wds

        self.out, self.split, self.on_shard = out, split, on_shard
        self._files: dict[str, _HashingFile] = {}
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        pattern = str(folder / f".{split}-{prefix}").replace("%", "%%") + "%06d.tar.partial"
        self.shards = wds.ShardWriter(
            pattern, maxcount=samples_per_shard, maxsize=float("inf"), start_shard=first_index,
            verbose=0, opener=self._open, post=self._complete,
            encoder=False, mtime=0, user="", group="", mode=0o444,
        )

    def _open(self, name: str) -> _HashingFile:
        self._files[name] = _HashingFile(Path(name))
        return self._files[name]

    def _complete(self, name: str) -> None:
        file = self._files.pop(name)
        file.close()
        partial = Path(name)
        final = partial.with_name(partial.name[1 : -len(".partial")])
        os.replace(partial, final)
        self.on_shard({
            "path": final.relative_to(self.out).as_posix(),
            "samples": self.shards.count,
            "size": file.size,
            "sha256": file.sha.hexdigest(),
        })

    def write(self, sample: dict) -> None:
        self.shards.write({"__key__": sample["key"], **sample["files"]})
        if self.shards.count >= self.shards.maxcount:
            self.shards.finish()  # complete it now, not at the next write

    def close(self) -> None:
        self.shards.close()

    def abort(self) -> None:
        """Stop after an error or an interrupt: the unfinished shard is closed here rather
        than by the garbage collector, and removed (its samples are written again by the
        next run, which would delete it anyway)."""
        # A full disk fails these closes too; the error being raised is the one to report.
        for name, file in self._files.items():
            with contextlib.suppress(OSError):
                file.f.close()
            with contextlib.suppress(OSError):  # also when the close failed (a full disk)
                os.unlink(name)
        if self.shards.tarstream is not None:
            with contextlib.suppress(OSError):
                self.shards.tarstream.close()


# Bounds of prepare's counts: beyond them a run only exhausts memory or processes.
MAX_WORKERS = 1024
MAX_FRAMES = 64  # frames read a video, crops stored a sample
MAX_SAMPLES_PER_SHARD = 1_000_000
# dlib's descriptors have norms near 0.6 (bench/bench_classifier.py): none are 4 apart.
MAX_IDENTITY_THRESHOLD = 4.0


def _check_output(out: Path) -> None:
    """Refuse an ``out`` that holds something but is not a prepare output."""
    if not (out / PARTS_DIR).is_dir() and any(p.name != PARTS_DIR for p in output_entries(out)):
        raise DataError(out, "output folder exists, is not empty and is not a prepare output")


def store_descriptors(
    root: str | os.PathLike,
    out: str | os.PathLike,
    shard_index: int = 0,
    num_shards: int = 1,
    *,
    detector: str = "hog",
    frames_per_video: int = FRAMES_PER_VIDEO,
    progress: bool = True,
) -> dict:
    """Step 1 of an AVSpeech job array (``prepare avspeech --descriptors-only``): the face
    descriptors that identity merging needs, of this job's videos (stable hash
    ``shard_index`` mod ``num_shards``), embedded from their frames where ``download``
    stored none, into ``out/parts/descriptors``. Every job of step 2 (``prepare``) then
    finds them there instead of embedding every video of the corpus itself.

    Returns counts: ``stored`` (there before), ``downloaded`` (download's files),
    ``computed`` (now), ``without_face``. Resumable: a rerun embeds only what is missing.
    """
    if not 0 <= shard_index < num_shards:
        raise DataError(None, f"--shard-index {shard_index} is not in [0, {num_shards})")
    if frames_per_video < 1:
        raise DataError(None, "frames must be >= 1")
    out = Path(out)
    units = [u for u in list_units("avspeech", root, frames_per_video)
             if u.skip is None and stable_hash(u.key) % num_shards == shard_index]
    _check_output(out)
    features, _, sources = video_descriptors(units, detector, progress, out / PARTS_DIR / STORE_DIR,
                                             tag=part_name(shard_index, num_shards))
    return {**{k: sources.get(k, 0) for k in ("stored", "downloaded", "computed")},
            "without_face": int(np.isnan(features).any(axis=1).sum())}


def _recorded_run(path: Path) -> dict | None:
    """The run identity recorded in a part's manifest or progress file, unchecked (only
    compared; the file is validated where it is used), or None."""
    saved = read_json(path) if path.is_file() else None
    return saved.get("run") if isinstance(saved, dict) else None


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
    identity_threshold: float = SAME_PERSON_DISTANCE,
    identity_linkage: str = "average",
    seed: int = 0,
    mix_clips: int = MIX_CLIPS,
    progress: bool = True,
    movable: bool = False,
) -> dict:
    """Turn a dataset into WebDataset shards under ``out`` (module docstring, docs/data.md).

    dataset: "voxceleb1", "voxceleb2" or "avspeech"; root: its folder.
    workers: processes decoding, detecting and embedding in parallel (videos).
    shard_index, num_shards: this run takes the videos whose stable hash is
        ``shard_index`` mod ``num_shards`` (a cluster job array runs every index).
    encoder: face encoder name (``face_encoders.load_face_encoder``).
    samples_per_shard: samples per tar shard (the last shard of a split may hold fewer).
    seed, mix_clips: the mixed sample order (:func:`plan_windows`).
    movable: ``root`` and ``out`` move together (the demo's folder holds both): the
        part's identity takes the corpus's paths relative to ``root``, so that the moved
        folder resumes. By default they count whole, and the same files elsewhere (a
        copy, another mount) are other inputs.
    Resumable: rerun with the same arguments after a crash or kill to continue.

    Returns this run's part manifest (dict). When every part of the ``num_shards`` is
    complete, ``out/manifest.json`` is written too (:func:`merge_manifests`).
    Raises DataError for a bad folder, and when ``out`` holds a run with other arguments.
    """
    from speech2face.utils import progress as tqdm

    if not 0 <= shard_index < num_shards:
        raise DataError(None, f"--shard-index {shard_index} is not in [0, {num_shards})")
    if not (1 <= samples_per_shard <= MAX_SAMPLES_PER_SHARD and 1 <= workers <= MAX_WORKERS
            and 1 <= crops_per_sample <= MAX_FRAMES and 1 <= frames_per_video <= MAX_FRAMES
            and 1 <= mix_clips <= MAX_SAMPLES_PER_SHARD):
        raise DataError(None, f"samples per shard and clips mixed must be from 1 to "
                              f"{MAX_SAMPLES_PER_SHARD:,}, workers to {MAX_WORKERS}, crops and "
                              f"frames to {MAX_FRAMES}")
    if not 0 <= identity_threshold <= MAX_IDENTITY_THRESHOLD:
        raise DataError(None, f"the identity threshold must be from 0 to "
                              f"{MAX_IDENTITY_THRESHOLD}, got {identity_threshold}")
    from speech2face.faces import DETECTORS, FACE_ENCODERS  # not face_encoders: torch

    if encoder not in FACE_ENCODERS:
        raise ConfigError(None, f"unknown face encoder {encoder!r}; "
                                f"expected one of {FACE_ENCODERS}")
    if detector not in DETECTORS:
        raise ConfigError(None, f"unknown face detector {detector!r}; "
                                f"expected one of {DETECTORS}")
    if encoder_weights is not None and encoder != "vggface":  # (it was ignored)
        raise ConfigError("--encoder-weights", f"is for --encoder vggface; the {encoder} "
                                               "encoder takes no weights file")
    # One spelling of the corpus ("demo", "demo/", "$PWD/demo") for the run's identity.
    root, out = Path(os.path.abspath(root)), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; the output is a folder")
    if out.resolve().is_relative_to(root.resolve()):
        raise DataError(out, f"is inside --root {root}: the corpus's listing would take in "
                             "the shards; put them elsewhere")
    options = Options(
        dataset=dataset,
        encoder=encoder,
        encoder_weights=None if encoder_weights is None else str(encoder_weights),
        detector=detector,
        crops_per_sample=crops_per_sample,
        frames_per_video=frames_per_video,
        samples_per_shard=samples_per_shard,
        seed=seed,
        mix_clips=mix_clips,
    )
    if encoder != "dlib":  # the weights are refused now, not after --out is made
        _face_encoder(encoder, options.encoder_weights)
    all_units = list_units(dataset, root, frames_per_video)
    part = part_name(shard_index, num_shards)
    parts = out / PARTS_DIR
    _check_output(out)
    merging = None  # AVSpeech: one identity per person, not per video (data/identities.py)
    if dataset == "avspeech" and identity_threshold > 0:
        all_units, merging = merge_units(
            all_units, identity_threshold, identity_linkage, detector, progress,
            store=parts / STORE_DIR, tag=part,
        )
        sources = merging.pop("descriptor_sources")  # not the run's identity: a rerun
        if sources.get("computed"):  # finds in the store what this one computed
            print(f"identities: {sources['computed']} videos' faces embedded from their "
                  f"frames (kept in {parts / STORE_DIR})", file=sys.stderr)
    units = [u for u in all_units if stable_hash(u.key) % num_shards == shard_index]
    windows = plan_windows(units, mix_clips, seed)
    run_id = {
        "format": FORMAT_VERSION,
        "options": asdict(options),
        "part": part,
        "units": listing_fingerprint(units, root if movable else None),
        "files": files_fingerprint(units),  # this part's files: changed in place, refused
        # of every part: parts of other inputs are not merged (_merge)
        "inputs": listing_fingerprint(all_units, root),
        "identity_merging": merging,
    }
    run_id["options"].pop("encoder_weights")  # where the weights lie is not what they are
    run_id = json.loads(json.dumps(run_id))  # as it reads back from a file (tuples: lists)
    part_manifest_path = parts / f"manifest-{part}.json"
    progress_path = parts / f"progress-{part}.json"
    if movable:  # a part begun before its caller passed `movable` goes on as recorded
        whole = {**run_id, "units": listing_fingerprint(units)}
        if whole in (_recorded_run(part_manifest_path), _recorded_run(progress_path)):
            run_id = whole
    for path in (out / MANIFEST, part_manifest_path, progress_path):
        if path.exists() and not path.is_file():
            raise DataError(path, "is in the way: a folder where prepare writes a file")

    other_counts = part_counts(out) - {num_shards}
    if other_counts:
        raise DataError(out, f"holds parts of a run with --num-shards {max(other_counts)}; "
                             "use a new --out (or that --num-shards)")
    check_siblings(out, num_shards, part, run_id)
    if part_manifest_path.is_file():
        done = read_part(part_manifest_path, out)
        if done["run"] != run_id:
            raise OtherRunError(
                out, f"holds part {part} prepared with other arguments or inputs; use a new --out"
            )
        maybe_merge(out, num_shards)
        return done
    if progress_path.is_file():
        state = resume_state(progress_path, run_id, PROCESSING_VERSION, windows, out)
    else:
        state = new_state()
    prefix = "" if num_shards == 1 else f"p{shard_index:05d}-"
    remove_leftovers(out, prefix, part)
    parts.mkdir(parents=True, exist_ok=True)  # marks the folder as a prepare output at once

    # What the state holds as JSON lists is kept as sets and arrays while running.
    identities = {s: set(v.get("identities", [])) for s, v in state["splits"].items()}
    landmarks_sum = (np.zeros((68, 2)) if state["landmarks_sum"] is None
                     else np.asarray(state["landmarks_sum"], dtype=np.float64))
    window_samples: dict[int, int] = {}
    position = [state["next_window"], state["samples_done"]]  # after the last written sample

    def checkpoint() -> None:
        window, done = position
        if window < len(windows) and done >= window_samples.get(window, math.inf):
            window, done = window + 1, 0
        state["next_window"], state["samples_done"] = window, done
        for split, seen in identities.items():
            state["splits"][split]["identities"] = sorted(seen)
        if state["landmarks_count"]:
            state["landmarks_sum"] = landmarks_sum.tolist()
        with atomic_write(progress_path, "w") as f:
            json.dump({"run": run_id, "processing": PROCESSING_VERSION, "state": state}, f)

    def on_shard(entry: dict) -> None:
        state["splits"][writer.split]["shards"].append(entry)
        checkpoint()

    start, drop_first = state["next_window"], state["samples_done"]
    writer: _SplitWriter | None = None
    counts = Counter(state["counts"])
    bar = tqdm(
        total=len(units),
        initial=sum(len(w) for w in windows[:start]),
        desc=f"prepare {dataset} [{part}]",
        unit="video",
        disable=not progress,
    )
    # (the pool starts at the first result, inside the try: a Ctrl-C then closes the bar)
    results = _results([u for w in windows[start:] for u in w], options, workers,
                       meanwhile=_import_writer)
    try:
        for index in range(start, len(windows)):
            window = windows[index]
            split = window[0].split
            found = [next(results) for _ in window]
            samples = mix_samples([s for r in found for s in r.samples], seed)
            window_samples[index] = len(samples)
            drop = drop_first if index == start else 0
            if samples[drop:] and writer is not None and writer.split != split:
                writer.close()
                writer = None
            if drop == 0:  # this window's skips and counts are not recorded yet
                for r in found:
                    state["skipped"].extend([item, reason] for item, reason in r.skipped)
                    counts.update(r.counts)
                state["counts"] = dict(counts)
                if not samples:
                    # Recorded and nothing to write: a checkpoint from here on (the next
                    # split's first sample closes the last shard) resumes after it, not
                    # at it, where its skips and counts would be recorded again.
                    position[:] = [index, 0]
            for j, sample in enumerate(samples[drop:], drop):
                if writer is None:
                    done = state["splits"].setdefault(split, {"samples": 0, "shards": []})
                    identities.setdefault(split, set())
                    writer = _SplitWriter(
                        out, split, prefix, len(done["shards"]), samples_per_shard, on_shard
                    )
                state["splits"][split]["samples"] += 1
                identities[split].add(sample["identity"])
                if split == "train":
                    landmarks_sum += sample["landmarks"]
                    state["landmarks_count"] += 1
                if state["feature_dim"] is None:
                    state["feature_dim"] = int(
                        np.load(io.BytesIO(sample["files"]["feature.npy"])).shape[0]
                    )
                position[:] = [index, j + 1]
                writer.write(sample)  # checkpoints (on_shard) when it completes a shard
            bar.update(len(window))
        if writer is not None:
            writer.close()
            writer = None
        position[:] = [len(windows), 0]
        checkpoint()
    except OSError as error:  # disk full, permissions: the rerun continues once fixed
        problem = "disk full" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise DataError(error.filename or out, f"cannot write ({problem}); fix it and rerun "
                                                "the same command to continue") from None
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
        results.close()
    manifest = part_manifest(state, run_id, options, dataset, part)
    # The merge (when this is the last part) is checked before anything is written.
    merged = None
    if all(p == part_manifest_path or p.is_file() for p in part_paths(out, num_shards)):
        try:
            merged = merge(out, num_shards, pending=(part_manifest_path, manifest))
        except DataError:
            if not any(s["samples"] for s in manifest["splits"].values()):
                progress_path.unlink(missing_ok=True)  # nothing to keep: the rerun starts afresh
                with contextlib.suppress(OSError):  # and no empty folders: no output at all
                    parts.rmdir()  # (when empty: another part's files stay)
                    for split_dir in sorted(out.iterdir()):
                        if split_dir.is_dir() and not any(split_dir.iterdir()):
                            split_dir.rmdir()
            raise
    with staged_writes() as stage:
        with stage(part_manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)
        if merged is not None:
            with stage(out / MANIFEST, "w") as f:
                json.dump(merged, f, indent=1)
    progress_path.unlink(missing_ok=True)
    if merged is None:  # the other parts may have finished meanwhile (a job array)
        maybe_merge(out, num_shards)
    return manifest


def _import_writer() -> None:
    """Import what ``_SplitWriter`` needs (webdataset imports torch: 1.4 s of CPU)."""
    import webdataset  # noqa: F401


def _results(units: list[Unit], options: Options, workers: int,
             meanwhile=None) -> Iterator[UnitResult]:
    """Process units in ``workers`` processes, results yielded in the units' order.

    One worker: here, one unit after another. More, where the pool can be forked
    (:func:`_forkable`): in a child process forked at once (:func:`_from_child`), which
    loads the models while this process runs ``meanwhile`` (prepare: importing the shard
    writer, which imports torch, 1.4 s of CPU), then computes units beside a pool of
    ``workers - 1`` forked from it with the models in shared memory (:func:`_in_order`),
    and hands each result here in order; this process writes them. Otherwise (spawned
    workers) this process computes units itself beside the pool, ``meanwhile`` run while
    the pool has 16 units per worker to do. A unit's result does not depend on which
    process computes it: the shards are the same for every count.
    """
    # The processors and the pool are made inside the generators, where a Ctrl-C waits
    # for the next check() (and a generator closed before it started has nothing to stop).
    if workers == 1 or len(units) <= 1:

        def one_by_one():
            with _interrupt_between_units() as check:
                processor = _Processor(options)
                for unit in units:
                    check()
                    yield processor(unit)

        return one_by_one()

    def generate_interruptibly():
        with _interrupt_between_units() as check:
            if _forkable(options):
                yield from _from_child(units, options, workers, check, meanwhile)
            else:
                yield from _in_order(units, options, workers, check, meanwhile)

    return generate_interruptibly()


def _in_order(units: list[Unit], options: Options, workers: int, check,
              meanwhile=None) -> Iterator[UnitResult]:
    """Units computed by this process and a pool of ``workers - 1``, yielded in order.

    Units are handed out as they are needed: the pool always has one waiting per
    worker, and this process, between yielding results, takes the next unit nobody has
    taken whenever the one it must yield next is not finished, so neither side waits
    while the other has work. ``meanwhile`` runs here first, while the pool has 16
    units per worker to do.
    """
    from multiprocessing.pool import AsyncResult

    queued = 2 * (workers - 1)  # one running and one waiting per pool worker
    first = 16 * (workers - 1) if meanwhile else 0  # the pool's work during ``meanwhile``
    ahead = 2 * first + 4 * workers  # units taken and not yet written, at most
    taken: dict[int, AsyncResult | UnitResult] = {}  # by unit index, until written
    untaken = 0  # units before it are in ``taken`` or written
    pool = None

    def take(here: bool) -> None:
        """The next unit nobody has taken: computed here, or handed to the pool."""
        nonlocal untaken
        unit = units[untaken]
        taken[untaken] = mine(unit) if here else pool.apply_async(_worker_run, (unit,))
        untaken += 1

    try:
        mine = _Processor(options, single_thread=True)
        pool = _start_pool(workers - 1, options)
        started = _workers(pool)
        for _ in range(min(first, len(units))):
            take(here=False)
        if meanwhile is not None:
            meanwhile()
        for want in range(len(units)):
            while True:
                check()
                pending = sum(isinstance(r, AsyncResult) and not r.ready()
                              for r in taken.values())
                for _ in range(min(queued - pending, len(units) - untaken)):
                    take(here=False)
                result = taken.get(want)
                if result is None:  # the pool is full and this one is nobody's yet
                    take(here=True)
                elif not isinstance(result, AsyncResult) or result.ready():
                    break
                elif untaken < len(units) and len(taken) < ahead:
                    take(here=True)
                else:
                    result.wait(0.25)  # and check() again
                    ended = [w.exitcode for w in started if w.exitcode is not None]
                    if not result.ready() and ended:
                        # one died (the OOM killer): the pool starts another, and the
                        # video it had is lost for ever
                        raise DataError(None, _ended(ended[0]))
            result = taken.pop(want)
            yield result.get() if isinstance(result, AsyncResult) else result
    finally:
        if pool is not None:
            _stop(pool)


def _forkable(options: Options) -> bool:
    """Whether workers can be forked from this process: the dlib path's models are safe
    to share, torch (whose OpenMP threads do not survive a fork) is not imported, and
    the system has fork."""
    import multiprocessing as mp

    return (options.encoder == "dlib" and "torch" not in sys.modules
            and "fork" in mp.get_all_start_methods())


AHEAD_MAX = 128  # results the child may have sent and the command not yet taken


def _from_child(units: list[Unit], options: Options, workers: int, check,
                meanwhile=None) -> Iterator[UnitResult]:
    """Units computed in a child process forked now (:func:`_child_run`), which loads
    the models once and forks its pool from itself, yielded here in order while
    ``meanwhile`` and the writing run here. The models' 0.6 s of loading then overlaps
    this process's work instead of holding up both cores.

    The child runs at most ``ahead`` results ahead of this process (a semaphore), enough
    to keep working through ``meanwhile``. A thread here takes the results off the pipe,
    so that this process notices the child's death even in the middle of a result (a
    child killed while handing one over leaves the rest of it unsent for ever).
    """
    import multiprocessing as mp
    import queue

    # about 1.5 s of the demo corpus's videos, and not more than 128 (memory)
    ahead = min(32 * (workers - 1) + 4 * workers, AHEAD_MAX)
    context = mp.get_context("fork")
    results, room = context.Queue(), context.Semaphore(ahead)
    received: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            for _ in units:
                received.put(results.get())
        except BaseException as error:  # noqa: BLE001  (a result that cannot be read)
            received.put((False, error))

    with sigint_held():  # until the child ignores SIGINT (:func:`_pool`)
        child = context.Process(target=_child_run,
                                args=(units, options, workers, results, room, os.getpid()))
        with _starting(workers):
            child.start()
    reader = threading.Thread(target=receive, name="prepare-results", daemon=True)
    try:
        _widen_pipe(results._reader)  # noqa: SLF001
        reader.start()
        if meanwhile is not None:
            _while_checking(meanwhile, check)
        for _ in units:
            while True:
                check()
                try:
                    done, result = received.get(timeout=0.25)
                    break
                except queue.Empty:
                    check()  # first: a SIGTERM to every process also ends the child
                    if child.exitcode not in (None, 0):  # killed
                        raise DataError(None, _ended(child.exitcode)) from None
            room.release()
            if not done:
                raise result
            yield result
    finally:
        if child.is_alive():
            child.kill()  # its pool's workers die with it (_die_with_parent)
        child.join()
        child.close()
        _stop_reading(reader, results)


def _stop_reading(reader: threading.Thread, results) -> None:
    """End ``reader``, the thread taking results off ``results``, and close the queue's
    pipe, once the child is gone: after an error or an interruption the thread was left
    blocked on the pipe for ever, holding it open (a caller that goes on, a notebook,
    kept both). This process closes its writing end, never used, and the thread reads
    the pipe's end when the child's pool workers, which die with the child, have closed
    theirs. (Not a message put on the queue: a child killed while putting one holds the
    queue's lock for ever, and the put waited on it.)"""
    results._writer.close()  # noqa: SLF001
    reader.join(timeout=5.0)
    if not reader.is_alive():
        results._reader.close()  # noqa: SLF001


def _while_checking(work: Callable[[], None], check: Callable[[], None]) -> None:
    """``work()`` in a thread while this one calls ``check()`` every 0.1 s: a Ctrl-C
    during the shard writer's import (up to 2 s while the child and its pool take both
    cores) then ends the run at once, and the import finishes in its thread, whole,
    instead of being cut (a half-imported torch) or waited for."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001  (raised here)
            failed.append(error)

    thread = threading.Thread(target=run, name="prepare-meanwhile", daemon=True)
    thread.start()
    while thread.is_alive():
        check()
        thread.join(0.1)
    if failed:
        raise failed[0]


def _workers(pool) -> list:
    """The pool's worker processes (a private attribute; best effort: none without it)."""
    return list(getattr(pool, "_pool", ()))


def _ended(code: int | None = None) -> str:
    """What to say when a process computing the units ended before its work was done
    (``code``: its exit code, negative for a signal)."""
    ended = "a worker process ended before its work was done"
    if code is not None and code > 0:  # Python printed the process's error
        return f"{ended} (exit code {code}); its error is printed above"
    how = "out of memory?"
    if code is not None:
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(-code).name}; {how}"
    return f"{ended} ({how}); rerun the same command to continue"


def _child_run(units: list[Unit], options: Options, workers: int, results, room,
               parent: int) -> None:
    """:func:`_from_child`'s process: each result, or the error that stopped it, put on
    ``results`` in the units' order, each once ``room`` (a semaphore) allows."""
    _worker_signals(parent)
    try:
        for result in _in_order(units, options, workers, check=lambda: None):
            room.acquire()
            results.put((True, result))
    except BaseException as error:  # noqa: BLE001  (raised in the command)
        from multiprocessing.pool import ExceptionWithTraceback

        error = _sendable(error)  # raised in the command with this traceback under it
        results.put((False, ExceptionWithTraceback(error, error.__traceback__)))
    results.close()
    results.join_thread()


def _start_pool(processes: int, options: Options):
    """:func:`_pool`, its failure to start said as such (:func:`_starting`)."""
    with _starting(processes):
        return _pool(processes, options)


@contextlib.contextmanager
def _starting(processes: int) -> Iterator[None]:
    """Where worker processes start: a failure to (no processes or pipes left) said as
    such, not as a failure to write the shards."""
    try:
        yield
    except OSError as error:
        raise DataError(None, f"cannot start {processes} worker process(es) "
                              f"({error.strerror or error}); use fewer --workers") from None


def _pool(processes: int, options: Options):
    """The worker pool. Forked from this process after it has loaded the dlib path's
    models, where that is safe, so that the workers start at once with the models in
    shared memory (a spawned worker spends about 2 s of CPU importing and loading them:
    as much as 60 clips of the demo corpus). Spawned where this process has imported
    torch (its OpenMP threads do not survive a fork) or where a worker needs torch (the
    vggface encoder), and where the system has no fork."""
    import multiprocessing as mp

    fork = _forkable(options)
    if fork:
        from speech2face import faces

        faces.load_models(options.detector)
    context = mp.get_context("fork" if fork else "spawn")
    if not fork and SIGNAL_MASKS:
        # Spawning starts multiprocessing's resource tracker once, and unblocks SIGINT
        # after it (whatever the mask was): started first, it leaves the mask alone.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    # The workers start with SIGINT blocked (a mask outlives fork and exec) until
    # _worker_init ignores it; a spawned one takes seconds to get there. This process
    # takes a Ctrl-C sent meanwhile once the pool is made; the pool's own threads, made
    # here, keep it blocked (Python handles signals in the main thread).
    with sigint_held():
        pool = context.Pool(processes, initializer=_worker_init,
                            initargs=(options, os.getpid()))
    _widen_result_pipe(pool)
    return pool


# A unit's result (its clips' JPEG frames, FLAC audio and features) is about 0.4 MB on
# the demo corpus; Linux's default pipe holds 64 kB.
RESULT_PIPE_BYTES = 1 << 20


def _widen_result_pipe(pool) -> None:
    """Let the pool's result pipe hold a few whole results (:func:`_widen_pipe`).

    A worker hands its result to this process through a pipe, and blocks while the pipe
    is full until this process's result thread reads it. That thread needs the GIL,
    which this process's own work holds for tens of milliseconds at a time (dlib's
    detector and shape predictor do not release it), so with the default 64 kB pipe the
    worker waited about 10 ms after every video: 0.5 s of a 2-worker run of the demo
    corpus (docs/benchmarks.md). Best effort: the pipe is the pool's own (a private
    attribute).
    """
    _widen_pipe(getattr(getattr(pool, "_outqueue", None), "_reader", None))


def _widen_pipe(reader) -> None:
    """A pipe connection's capacity raised to RESULT_PIPE_BYTES (Linux; elsewhere, or
    where the kernel refuses the size, a no-op)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setpipe is None or reader is None or not hasattr(reader, "fileno"):
        return
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        limit = RESULT_PIPE_BYTES
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(reader.fileno(), setpipe, min(RESULT_PIPE_BYTES, limit))


# ================================================================================== CLI


# The processing options and their defaults. The parser leaves an option that is not
# given None, so that --merge can refuse every one given with it, whatever its value
# (the parts ran with their own); prepare_command then fills in these defaults.
PROCESSING_DEFAULTS = {
    "workers": 1, "shard_index": 0, "encoder": "dlib", "encoder_weights": None,
    "detector": "hog", "samples_per_shard": SAMPLES_PER_SHARD,
    "frames_per_video": FRAMES_PER_VIDEO, "crops_per_sample": CROPS_PER_SAMPLE,
    "identity_threshold": SAME_PERSON_DISTANCE, "identity_linkage": "average", "seed": 0,
    "mix_clips": MIX_CLIPS, "descriptors_only": False,
}


def add_prepare_arguments(parser) -> None:
    from speech2face.cli import bounded, seed

    defaults = PROCESSING_DEFAULTS  # the help texts name them

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
        "--workers", type=bounded(int, 1, MAX_WORKERS, "number of workers"), default=None,
        help=f"processes working on videos (default {defaults['workers']})"
    )
    parser.add_argument(
        "--shard-index",
        type=bounded(int, 0, None, "shard index"),
        default=None,
        help="this machine's index in [0, --num-shards) "
        f"(default {defaults['shard_index']})",
    )
    parser.add_argument(
        "--num-shards",
        type=bounded(int, 1, None, "number of shards"),
        default=None,
        help="machines splitting the videos between them (default 1; with --merge: the "
        "count of the parts in --out)",
    )
    parser.add_argument(
        "--encoder", default=None, help="face encoder for the stored features "
        f"(default {defaults['encoder']})"
    )
    parser.add_argument(
        "--encoder-weights", default=None, help="weights file for the face encoder (vggface)"
    )
    parser.add_argument(
        "--detector", default=None, choices=("hog", "cnn"),
        help=f"dlib face detector (default {defaults['detector']})",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=bounded(int, 1, MAX_SAMPLES_PER_SHARD, "number of samples"),
        default=None,
        help=f"samples per tar shard (default {defaults['samples_per_shard']})",
    )
    parser.add_argument(
        "--frames-per-video",
        type=bounded(int, 1, MAX_FRAMES, "number of frames"),
        default=None,
        help=f"face frames used per video (default {defaults['frames_per_video']})",
    )
    parser.add_argument(
        "--crops-per-sample",
        type=bounded(int, 1, MAX_FRAMES, "number of crops"),
        default=None,
        help=f"face crops stored with each clip (default {defaults['crops_per_sample']})",
    )
    parser.add_argument(
        "--identity-threshold",
        type=bounded(float, 0, MAX_IDENTITY_THRESHOLD, "identity threshold"),
        default=None,
        help="AVSpeech: videos whose faces are this close (dlib distance) are one person "
        f"(default {defaults['identity_threshold']}, dlib's guidance; 0: each video its own "
        "identity)",
    )
    parser.add_argument(
        "--identity-linkage",
        default=None,
        choices=LINKAGES,
        help="AVSpeech: how videos group into people "
        f"(default {defaults['identity_linkage']}; docs/data.md)",
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="seed of the mixed order in which samples are written "
        f"(default {defaults['seed']})",
    )
    parser.add_argument(
        "--mix-clips",
        type=bounded(int, 1, MAX_SAMPLES_PER_SHARD, "number of clips"),
        default=None,
        help="clips per mixing window, held in memory "
        f"(~150 kB each; default {defaults['mix_clips']})",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="only merge the finished parts' manifests into manifest.json",
    )
    parser.add_argument(
        "--descriptors-only",
        action="store_true",
        default=None,
        help="AVSpeech, step 1 of a job array: only embed the faces of this job's videos "
        "that identity merging needs into OUT/parts/descriptors (docs/data.md)",
    )


def prepare_output(args) -> tuple[Path, bool]:
    """What a prepare run locks (``cli.main``): the whole ``--out``, except one machine's
    part of a cluster run (``--num-shards`` > 1), since the other machines write their
    parts into the same folder at the same time."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; the output is a folder")
    if (args.num_shards or 1) > 1 and not args.merge:
        return out / PARTS_DIR / part_name(args.shard_index or 0, args.num_shards), False
    return out, True


def _check_merge_alone(args) -> None:
    """``--merge`` only merges: a dataset or processing option given with it would be
    silently ignored (the parts were prepared with their own)."""
    given = [name for name in ("dataset", "root", *PROCESSING_DEFAULTS)
             if getattr(args, name) is not None]
    if given:
        names = ", ".join("the dataset" if n == "dataset" else "--" + n.replace("_", "-")
                          for n in given)
        raise ConfigError("--merge", f"only merges the finished parts in --out (with "
                                     f"--num-shards); drop {names}")


def prepare_command(args) -> int:
    start = time.perf_counter()
    if args.merge:
        _check_merge_alone(args)
    # The options of identity merging, which VoxCeleb's given identities need not.
    for option in ("identity_threshold", "identity_linkage", "descriptors_only"):
        if args.dataset not in (None, "avspeech") and getattr(args, option) is not None:
            raise ConfigError("--" + option.replace("_", "-"), "is for avspeech (whose "
                              f"identities are found from faces), not {args.dataset}")
    for name, default in PROCESSING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.merge:
        manifest = merge_manifests(args.out, args.num_shards)
    elif args.dataset is None or args.root is None:
        raise DataError(None, "give the dataset and --root (or --merge to merge finished parts)")
    elif args.descriptors_only:
        with sharding_claim(args.out, args.num_shards or 1, "prepare"):
            counts = store_descriptors(
                args.root, args.out, args.shard_index, args.num_shards or 1,
                detector=args.detector, frames_per_video=args.frames_per_video)
        print(f"{Path(args.out) / PARTS_DIR / STORE_DIR}: {counts['computed']} videos embedded "
              f"now, {counts['stored']} there before, {counts['downloaded']} from download's "
              f"descriptors; {counts['without_face']} without a face "
              f"({time.perf_counter() - start:.1f} s)")
        return 0
    else:
        # Parts of one array run side by side; a run of another count beside them is not.
        with sharding_claim(args.out, args.num_shards or 1, "prepare"):
            part = prepare(
                args.dataset,
                args.root,
                args.out,
                workers=args.workers,
                shard_index=args.shard_index,
                num_shards=args.num_shards or 1,
                encoder=args.encoder,
                samples_per_shard=args.samples_per_shard,
                encoder_weights=args.encoder_weights,
                detector=args.detector,
                frames_per_video=args.frames_per_video,
                crops_per_sample=args.crops_per_sample,
                identity_threshold=args.identity_threshold,
                identity_linkage=args.identity_linkage,
                seed=args.seed,
                mix_clips=args.mix_clips,
            )
        manifest = part
    what = (f"{args.out} (part {args.shard_index} of {args.num_shards})"
            if (args.num_shards or 1) > 1 and not args.merge else args.out)
    print(
        f"{what}: samples {_sizes(manifest)}; {len(manifest['skipped'])} inputs skipped "
        f"({time.perf_counter() - start:.1f} s)"
    )
    merging = manifest.get("identity_merging") or manifest.get("run", {}).get("identity_merging")
    if merging:
        print(
            f"identities: {merging['videos']} videos -> {merging['identities']} identities "
            f"({merging['merged_videos']} videos merged into another's identity, "
            f"{merging['moved_videos']} moved to another split)"
        )
    if (Path(args.out) / MANIFEST).is_file():
        if not args.merge:
            if (args.num_shards or 1) > 1:  # the last part: the note is on the whole run's
                manifest = load_manifest(args.out)
                print(f"all {args.num_shards} parts merged: samples {_sizes(manifest)}")
            print(f"manifest: {Path(args.out) / MANIFEST}")
        _say_missing_splits(manifest["splits"])
    return 0


def _sizes(manifest: dict) -> str:
    return ", ".join(f"{s}: {v['samples']}" for s, v in manifest["splits"].items()) or "none"


def _say_missing_splits(splits: dict) -> None:
    """A note on stderr for a split that came out empty beside a training split: training
    validates on 'val' and evaluation reads 'test', and either would refuse it later."""
    import sys

    if not splits.get("train", {}).get("samples"):
        return
    for split, reader in (("val", "training validates on it (or train with val_batches=0)"),
                          ("test", "`evaluate` reads it")):
        if not splits.get(split, {}).get("samples"):
            print(f"speech2face prepare: note: no {split!r} samples: {reader}; more "
                  f"identities, or a split file (ROOT/{SPLIT_FILE}; docs/data.md, \"Splits\"), "
                  f"give it some", file=sys.stderr)
