"""Data: dataset folders -> WebDataset shards (``prepare``) -> training batches (``make_loader``).

The stages, one module each:

- :mod:`.datasets`: VoxCeleb1 / VoxCeleb2 / AVSpeech layouts as lists of videos, and splits
- :mod:`.prepare`: per-video processing (audio, faces, features), shard writing, resuming
- :mod:`.parts`: a prepare run's progress file and part manifests, checked when read back,
  and their merge into ``manifest.json``
- :mod:`.shards`: the shard format: manifest, reading and checking tar shards
- :mod:`.loader`: shards to batches (:func:`make_loader` is the public streaming API), and
  the training loop's batches in a fixed order (:class:`ShardData`, :class:`InMemoryData`)

Everything public is re-exported here, so ``from speech2face.data import make_loader``
is the way to use it. The loader's names are imported on first use: it needs torch, and
prepare's worker processes, which import this package but never load batches, would
otherwise spend 2 CPU-seconds each importing it (docs/benchmarks.md).
"""

import importlib

from speech2face.data.datasets import (
    CLIP_SECONDS,
    DATASETS,
    FRAMES_PER_VIDEO,
    SPLIT_FILE,
    SPLITS,
    VAL_FRACTION,
    VOX1_TEST_IDENTITIES,
    Clip,
    Frame,
    Unit,
    list_avspeech,
    list_units,
    list_voxceleb1,
    list_voxceleb2,
    stable_hash,
)
from speech2face.data.prepare import (
    CROPS_PER_SAMPLE,
    SAMPLES_PER_SHARD,
    Options,
    add_prepare_arguments,
    merge_manifests,
    prepare,
    prepare_command,
    read_video_frame,
)
from speech2face.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    iterate_tar,
    load_manifest,
    verify_shards,
)

_LOADER = ("InMemoryData", "ShardData", "ShardDataset", "collate", "decode_sample", "epoch_seed",
           "load_split", "make_loader", "training_data", "training_features",
           "validation_split")


def __getattr__(name: str):
    if name in _LOADER:
        return getattr(importlib.import_module("speech2face.data.loader"), name)
    raise AttributeError(f"module 'speech2face.data' has no attribute {name!r}")


__all__ = [
    "CLIP_SECONDS", "CROPS_PER_SAMPLE", "DATASETS", "FORMAT_VERSION", "FRAMES_PER_VIDEO",
    "MANIFEST", "PARTS_DIR", "SAMPLES_PER_SHARD", "SPLITS", "SPLIT_FILE", "VAL_FRACTION",
    "VOX1_TEST_IDENTITIES", "Clip", "Frame", "InMemoryData", "Options", "ShardData",
    "ShardDataset", "Unit", "add_prepare_arguments", "collate", "decode_sample", "epoch_seed",
    "iterate_tar", "list_avspeech", "list_units", "list_voxceleb1", "list_voxceleb2",
    "load_manifest", "load_split", "make_loader", "merge_manifests", "prepare",
    "prepare_command", "read_video_frame", "stable_hash", "training_data", "training_features",
    "validation_split", "verify_shards",
]
