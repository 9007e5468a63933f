"""Shards to training batches: :class:`ShardDataset`, :func:`make_loader`, :func:`load_split`.

The end of the module is what the training loop reads (:func:`speech2face.train.fit`):
:class:`ShardData` and :class:`InMemoryData` give each process its micro-batches in an
order fixed by ``(seed, epoch)``, so a resumed run re-creates it; :func:`training_data`
picks the training and validation splits; :func:`training_features` reads only the face
features and identities of the training split (standardisation, the identity classifier).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from speech2face.audio import MIN_SECONDS, SAMPLE_RATE, fit_duration, seconds_samples
from speech2face.data.datasets import CLIP_SECONDS
from speech2face.data.shards import (
    MANIFEST,
    _decode_jpeg,
    check_shard,
    iterate_tar,
    load_manifest,
)
from speech2face.distributed import Placement
from speech2face.errors import ConfigError, DataError
from speech2face.faces import CROP_SIZE
from speech2face.utils import is_number, is_whole, seed_problem, sigint_held

if TYPE_CHECKING:
    from speech2face.config import TrainConfig


def decode_sample(raw: dict, seconds: float = CLIP_SECONDS, crop: int = 0,
                  audio: bool = True, *, faces: bool = True, feature_dim: int | None = None,
                  identities=None, split: str | None = None) -> dict:
    """Decode one raw sample: ``wave (N,)`` float32 (fitted to ``seconds``), ``face``
    uint8 ``(224, 224, 3)``, ``landmarks (68, 2)``, ``feature (D,)`` and ``meta``.

    crop: which stored crop to use (0: ``face.jpg``; k: ``face.k.jpg``).
    audio: False leaves the audio undecoded (no ``wave``): the face decoder's stage
    trains on faces and features only.
    faces: False leaves the face image undecoded (no ``face``): the voice encoder's
    training batches need its feature, not its image.
    feature_dim, identities: the manifest's; the sample's feature length and identity
    are checked against them when given. split: the split being read; a sample that
    says it belongs to another is refused (a test clip in a training shard).

    Raises:
        DataError: naming the shard and the key, for a member that is missing, cannot be
            decoded or is not what the shard format says (docs/data.md "Shard format").
    """
    try:
        sample = {}
        if audio:
            sample["wave"] = fit_duration(_decode_flac(raw["flac"]), seconds)
        if faces:
            sample["face"] = _decode_jpeg(raw[f"face{_suffix(crop)}.jpg"])
        sample.update({
            "landmarks": _load_npy(raw[f"landmarks{_suffix(crop)}.npy"]),
            "feature": _load_npy(raw[f"feature{_suffix(crop)}.npy"]),
            "meta": json.loads(raw["json"]),
        })
        problem = _sample_problem(sample, feature_dim, identities, split)
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise _undecodable(raw, problem)
    return sample


def _undecodable(raw: dict, problem: str) -> DataError:
    return DataError(raw.get("__url__"), f"undecodable sample {raw.get('__key__')} ({problem})")


def sample_feature(raw: dict, feature_dim: int | None = None, identities=None,
                   split: str | None = None) -> tuple:
    """A raw sample's face feature (its first crop's, float32 ``(D,)``) and identity,
    checked as :func:`decode_sample` checks them, with nothing else decoded.

    Raises:
        DataError: naming the shard and the key.
    """
    try:
        meta = json.loads(raw["json"])
        feature = _load_npy(raw["feature.npy"])
        problem = (_meta_problem(meta, identities, split)
                   or _feature_problem(feature, feature_dim))
    except (KeyError, ValueError, RuntimeError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise _undecodable(raw, problem)
    return feature, meta["identity"]


def _suffix(crop: int) -> str:
    """The member name suffix of a stored crop (0: ``face.jpg``; k: ``face.k.jpg``)."""
    return "" if crop == 0 else f".{crop}"


def _decode_flac(data: bytes) -> np.ndarray:
    """A sample's audio: mono at 16 kHz, as prepare writes it (ValueError otherwise)."""
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.format != "FLAC":
            raise ValueError(f"audio is {f.format}, the format is FLAC")
        if f.channels != 1 or f.samplerate != SAMPLE_RATE:
            raise ValueError(f"audio is {f.channels} channel(s) at {f.samplerate} Hz, "
                             f"the format is mono at {SAMPLE_RATE} Hz")
        wave = f.read(dtype="float32")
    if wave.size == 0:
        raise ValueError("audio has no samples")
    return wave


