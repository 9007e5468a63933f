"""The shard format: manifest files, reading tar shards, checking them.

A split is a list of WebDataset tar shards; ``manifest.json`` lists them with their
sample counts and SHA-256, plus what training needs (identities, feature size, mean
landmarks). See docs/data.md "Shard format".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speech2face.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
JPEG_QUALITY = 95


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


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
