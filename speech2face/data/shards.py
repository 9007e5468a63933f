"""The shard format: manifest files, reading tar shards, checking them.

A split is a list of WebDataset tar shards; ``manifest.json`` lists them with their
sample counts and SHA-256, plus what training needs (identities, feature size, mean
landmarks). See docs/data.md "Shard format".
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import stat
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speech2face.data.datasets import DATASETS
from speech2face.errors import DataError
from speech2face.utils import is_names, is_number, is_whole

# 2: samples in mixed order, keys without dots, shard sizes in the manifest.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
JPEG_QUALITY = 95
_SPLITS = ("train", "val", "test")
MAX_FEATURE_DIM = 1_000_000
NOT_A_DATASET = f"is a file, not a prepared dataset folder (prepare's --out, with {MANIFEST})"


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and validate ``manifest.json`` (``path`` is the file or the folder holding it).

    Adds ``"root"``: the folder that shard paths are relative to. Raises DataError for a
    missing or malformed manifest, and for a shard path outside that folder.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(None, f"a shard folder or manifest path is a str or os.PathLike, "
                              f"not {type(path).__name__}")
    path = Path(path)
    try:
        if path.is_dir():
            path = path / MANIFEST
        is_file = path.is_file()
    except OSError as error:  # a name too long, a path through a file
        raise DataError(path, f"unreadable ({error.strerror or error})") from None
    if not is_file:
        hint = (
            " (prepare not finished: some parts missing?)"
            if (path.parent / PARTS_DIR).is_dir()
            else ""
        )
        raise DataError(path, f"manifest not found{hint}")
    # Another file given where the folder was meant (``--data notes.txt``) is named as such.
    other_file = path.name != MANIFEST
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        if other_file and isinstance(error, ValueError):  # not JSON (or not UTF-8)
            raise DataError(path, NOT_A_DATASET) from None
        raise DataError(path, f"unreadable manifest ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict):
        raise DataError(path, NOT_A_DATASET if other_file else
                        "malformed manifest (not a JSON object)")
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(path, f"manifest format {manifest.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}: prepare the dataset again")
    problem = _manifest_problem(manifest, path.parent)
    if problem:
        raise DataError(path, f"malformed manifest: {problem}")
    manifest["root"] = str(path.parent)
    return manifest


def _is_landmarks(v) -> bool:
    """A ``(68, 2)`` list of numbers that are pixels of a face crop, give or take (no
    landmark lies a million pixels away)."""
    return (isinstance(v, list) and len(v) == 68 and all(
        isinstance(p, list) and len(p) == 2 and all(is_number(x, -1e6, 1e6) for x in p)
        for p in v))


def is_clip_seconds(value) -> bool:
    """A clip length read from a manifest: a number of seconds above 0, below 1e6."""
    return is_number(value) and 0 < value < 1e6


def _manifest_problem(manifest: dict, root: Path) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    identities = manifest.get("identities")
    if not is_names(identities):
        return "'identities' is not a list of names"
    # sorted and distinct, as prepare writes them: a sample's identity_index is its place
    if any(a >= b for a, b in itertools.pairwise(identities)):
        return "'identities' is not sorted or names an identity twice"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not set(splits) <= set(_SPLITS):
        return f"'splits' is not a mapping of {_SPLITS}"
    empty = all(isinstance(s, dict) and s.get("samples") == 0 for s in splits.values())
    # null only in a manifest without samples (prepare found no face feature to size)
    if not (is_whole(manifest.get("feature_dim"), 1, MAX_FEATURE_DIM)
            or (empty and manifest.get("feature_dim") is None)):
        return f"'feature_dim' is not an integer from 1 to {MAX_FEATURE_DIM:,}"
    if manifest.get("mean_landmarks") is not None and not _is_landmarks(manifest["mean_landmarks"]):
        return "'mean_landmarks' is not a (68, 2) list of finite numbers"
    if "crops_per_sample" in manifest and not is_whole(manifest["crops_per_sample"], 1):
        return "'crops_per_sample' is not a positive integer"
    if not isinstance(manifest.get("encoder"), str):
        return "'encoder' is not a name"
    if manifest.get("seconds") is not None and not is_clip_seconds(manifest["seconds"]):
        return "'seconds' is not a positive number of seconds"
    if "dataset" in manifest and manifest["dataset"] not in DATASETS:
        return f"'dataset' is not one of {DATASETS}"
    for key in ("samples_per_shard", "num_parts"):
        if key in manifest and not is_whole(manifest[key], 1):
            return f"{key!r} is not a positive integer"
    for key in ("counts", "skipped_by_reason"):
        value = manifest.get(key, {})
        if not (isinstance(value, dict) and all(isinstance(k, str) and is_whole(v, 0)
                                                for k, v in value.items())):
            return f"{key!r} is not a mapping of names to counts"
    skipped = manifest.get("skipped", [])
    if not (isinstance(skipped, list) and all(
            isinstance(s, dict) and isinstance(s.get("item"), str)
            and isinstance(s.get("reason"), str) for s in skipped)):
        return "'skipped' is not a list of {item, reason}"
    if not isinstance(manifest.get("identity_merging"), (dict, type(None))):
        return "'identity_merging' is neither null nor a report"
    inside = root.resolve()
    known = set(manifest["identities"])
    paths = [shard.get("path") for split in splits.values() if isinstance(split, dict)
             and isinstance(split.get("shards"), list) for shard in split["shards"]
             if isinstance(shard, dict)]
    twice = next((p for p, n in Counter(p for p in paths if isinstance(p, str)).items()
                  if n > 1), None)
    if twice is not None:
        return f"shard {twice!r} is listed twice"
    for name, split in splits.items():
        if not isinstance(split, dict) or not is_whole(split.get("samples"), 0):
            return f"split {name!r} has no sample count"
        if "identities" in split and not (is_names(split["identities"])
                                          and set(split["identities"]) <= known):
            return f"split {name!r} names identities that are not in 'identities'"
        if len(split.get("identities", ())) > split["samples"]:  # each has a sample at least
            return f"split {name!r} lists {len(split['identities'])} identities for " \
                   f"{split['samples']} samples"
        shards = split.get("shards")
        if not isinstance(shards, list):
            return f"split {name!r} has no shard list"
        for shard in shards:
            if not (isinstance(shard, dict) and isinstance(shard.get("path"), str)
                    and is_whole(shard.get("samples"), 0) and is_whole(shard.get("size"), 0)
                    and isinstance(shard.get("sha256"), str)
                    and re.fullmatch("[0-9a-f]{64}", shard["sha256"]) is not None):
                return f"split {name!r} has a shard entry without path, samples, size, sha256"
            if "\0" in shard["path"]:
                return f"shard path {shard['path']!r} contains a NUL byte"
            if os.path.isabs(shard["path"]) or shard["path"].startswith(("/", "\\")):
                return f"shard path {shard['path']!r} is absolute (paths are relative to " \
                       "the dataset folder)"
            try:
                outside = not (root / shard["path"]).resolve().is_relative_to(inside)
            except (OSError, RuntimeError) as error:  # a symlink loop, a name too long
                return f"shard path {shard['path']!r} cannot be resolved ({error})"
            if outside:
                return f"shard path {shard['path']!r} is outside the dataset folder"
            # every sample is tar members of 512-byte headers at least
            if not 1 <= shard["samples"] <= shard["size"] // 512:
                return f"shard {shard['path']!r} cannot hold {shard['samples']} samples " \
                       f"in {shard['size']} bytes"
        if sum(shard["samples"] for shard in shards) != split["samples"]:
            return f"split {name!r} counts {split['samples']} samples, its shards " \
                   f"{sum(shard['samples'] for shard in shards)}"
    return None


def check_shard(path: str | os.PathLike, size: int, sha256: str) -> None:
    """Raise DataError naming ``path`` unless it has the manifest's size and SHA-256."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise DataError(path, "a folder where the manifest lists a shard")
        actual = info.st_size
        if actual != size:
            raise DataError(path, f"shard is {actual} bytes, the manifest says {size} "
                                  "(truncated or changed)")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as error:
        raise DataError(path, f"unreadable shard ({error.strerror or error})") from None
    if digest != sha256:
        raise DataError(path, "shard's SHA-256 differs from the manifest (corrupt or changed)")