# The header numpy writes for a plain array: {'descr': '<f4', 'fortran_order': False,
# 'shape': (68, 2), } padded with spaces to a line.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[A-Za-z]\d*)', 'fortran_order': (True|False), "
                         r"'shape': \(((?:\d+, ?)*\d*,?)\), \} *\n")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, where the data start) of ``.npy`` bytes.

    numpy's own reader parses the header with ``ast.literal_eval``, which CPython 3.11.7
    can fail at random in a loader worker ("SystemError: AST constructor recursion depth
    mismatch", python/cpython#106905); the headers numpy writes for plain arrays are read
    here with a pattern instead, and any other header by numpy."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    width = {(1, 0): 2, (2, 0): 4}.get(version)
    if width is None:
        raise ValueError(f"npy format version {version} is not one numpy writes here")
    start = buffer.tell() + width
    end = start + int.from_bytes(data[buffer.tell():start], "little")
    match = _NPY_HEADER.fullmatch(data[start:end].decode("latin1"))
    if match is None:  # not as numpy writes a plain array: numpy's reader decides
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(buffer)
        return shape, fortran, dtype, buffer.tell()
    descr, fortran, dims = match.groups()
    shape = tuple(int(d) for d in dims.split(",") if d.strip())
    return shape, fortran == "True", np.dtype(descr), end


def _load_npy(data: bytes) -> np.ndarray:
    """An array from a shard member's ``.npy`` bytes; ValueError where its header claims
    more (or less) than the member holds: a damaged header of a 4e9-element shape would
    otherwise be allocated before the data ran short. Never unpickles."""
    shape, fortran, dtype, offset = _npy_header(data)
    need = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or need != len(data) - offset:
        raise ValueError(f"an npy member whose header claims {shape} {dtype} "
                         f"({need} bytes) holds {len(data) - offset} bytes")
    flat = np.frombuffer(data, dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _sample_problem(sample: dict, feature_dim: int | None, identities,
                    split: str | None = None) -> str | None:
    """What in a decoded sample is not what the shard format says, or None."""
    meta, landmarks = sample["meta"], sample["landmarks"]
    if problem := _meta_problem(meta, identities, split):
        return problem
    if "face" in sample and sample["face"].shape != (CROP_SIZE, CROP_SIZE, 3):
        return f"face is {sample['face'].shape[1]} x {sample['face'].shape[0]} pixels, " \
               f"not {CROP_SIZE} x {CROP_SIZE}"
    if landmarks.shape != (68, 2) or not _finite_float32(landmarks):
        return f"landmarks are {landmarks.dtype} {landmarks.shape}, not finite float32 (68, 2)"
    return _feature_problem(sample["feature"], feature_dim)


def _meta_problem(meta, identities, split: str | None) -> str | None:
    if not isinstance(meta, dict) or not isinstance(meta.get("identity"), str):
        return "json is not an object with an 'identity' name"
    if identities is not None and meta["identity"] not in identities:
        return f"identity {meta['identity']!r} is not in the manifest's identities"
    if split is not None and meta.get("split", split) != split:
        return f"a sample of the {meta['split']!r} split in a {split!r} shard"
    return None


def _feature_problem(feature: np.ndarray, feature_dim: int | None) -> str | None:
    if feature.ndim != 1 or feature_dim not in (None, len(feature)) or not _finite_float32(feature):
        return f"feature is {feature.dtype} {feature.shape}, not {feature_dim or 'D'} finite " \
               f"float32"
    return None


def _finite_float32(array: np.ndarray) -> bool:
    """float32 (what prepare writes; the batches' dtype) and finite."""
    return array.dtype == np.float32 and bool(np.isfinite(array).all())


def collate(samples: list[dict], identity_index: dict[str, int], spectrogram: bool = False) -> dict:
    """Stack decoded samples into the batch of docs/architecture.md "Shards".

    Returns ``wave (B, N)`` (or ``spectrogram (B, 2, T, 257)``; neither for samples
    decoded without audio), ``feature (B, D)``,
    ``face (B, 3, 224, 224)`` float in [0, 1] (not for samples decoded without faces),
    ``landmarks (B, 68, 2)``,
    ``identity_index (B,)`` int64 and ``meta`` (list of dicts; the loader adds each
    sample's shard ``key`` and ``crop``).
    """
    batch = {
        "feature": torch.from_numpy(np.stack([s["feature"] for s in samples])),
        "landmarks": torch.from_numpy(np.stack([s["landmarks"] for s in samples])),
        "identity_index": torch.tensor([identity_index[s["meta"]["identity"]] for s in samples]),
        "meta": [s["meta"] for s in samples],
    }
    if "face" in samples[0]:
        faces = torch.from_numpy(np.stack([s["face"] for s in samples]))
        batch["face"] = faces.permute(0, 3, 1, 2).float().div_(255.0)
    if "wave" not in samples[0]:
        return batch
    wave = torch.from_numpy(np.stack([s["wave"] for s in samples]))
    if spectrogram:
        from speech2face.audio import spectrogram as compute

        batch["spectrogram"] = compute(wave)
    else:
        batch["wave"] = wave
    return batch


def _check_count(name: str, value, low: int = 1) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is None or an integer >= ``low``."""
    if value is not None and not is_whole(value, low):
        raise ConfigError(None, f"{name} must be an integer >= {low}, got {value!r}")


def _check_reading(batch_size, seconds, rank, world_size) -> None:
    """Raise ConfigError naming the first argument of a split's reading that is invalid."""
    _check_count("batch_size", batch_size)
    if not (is_number(seconds) and seconds >= 1 / SAMPLE_RATE):
        raise ConfigError(None, f"seconds must be a number >= 1 / {SAMPLE_RATE} (one "
                                f"sample), got {seconds!r}")
    _check_count("world_size", world_size)
    _check_count("rank", rank, 0)
    if (rank is None) != (world_size is None):
        raise ConfigError(None, "rank and world_size go together: give both, or neither "
                                "(then torch.distributed's, or one process)")
    if rank is not None and rank >= world_size:  # (given together: checked above)
        raise ConfigError(None, f"rank must be below world_size ({world_size}), got {rank}")


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
    window_seconds: a random window of this many seconds of the ``seconds`` of audio, a
    new one at each visit (training's ``train_seconds``); None keeps all ``seconds``.
    audio: False skips decoding the audio (batches without ``wave``/``spectrogram``).
    faces: False skips decoding the face images (batches without ``face``).
    cache: a :class:`SampleCache` that keeps shards read and samples decoded in this
    process for later epochs (no DataLoader workers: theirs would die with them).
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
        window_seconds: float | None = None,
        audio: bool = True,
        faces: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        cache: SampleCache | None = None,
    ):
        super().__init__()
        _check_reading(batch_size, seconds, rank, world_size)
        if shuffle is not False and not is_whole(shuffle, 0):  # False: file order
            raise ConfigError(None, f"shuffle must be a buffer size >= 0 (0: file order), "
                                    f"got {shuffle!r}")
        if problem := seed_problem(seed):
            raise ConfigError(None, problem)
        if not isinstance(split, str):
            raise ConfigError(None, f"split must be a name ('train', 'val', 'test'), "
                                    f"got {split!r}")
        self.manifest = load_manifest(path)
        if split not in self.manifest["splits"]:
            raise DataError(
                Path(self.manifest["root"]) / MANIFEST,
                f"no {split!r} split (has {sorted(self.manifest['splits'])})",
            )
        self.split = split
        self.root = Path(self.manifest["root"])
        self.entries = self.manifest["splits"][split]["shards"]
        self.shards = [self.root / s["path"] for s in self.entries]
        self.num_samples = self.manifest["splits"][split]["samples"]
        self.identity_index = {
            identity: i for i, identity in enumerate(self.manifest["identities"])
        }
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.seconds, self.spectrogram, self.repeat = seconds, spectrogram, repeat
        self.drop_last, self.random_crop, self.audio = drop_last, random_crop, audio
        self.faces = faces
        if window_seconds is not None and not (is_number(window_seconds)
                                               and 1 / SAMPLE_RATE <= window_seconds <= seconds):
            raise ConfigError(None, f"window_seconds must be from 1 / {SAMPLE_RATE} (one "
                                    f"sample) to seconds ({seconds}), got {window_seconds!r}")
        heard = seconds if window_seconds is None else window_seconds
        if spectrogram and heard < MIN_SECONDS:
            name = "seconds" if window_seconds is None else "window_seconds"
            raise ConfigError(None, f"{name} must be at least {MIN_SECONDS} (one STFT window) "
                                    f"for spectrograms, got {heard!r}")
        self.window = None if window_seconds is None else seconds_samples(window_seconds)
        self.rank, self.world_size = rank, world_size
        self.cache = cache
        if cache is not None:
            cache.bind((str(self.root), split, seconds, audio, faces))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently in the next pass (as DistributedSampler.set_epoch)."""
        if not is_whole(epoch, 0):
            raise ConfigError(None, f"epoch must be an integer >= 0, got {epoch!r}")
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
        return [self.shards[i] for i in self._order(reader, readers, epoch)]

    def _order(self, reader: int, readers: int, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return order[reader::readers]

    def _raw(self, reader: int, readers: int, epoch: int) -> Iterator[dict]:
        """The raw samples of this reader's shards, each shard checked against the manifest."""
        for i in self._order(reader, readers, epoch):
            entry = self.entries[i]

            def read(i=i, entry=entry):
                return iterate_tar(self.shards[i], entry["size"], entry["sha256"],
                                   entry["samples"])

            yield from read() if self.cache is None else self.cache.shard(entry["path"], read)

    def samples(self) -> Iterator[dict]:
        """Decoded single samples of this reader (all epochs when ``repeat``).

        Per epoch a webdataset pipeline: this reader's shards (checked, expanded, grouped
        by key), a shuffle buffer of ``shuffle`` samples, decoding.
        """
        import webdataset as wds

        reader, readers = self._reader()
        # In a DataLoader worker, make_loader has said it once for all of them.
        if reader >= len(self.shards) > 0 and not getattr(self, "_warned", False) \
                and torch.utils.data.get_worker_info() is None:
            self._warned = True
            warnings.warn(
                f"reader {reader} of {readers} has no shard to read ({len(self.shards)} shards)",
                stacklevel=2,
            )
        epoch = self.epoch
        while True:
            seeds = [self.seed, epoch, reader]
            crop_rng = np.random.default_rng(seeds)
            stages = [lambda: self._raw(reader, readers, epoch)]  # noqa: B023 - called at once
            if self.shuffle > 1:
                rng = random.Random(int(np.random.SeedSequence(seeds).generate_state(1)[0]))
                stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, rng=rng))
            stages.append(wds.map(lambda raw: self._decode(raw, crop_rng)))  # noqa: B023
            yield from wds.DataPipeline(*stages)
            epoch += 1
            if not self.repeat or reader >= len(self.shards):  # (an idle reader spun forever)
                return

    def _decode(self, raw: dict, rng: np.random.Generator) -> dict:
        crop = 0
        if self.random_crop:
            n = sum(1 for k in raw if k.startswith("face") and k.endswith(".jpg"))
            crop = int(rng.integers(n)) if n > 1 else 0
        def decode():
            return decode_sample(raw, self.seconds, crop, self.audio, faces=self.faces,
                                 feature_dim=self.manifest["feature_dim"],
                                 identities=self.identity_index, split=self.split)

        sample = decode() if self.cache is None else self.cache.decoded(raw, crop, decode)
        # which stored sample and crop this is (train.KeptTargets keys on them)
        sample = {**sample, "meta": {**sample["meta"], "key": raw.get("__key__"), "crop": crop}}
        if self.window is not None and "wave" in sample:
            start = int(rng.integers(len(sample["wave"]) - self.window + 1))
            sample["wave"] = sample["wave"][start:start + self.window]
        return sample

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        if self.batch_size is None:
            for sample in self.samples():
                yield collate([sample], self.identity_index, self.spectrogram)
            return
        yield from wds.batched(
            self.batch_size,
            collation_fn=lambda b: collate(b, self.identity_index, self.spectrogram),
            partial=not self.drop_last,
        )(self.samples())


