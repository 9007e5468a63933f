"""The mixed sample order of prepare's shards and the loader's shuffling.

A VoxCeleb2-like split (hundreds of identities, 100 clips each, over many videos) is
built as work units without any media: prepare's own ordering (``plan_windows``,
``mix_samples``) gives the order in which its samples would be written, and tiny
samples written in that order through prepare's shard writer feed the real loader.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from speech2face.data import Clip, ShardDataset, Unit
from speech2face.data.prepare import MIX_CLIPS, _SplitWriter, mix_samples, plan_windows
from speech2face.data.shards import FORMAT_VERSION

IDENTITIES, VIDEOS, CLIPS = 300, 20, 5  # 100 clips per identity, 30,000 in the split


def voxceleb2_like_units() -> list[Unit]:
    return [
        Unit(f"id{i:05d}", f"v{v:02d}", "train", None,
             tuple(Clip(f"{c:05d}", "") for c in range(CLIPS)), ())
        for i in range(IDENTITIES) for v in range(VIDEOS)
    ]


def writing_order(units: list[Unit], mix_clips: int = MIX_CLIPS) -> list[list[str]]:
    """Per mixing window, the keys in the order prepare writes them (no clip skipped)."""
    return [
        [s["key"] for s in mix_samples(
            [{"key": f"{u.key}/{c.name}"} for u in window for c in u.clips])]
        for window in plan_windows(units, mix_clips)
    ]


def identity(key: str) -> str:
    return key.split("/", 1)[0]


def same_identity_rate(keys: list[str]) -> float:
    ids = [identity(k) for k in keys]
    return float(np.mean([a == b for a, b in zip(ids, ids[1:], strict=False)]))


def random_rate(keys: list[str]) -> float:
    """P(two samples drawn at random from ``keys`` share an identity)."""
    n = np.array(list(Counter(map(identity, keys)).values()), dtype=np.float64)
    return float(((n / n.sum()) ** 2).sum())


def test_consecutive_samples_share_an_identity_at_the_random_rate():
    windows = writing_order(voxceleb2_like_units())
    keys = [k for w in windows for k in w]
    assert sorted(keys) == sorted(f"{u.key}/{c.name}" for u in voxceleb2_like_units()
                                  for c in u.clips)  # every sample once
    sorted_order = sorted(keys)
    assert same_identity_rate(sorted_order) > 0.98  # what identity-sorted shards gave
    measured = same_identity_rate(keys)
    # A window's samples are in random (hash) order, so the expected rate is each
    # window's own random rate: about 1 / (videos per window) above the split's.
    expected = np.mean([random_rate(w) for w in windows])
    assert expected < 0.012 and random_rate(keys) == pytest.approx(1 / IDENTITIES)
    assert measured < 1.5 * expected, (measured, expected)
    # One window holding the whole split: the split's random rate.
    whole = writing_order(voxceleb2_like_units(), mix_clips=10**9)
    assert len(whole) == 1
    assert same_identity_rate(whole[0]) < 2 * random_rate(whole[0])


def test_order_is_seeded_and_independent_of_listing_order():
    units = voxceleb2_like_units()[:400]
    a = [u.key for w in plan_windows(units, 100, seed=0) for u in w]
    assert a == [u.key for w in plan_windows(units[::-1], 100, seed=0) for u in w]
    assert a != [u.key for w in plan_windows(units, 100, seed=1) for u in w]
    # Windows close at MIX_CLIPS listed clips and never span two splits.
    mixed = [Unit(u.identity, u.video, "val" if i % 3 else "train", None, u.clips, ())
             for i, u in enumerate(units)]
    for window in plan_windows(mixed, 100):
        assert len({u.split for u in window}) == 1
        assert sum(len(u.clips) for u in window) < 100 + CLIPS


def tiny_files(key: str) -> dict[str, bytes]:
    """A valid sample small enough for 30,000 of them: 10 ms of audio, a blank face,
    a 136-D feature (the manifest's feature_dim)."""
    flac, jpeg, npy, feature = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    sf.write(flac, np.full(160, 0.1, np.float32), 16000, format="FLAC")
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(jpeg, format="JPEG")
    np.save(npy, np.zeros((68, 2), np.float32))
    np.save(feature, np.zeros(136, np.float32))
    meta = {"identity": identity(key), "video": key.split("/")[1], "clip": key.rsplit("/")[-1]}
    return {"flac": flac.getvalue(), "face.jpg": jpeg.getvalue(), "landmarks.npy": npy.getvalue(),
            "feature.npy": feature.getvalue(), "json": json.dumps(meta).encode()}


def write_split(out: Path, keys: list[str], per_shard: int = 1000,
                picks: tuple[int, ...] = (0, 9, 18, 27)) -> None:
    """Shards ``picks`` of the split ``keys`` written in order through prepare's writer
    (only four of the 30, to keep the test fast: a batch depends on shard composition),
    and their manifest."""
    entries: list[dict] = []
    writer = _SplitWriter(out, "train", "", 0, per_shard, entries.append)
    template = tiny_files("id/v/c")
    for key in (k for i in picks for k in keys[i * per_shard:(i + 1) * per_shard]):
        meta = json.loads(template["json"])
        meta.update(identity=identity(key))
        writer.write({"key": key, "files": {**template, "json": json.dumps(meta).encode()}})
    writer.close()
    manifest = {
        "format": FORMAT_VERSION, "dataset": "voxceleb2", "encoder": "dlib", "feature_dim": 136,
        "identities": sorted({identity(k) for k in keys}),
        "splits": {"train": {"samples": sum(e["samples"] for e in entries), "identities": [],
                             "shards": entries}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_batches_of_8_hold_at_least_7_identities(tmp_path):
    keys = [k for w in writing_order(voxceleb2_like_units()) for k in w]
    write_split(tmp_path, keys)
    dataset = ShardDataset(tmp_path, "train", batch_size=8, shuffle=1000, seed=0,
                           seconds=0.01, drop_last=True)
    distinct = []
    for batch in dataset:
        distinct.append(len({m["identity"] for m in batch["meta"]}))
        if len(distinct) == 200:
            break
    assert np.mean(distinct) >= 7.5, np.mean(distinct)
    # The same shards written identity-sorted, as before: batches of one or two people.
    sorted_dir = tmp_path / "sorted"
    write_split(sorted_dir, sorted(keys))
    dataset = ShardDataset(sorted_dir, "train", batch_size=8, shuffle=1000, seed=0,
                           seconds=0.01, drop_last=True)
    batches = iter(dataset)
    assert np.mean([len({m["identity"] for m in next(batches)["meta"]})
                    for _ in range(50)]) < 7