def verify_shards(path: str | os.PathLike) -> list[str]:
    """Shards whose size or SHA-256 does not match the manifest (empty when all are intact)."""
    manifest = load_manifest(path)
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            try:
                check_shard(Path(manifest["root"]) / shard["path"], shard["size"], shard["sha256"])
            except DataError:
                bad.append(shard["path"])
    return bad


# What a compressed file starts with (gzip, bzip2, xz, zstd): tarfile's "r|*" would
# decompress it, and a few kB of it can expand to gigabytes held in memory.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def iterate_tar(
    path: str | os.PathLike, size: int | None = None, sha256: str | None = None,
    samples: int | None = None,
) -> Iterator[dict]:
    """The samples of one WebDataset shard: ``{"__key__", "__url__": path, ext: bytes, ...}``.

    Read with webdataset's tar expander and key grouping (a key is the member path up to
    the first dot of the file name). With ``size`` and ``sha256`` the shard is checked
    first (:func:`check_shard`), so no sample of a damaged shard is ever yielded. Raises
    DataError naming the shard when it is damaged, compressed or not a readable tar, when
    it holds a key twice, and (with ``samples``, the manifest's count) when it holds
    another number of samples; those two are found as the shard is read, so a caller
    that reads it to its end never uses a sample of such a shard unknowingly.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    if sha256 is not None:
        check_shard(path, size, sha256)
    keys = set()
    try:
        with open(path, "rb") as stream:
            if stream.read(6).startswith(_COMPRESSED):
                raise DataError(path, "a compressed file; shards are plain tar")
            stream.seek(0)
            files = tar_file_expander([{"url": str(path), "stream": stream}])
            for sample in group_by_keys(files):
                if sample["__key__"] in keys:
                    raise DataError(path, f"holds sample {sample['__key__']} twice")
                keys.add(sample["__key__"])
                yield sample
    except (tarfile.TarError, OSError, ValueError) as error:
        # webdataset appends " @ <stream>" to the message
        reason = str(error.args[0] if error.args else error).split(" @ ")[0]
        raise DataError(path, f"unreadable shard ({type(error).__name__}: {reason})") from None
    if samples is not None and len(keys) != samples:
        raise DataError(path, f"holds {len(keys)} samples, the manifest says {samples}")


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG member as uint8 RGB; ValueError for one over faces.MAX_IMAGE_PIXELS
    (a decompression bomb), before its pixels are decoded."""
    from PIL import Image

    from speech2face.faces import MAX_IMAGE_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large ({error})") from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {width} x {height} pixels is over the "
                             f"{MAX_IMAGE_PIXELS:,}-pixel limit")
        return np.asarray(image.convert("RGB"))