class MemoryBudget:
    """What a cache keeps while it fits in ``budget_bytes``: :meth:`_keep` counts the bytes
    it takes on; once they pass the budget the cache is ``full``, :meth:`_drop` empties it,
    and it keeps nothing more. :class:`SampleCache` and ``train.KeptTargets`` share it."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self.full = budget_bytes <= 0

    def _keep(self, nbytes: int) -> None:
        if self.full:
            return
        self.bytes += nbytes
        if self.bytes > self.budget:
            self.full = True
            self._drop()

    def _drop(self) -> None:
        raise NotImplementedError


class SampleCache(MemoryBudget):
    """Shards read and samples decoded, kept in memory across epochs while they fit.

    Training on a small split (the demo: 191 clips, 67 passes of the decoder) otherwise
    spends about a tenth of its time reading, checking and decoding the same shards again
    every epoch. The first pass reads as usual and keeps each shard's raw samples and each
    decoded ``(sample, crop)``; later passes take them from here. The order of samples and
    every random draw (shuffle buffer, crops, audio windows) stay those of an uncached
    run, so the batches are the same to the last bit. Once the kept bytes pass
    ``budget_bytes`` the cache empties itself and keeps nothing more (a split too big to
    hold, as VoxCeleb2, is read from disk every epoch as without a cache).

    One cache serves one (folder, split, seconds, audio, faces): :meth:`bind` refuses another.
    Decoded arrays are handed out read-only, so that no consumer can change a later epoch's
    sample in place.
    """

    def __init__(self, budget_bytes: int):
        super().__init__(budget_bytes)
        self._shards: dict[str, list[dict]] = {}
        self._decoded: dict[tuple[str, str, int], dict] = {}
        self._binding = None

    def bind(self, binding: tuple) -> None:
        if self._binding is not None and self._binding != binding:
            raise ValueError(f"this SampleCache holds {self._binding}, not {binding}")
        self._binding = binding

    def shard(self, path: str, read) -> Iterator[dict]:
        """The raw samples of the shard at ``path``: kept ones, or ``read()``'s, kept
        once the shard has been read to its end while they fit."""
        if path in self._shards:
            yield from self._shards[path]
            return
        if self.full:
            yield from read()
            return
        samples = []
        for raw in read():
            samples.append(raw)
            yield raw
        self._keep(sum(len(v) for raw in samples for v in raw.values()
                       if isinstance(v, bytes)))
        if not self.full:
            self._shards[path] = samples

    def decoded(self, raw: dict, crop: int, decode) -> dict:
        """``decode()``'s sample for ``raw`` and ``crop``, decoded once while it fits."""
        key = (raw.get("__url__"), raw.get("__key__"), crop)
        sample = self._decoded.get(key)
        if sample is None:
            sample = decode()
            arrays = [v for v in sample.values() if isinstance(v, np.ndarray)]
            self._keep(sum(a.nbytes for a in arrays))
            if self.full:
                return sample
            for array in arrays:
                array.flags.writeable = False
            self._decoded[key] = sample
        return {**sample, "meta": dict(sample["meta"])}

    def _drop(self) -> None:
        self._shards.clear()
        self._decoded.clear()


_SAID_IDLE: set = set()  # (folder, split, readers) that make_loader has warned of


def make_loader(
    path,
    split: str = "train",
    batch_size: int = 8,
    num_workers: int = 0,
    *,
    pin_memory: bool = False,
    epoch: int = 0,
    **dataset_options,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ShardDataset`; batching happens in the worker processes.

    epoch: the pass whose shuffled order to stream (:meth:`ShardDataset.set_epoch`).
    dataset_options: passed to ShardDataset (shuffle, seed, spectrogram, repeat, ...).
    Training reads its batches through this too (:class:`ShardData`).
    """
    if not is_whole(num_workers, 0):
        raise ConfigError(None, f"num_workers must be an integer >= 0, got {num_workers!r}")
    dataset = ShardDataset(path, split, batch_size=batch_size, **dataset_options)
    dataset.set_epoch(epoch)
    processes = dataset._reader()[1]
    readers = max(1, num_workers) * processes  # workers x processes
    shards = len(dataset.shards)
    who = (f"{readers} readers ({processes} processes x {max(1, num_workers)} loader "
           f"worker{'s' if num_workers > 1 else ''})" if processes > 1
           else f"{readers} loader workers")
    if dataset.repeat and 0 < shards < readers:  # (the idle reader's rank waited forever)
        raise ConfigError(None, f"{split}: {shards} shard(s) for {who}: with repeat=True a "
                                "reader without a shard never yields a batch; use at most "
                                f"{shards} readers, or prepare more shards "
                                "(--samples-per-shard)")
    idle = (str(dataset.root), split, readers)
    if 0 < shards < readers and num_workers > 0 and idle not in _SAID_IDLE:
        _SAID_IDLE.add(idle)  # once, not for every worker and epoch
        warnings.warn(f"{split}: {shards} shard(s) for {who}: {readers - shards} of them "
                      "have nothing to read (use at most as many readers as shards: fewer "
                      "workers or processes, or prepare more shards)", stacklevel=2)
    return _Loader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0 and dataset.repeat,
        prefetch_factor=4 if num_workers > 0 else None,
        # The dataset seeds its own order and crops (seed, epoch). A generator of its own
        # keeps each new iterator from drawing its workers' base seed from torch's global
        # one, which training may draw from (dropout): a resumed run, which starts its
        # iterator at another point of that stream, would then draw otherwise.
        generator=torch.Generator().manual_seed(0),
    )


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' errors come out as the project's own.

    torch re-raises a worker's exception as ``type(msg)`` with the worker's traceback
    for a message; an error of speech2face.errors takes two arguments, so that turns it
    into a RuntimeError. Here it becomes the original class with its one-line message.
    """

    def __iter__(self):
        iterator = super().__iter__()
        if self.num_workers == 0:
            return iterator
        return _worker_errors(iterator)


def _worker_errors(iterator) -> Iterator:
    from speech2face import errors

    try:
        yield from iterator
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        caught = re.match(r"Caught (\w+) in DataLoader worker", lines[0] if lines else "")
        kind = getattr(errors, caught.group(1), None) if caught else None
        prefix = f"{kind.__module__}.{kind.__name__}: " if kind else ""
        if not (isinstance(kind, type) and issubclass(kind, errors.Speech2FaceError)
                and lines[-1].startswith(prefix)):
            raise
        raise kind(None, lines[-1][len(prefix):]) from None


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
    _check_count("max_samples", max_samples)
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



# ---------------------------------------------------------------------------- training's data
# What :func:`speech2face.train.fit` reads: batches in an order fixed by ``(seed, epoch)``,
# cut by process and accumulation step (:class:`InMemoryData`, :class:`ShardData`), and the
# training and validation splits of a shard folder (:func:`training_data`).


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's sample order: a fixed function of the run seed and the epoch."""
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63)


class InMemoryData:
    """Batches from tensors held in memory, in the loop's deterministic order.

    Every epoch is a permutation drawn from ``(seed, epoch)``; it is cut into global
    batches of ``micro_batch * world_size * grad_accum`` samples (the tail that does not
    fill one is dropped), and micro-batch ``a * world_size + rank`` of each global batch
    goes to accumulation step ``a`` of process ``rank``. Any split of the same global
    batch over processes and accumulation steps therefore sees the same samples, which
    makes a 2-process run comparable to a 1-process run with 2 accumulation steps.

    Args:
        tensors: name -> ``(N, ...)`` tensor, all with the same N.
        micro_batch: samples per micro-batch of one process.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], micro_batch: int, seed: int = 0,
                 placement: Placement | None = None, grad_accum: int = 1, shuffle: bool = True):
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {sorted(sizes)}")
        self.tensors = tensors
        self.size = sizes.pop()
        self.micro_batch = micro_batch
        self.seed = seed
        self.placement = placement or Placement()
        self.grad_accum = grad_accum
        self.shuffle = shuffle

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """This process's micro-batches of ``epoch`` in order, the first ``skip`` left out."""
        world, rank = self.placement.world_size, self.placement.rank
        per_step = self.micro_batch * world * self.grad_accum
        order = self.order(epoch)
        count = 0
        for step in range(self.size // per_step):
            for a in range(self.grad_accum):
                if count >= skip:
                    start = step * per_step + (a * world + rank) * self.micro_batch
                    index = order[start:start + self.micro_batch]
                    yield {k: v[index] for k, v in self.tensors.items()}
                count += 1


class ShardData:
    """Batches from ``prepare``'s shards (:class:`ShardDataset`) in a fixed order.

    Epoch ``e`` streams with the shuffle seed ``epoch_seed(seed, e)``, so its order is a
    function of the run seed, the epoch, the process count and the worker count; resuming
    re-creates it and skips the consumed micro-batches (they are read and dropped, which
    costs reading time but keeps the order exact).
    """

    def __init__(self, root: str | os.PathLike, split: str, micro_batch: int, config: TrainConfig,
                 placement: Placement | None = None, spectrogram: bool = False,
                 shuffle: bool = True):
        self.root = Path(root)
        self.split = split
        self.micro_batch = micro_batch
        self.config = config
        self.placement = placement or Placement()
        self.spectrogram = spectrogram
        self.shuffle = shuffle
        # Without loader workers the samples are read in this process, which can keep
        # them from epoch to epoch (SampleCache); workers start afresh every epoch.
        self.workers = config.num_workers if shuffle else 0
        self.cache = (SampleCache(config.sample_cache_mb * 2**20)
                      if self.workers == 0 and config.sample_cache_mb > 0 else None)

    @property
    def fingerprint(self) -> str:
        """What the split holds, as a checkpoint records it: a hash of its shards' SHA-256
        (the manifest's), so the same wherever the folder is, and another for other data
        or the same data prepared otherwise."""
        shards = load_manifest(self.root)["splits"].get(self.split, {}).get("shards", [])
        return hashlib.sha256(" ".join(s["sha256"] for s in shards).encode()).hexdigest()

    def loader(self, epoch: int):
        """The DataLoader (:func:`make_loader`) of one epoch of this process. Batches are
        collated (and spectrograms computed) in ``config.num_workers`` worker processes
        (none for validation); the DataLoader takes the workers' batches round-robin, so
        the order is fixed for a given worker count."""
        return make_loader(
            self.root, self.split, batch_size=self.micro_batch,
            num_workers=self.workers, pin_memory=torch.cuda.is_available(), epoch=epoch,
            shuffle=self.config.shuffle_buffer if self.shuffle else 0, seed=self.config.seed,
            spectrogram=self.spectrogram, drop_last=self.shuffle, seconds=self.config.clip_seconds,
            # Training draws one of the sample's stored crops (prepare's crops_per_sample)
            # per visit, with its own landmarks and feature; validation uses the first.
            random_crop=self.shuffle,
            # Training may hear a random window of each clip (train_seconds), validation all.
            window_seconds=self.config.train_seconds if self.shuffle else None,
            # Training uses audio only as spectrograms (stage 2); stage 1 never decodes it.
            audio=self.spectrogram,
            # The voice stage's training batches need the faces' features, not their
            # images (its validation draws them beside its reconstructions).
            faces=not (self.spectrogram and self.shuffle),
            rank=self.placement.rank, world_size=self.placement.world_size, cache=self.cache)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """This process's micro-batches of ``epoch`` in order, the first ``skip`` left out."""
        # A Ctrl-C (or SIGTERM, passed on as one) while the loader's workers start waits
        # for the end of their start: torch's half-made iterator printed an error from
        # its __del__. The workers start with SIGINT blocked; the command stops them.
        with sigint_held():
            stream = iter(self.loader(epoch))
        for _ in range(skip):
            if next(stream, None) is None:
                return
        yield from stream


def validation_split(data: Path, manifest: dict, config: TrainConfig) -> str | None:
    """The split validation reads: ``val`` (``None`` with ``val_batches=0``).

    Never ``test``: the best checkpoint is chosen by the validation loss, so validating
    on test would select on test data. ``prepare`` carves ``val`` out of the training
    identities by hash unless a split file says otherwise.
    """
    if config.val_batches == 0:
        return None
    if not manifest["splits"].get("val", {}).get("samples"):
        raise ConfigError(data, "has no 'val' split to validate on (validation never reads "
                                "'test'); give some identities the val split in prepare's "
                                "split file, or set val_batches=0 to train without validation")
    return "val"


def training_data(data: Path, manifest: dict, config: TrainConfig, placement: Placement,
                  spectrogram: bool) -> tuple[ShardData, ShardData | None]:
    """``(train, val)``: this process's share of the training split, and the validation
    split (read whole by rank 0, in order; ``None`` without validation)."""
    train = ShardData(data, "train", placement.micro_batch(config), config, placement,
                      spectrogram=spectrogram)
    split = validation_split(data, manifest, config)
    if split is not None:
        # Checked now, not at the first validation, after val_every steps (which a
        # damaged shard would lose, validation coming before that step's checkpoint).
        # Validation shards are few; the training split's are checked as they are read.
        for shard in manifest["splits"][split]["shards"]:
            check_shard(Path(manifest["root"]) / shard["path"], shard["size"], shard["sha256"])
    val = None if split is None else ShardData(
        data, split, max(1, min(config.batch_size, config.val_images)), config, Placement(),
        spectrogram=spectrogram, shuffle=False)
    return train, val


def training_features(data: Path, progress: bool, max_samples: int | None = None):
    """Every training sample's face feature ``(N, D)`` and identity, read from the shards
    (the first ``max_samples`` only, if given).

    Only the ``feature.npy`` and ``json`` members are decoded (no audio, no images).
    """
    from speech2face.utils import progress as tqdm

    manifest = load_manifest(data)
    split = manifest["splits"].get("train")
    if not split or not split["samples"]:
        raise DataError(Path(manifest["root"]), "has no training samples")
    features, identities = [], []
    total = split["samples"] if max_samples is None else min(max_samples, split["samples"])
    bar = tqdm(total=total, desc="training features",
               unit="sample", disable=not progress or int(os.environ.get("RANK", "0")) != 0)
    known = set(manifest["identities"])
    for shard in split["shards"]:
        for raw in iterate_tar(Path(manifest["root"]) / shard["path"], shard["size"],
                               shard["sha256"], shard["samples"]):
            # The first crop only: other crops of a clip are near copies, which would
            # leak into the held-out clips the classifier is calibrated on.
            feature, identity = sample_feature(raw, manifest["feature_dim"], known, "train")
            features.append(feature)
            identities.append(identity)
            bar.update(1)
            if len(features) == total:
                break
        if len(features) == total:
            break
    bar.close()
    return np.stack(features), identities
