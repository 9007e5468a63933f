"""AVSpeech identity merging: the clustering against scipy's hierarchical clustering (the
independent reference), and a corpus where generated speakers appear in several videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_mp4
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from speech2face.data import identities


def _canonical(labels) -> list[int]:
    """A partition as labels numbered by first appearance (comparable across methods)."""
    first: dict = {}
    return [first.setdefault(label, len(first)) for label in labels]


def _scipy(x: np.ndarray, threshold: float, method: str) -> list[int]:
    return _canonical(fcluster(linkage(pdist(x), method), threshold, "distance"))


@pytest.mark.parametrize("method", identities.LINKAGES)
def test_clusters_match_scipy(method):
    rng = np.random.default_rng(0)
    for _ in range(25):
        n, k, dim = rng.integers(2, 150), rng.integers(1, 25), rng.integers(2, 20)
        centres = rng.normal(size=(k, dim)) * rng.uniform(0.2, 1.0)
        x = centres[rng.integers(0, k, n)] + rng.normal(size=(n, dim)) * rng.uniform(0.02, 0.3)
        threshold = rng.uniform(0.2, 1.5)
        ours = identities.cluster_identities(x, threshold, method)
        assert _canonical(ours) == _scipy(x, threshold, method)
        assert all(ours[i] <= i and ours[ours[i]] == ours[i] for i in range(n))  # named by min


def test_blocks_and_chaining(monkeypatch):
    # Points 0.5 apart on a line: every neighbour is within 0.6, so single linkage chains
    # them all into one "person"; average linkage stops where the mean distance passes 0.6.
    x = np.zeros((40, 128))
    x[:, 0] = np.arange(40) * 0.5
    monkeypatch.setattr(identities, "_BLOCK", 7)  # distances in blocks that do not divide 40
    single = identities.cluster_identities(x, 0.6, "single")
    average = identities.cluster_identities(x, 0.6, "average")
    assert len(set(single)) == 1
    assert 10 <= len(set(average)) < 40
    assert _canonical(single) == _scipy(x, 0.6, "single")
    assert _canonical(average) == _scipy(x, 0.6, "average")


def test_pairs_at_the_threshold_are_decided_exactly(monkeypatch):
    # The distance blocks are float32 (error ~1e-4 here); pairs within 1e-7 of the
    # threshold, far from the origin (where float32 cancels most), must still come out as
    # scipy's float64 distances say, in every block.
    rng = np.random.default_rng(1)
    threshold = 0.6
    base = 30.0 + rng.normal(size=(30, 128)) * 3.0  # people far apart
    step = rng.normal(size=(30, 128))
    step *= threshold * (1 + rng.choice([-1e-7, 1e-7], size=(30, 1))) / np.linalg.norm(
        step, axis=1, keepdims=True)
    x = np.concatenate([base, base + step])[rng.permutation(60)]
    monkeypatch.setattr(identities, "_BLOCK", 16)
    for method in identities.LINKAGES:
        ours = identities.cluster_identities(x, threshold, method)
        assert _canonical(ours) == _scipy(x, threshold, method)
        assert 30 < len(set(ours)) < 60  # both sides of the threshold occur


def test_merge_names_and_bad_options():
    x = np.array([[0.0, 0], [5, 5], [0.1, 0], [5, 5.1], [9, 9]])
    assert identities.merge_names(["vE", "vB", "vC", "vA", "vD"], x, 0.6) == {
        "vE": "vC", "vC": "vC", "vB": "vA", "vA": "vA", "vD": "vD"
    }
    with pytest.raises(identities.DataError, match="unknown linkage"):
        identities.cluster_identities(x, 0.6, "ward")
    with pytest.raises(identities.DataError, match="threshold must be > 0"):
        identities.cluster_identities(x, 0.0)
    for bad in (1e30, np.nan):  # one such row kept every pair apart (float32 overflow)
        with pytest.raises(identities.DataError, match="must be finite and within"):
            identities.cluster_identities(np.vstack([x, np.full(2, bad)]), 0.6)


def test_stored_descriptors_are_validated(tmp_path):
    from speech2face.data import Clip, Unit

    folder = tmp_path / "segments" / "vid"
    folder.mkdir(parents=True)
    good = np.linspace(-0.2, 0.2, 128).astype(np.float32)
    np.save(folder / "s000001000.face.npy", good)
    np.save(folder / "s000002000.face.npy", np.zeros(127, np.float32))  # wrong size
    (folder / "s000003000.face.npy").write_bytes(b"not numpy")
    # A header that claims 373 GiB: refused before numpy allocates it (MemoryError before)
    with open(folder / "s000004000.face.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (99_999_999_999,)})
        f.write(bytes(512))
    (folder / "s000005000.face.npy").write_bytes(b"")  # empty: numpy's EOFError (a traceback)
    # Finite but no descriptor: in the clustering it overflowed float32, and no pair merged.
    np.save(folder / "s000006000.face.npy", np.full(128, 1e30, np.float32))
    clips = tuple(Clip(f"s00000{k}000", str(folder / f"s00000{k}000.mkv"))
                  for k in (1, 2, 3, 4, 5, 6))
    features, unreadable, sources = identities.video_descriptors(
        [Unit("vid", "vid", "train", None, clips, ())], progress=False
    )
    assert sources == {"downloaded": 1}
    np.testing.assert_array_equal(features[0], good)
    assert sorted(Path(p).name for p in unreadable) == [
        "s000002000.face.npy", "s000003000.face.npy", "s000004000.face.npy",
        "s000005000.face.npy", "s000006000.face.npy",
    ]


def test_damaged_store_files_are_passed_over(tmp_path):
    """A store file cut short (a full disk, a copy) is no zip at all, and a member's header
    can claim any size: each is listed as damaged (both raised before), the others read."""
    import zipfile

    good = np.linspace(-0.2, 0.2, 128).astype(np.float32)[None]
    np.savez(tmp_path / "t-000000.npz", videos=np.array(["A"]), descriptors=good)
    np.savez(tmp_path / "t-000001.npz", videos=np.array(["B"]), descriptors=good)
    cut = (tmp_path / "t-000001.npz").read_bytes()[:200]
    (tmp_path / "t-000001.npz").write_bytes(cut)
    with zipfile.ZipFile(tmp_path / "t-000002.npz", "w") as z:
        with z.open("videos.npy", "w") as f:
            np.save(f, np.array(["C"]))
        with z.open("descriptors.npy", "w") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 128)})
            f.write(bytes(512))
    known, damaged = identities.read_store(tmp_path)
    assert list(known) == ["A"]
    assert sorted(Path(p).name for p in damaged) == ["t-000001.npz", "t-000002.npz"]


VIDEOS = {  # video -> (speaker, official split)
    "Spk0VideoA": (0, "train"), "Spk0VideoB": (0, "test"), "Spk0VideoC": (0, "train"),
    "Spk1VideoA": (1, "train"), "Spk1VideoB": (1, "test"), "Spk2VideoA": (2, "test"),
}


def _avspeech_videos(root: Path, demo_speakers, videos=VIDEOS) -> None:
    """An AVSpeech folder (videos/ layout) of generated speakers, one 3-s video each."""
    rows = {"train": [], "test": []}
    (root / "videos").mkdir(parents=True)
    for k, (video, (speaker, split)) in enumerate(sorted(videos.items())):
        frames, wave = demo_speakers[speaker]
        # Alternate the speaker's two generated videos' frames (pose, lighting differ).
        make_mp4(root / "videos" / f"{video}.mp4", [frames[k % len(frames)]], wave[:48000], 3.0)
        rows[split].append(f"{video},0.5,2.5,0.5,0.5")
    for split, lines in rows.items():
        (root / f"avspeech_{split}.csv").write_text("\n".join(lines) + "\n")


def test_a_job_array_embeds_each_video_once(demo_speakers, tmp_path, capsys, monkeypatch):
    """Step 1 (--descriptors-only, one job per shard) embeds each video's faces once into
    OUT/parts/descriptors; the step-2 jobs find them there (no face embedded again), and
    their merged shards and identities equal a single run's. A damaged store file is
    removed and its videos embedded again."""
    from speech2face import cli, data

    root = tmp_path / "avspeech"
    _avspeech_videos(root, demo_speakers)
    common = ["--identity-threshold", "0.2", "--frames-per-video", "1"]
    single = tmp_path / "single"
    assert cli.main(["prepare", "avspeech", "--root", str(root), "--out", str(single),
                     *common]) == 0
    store = single / data.PARTS_DIR / identities.STORE_DIR
    assert [p.name for p in store.iterdir()] == ["00000-of-00001-000000.npz"]
    known, damaged = identities.read_store(store)
    assert sorted(known) == sorted(VIDEOS) and damaged == []

    calls = []
    real = identities.face_descriptor
    monkeypatch.setattr(identities, "face_descriptor",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    array = tmp_path / "array"
    for index in (0, 1):
        assert cli.main(["prepare", "avspeech", "--root", str(root), "--out", str(array),
                         "--descriptors-only", "--shard-index", str(index),
                         "--num-shards", "2", *common]) == 0
    assert len(calls) == len(VIDEOS)  # each video once, across the two jobs
    assert "videos embedded now" in capsys.readouterr().out
    for index in (0, 1):
        assert cli.main(["prepare", "avspeech", "--root", str(root), "--out", str(array),
                         "--shard-index", str(index), "--num-shards", "2", *common]) == 0
    assert len(calls) == len(VIDEOS)  # step 2 embedded nothing
    merged, alone = data.load_manifest(array), data.load_manifest(single)
    assert merged["identity_merging"] == alone["identity_merging"]
    for split in alone["splits"]:
        assert sorted(m["identity"] + m["video"] for m in data.load_split(array, split)["meta"]) \
            == sorted(m["identity"] + m["video"] for m in data.load_split(single, split)["meta"])

    # A damaged store file goes; its videos are embedded again, the result the same.
    again = tmp_path / "again"
    store = again / data.PARTS_DIR / identities.STORE_DIR
    store.mkdir(parents=True)
    (store / "00000-of-00001-000000.npz").write_bytes(b"PK not a zip")
    calls.clear()
    assert cli.main(["prepare", "avspeech", "--root", str(root), "--out", str(again),
                     *common]) == 0
    assert len(calls) == len(VIDEOS)
    assert data.load_manifest(again)["identity_merging"] == alone["identity_merging"]
    known, damaged = identities.read_store(store)
    assert sorted(known) == sorted(VIDEOS) and damaged == []


@pytest.mark.parametrize("dataset, option", [
    ("voxceleb1", ["--descriptors-only"]),
    ("voxceleb2", ["--identity-threshold", "0.3"]),  # VoxCeleb has its identities
    ("voxceleb1", ["--identity-linkage", "single"]),
])
def test_face_identity_options_are_for_avspeech(tmp_path, capsys, dataset, option):
    from speech2face import cli

    code = cli.main(["prepare", dataset, "--root", str(tmp_path), "--out",
                     str(tmp_path / "out"), *option])
    err = capsys.readouterr().err
    assert code == 2 and f"{option[0]}: is for avspeech" in err, err
    assert not (tmp_path / "out").exists()


def test_no_speaker_spans_two_splits(demo_speakers, tmp_path, capsys):
    """Speaker 0 in three videos and speaker 1 in two, listed in both official CSVs;
    speaker 2 in one. Merged, each speaker's videos land in one split."""
    from speech2face import cli, data

    root = tmp_path / "avspeech"
    videos = VIDEOS
    _avspeech_videos(root, demo_speakers)

    # Generated faces are far more alike than people (different speakers 0.3-0.7 apart in
    # dlib's space, one speaker's videos ~0.1), so the test uses a tighter threshold.
    out = tmp_path / "shards"
    code = cli.main(["prepare", "avspeech", "--root", str(root), "--out", str(out),
                     "--identity-threshold", "0.2", "--frames-per-video", "1"])
    assert code == 0
    assert "identities: 6 videos -> 3 identities (3 videos merged" in capsys.readouterr().out
    manifest = data.load_manifest(out)
    seen: dict[int, set] = {}
    for split in manifest["splits"]:
        for meta in data.load_split(out, split)["meta"]:
            seen.setdefault(videos[meta["video"]][0], set()).add(split)
    assert sorted(seen) == [0, 1, 2] and all(len(s) == 1 for s in seen.values()), seen
    assert manifest["identity_merging"]["merged_videos"] == 3  # 3 -> 1 and 2 -> 1
    # The check can fail: video by video, speakers 0 and 1 span two splits.
    unmerged: dict[int, set] = {}
    for unit in data.list_units("avspeech", root):
        unmerged.setdefault(videos[unit.video][0], set()).add(unit.split)
    assert len(unmerged[0]) > 1 and len(unmerged[1]) > 1


def test_validation_is_carved_again_when_merging_leaves_none(monkeypatch):
    """The CSV's validation video joined a training identity: without a second carve
    the shards would have no 'val' split, and training would refuse them."""
    from speech2face.data import identities
    from speech2face.data.datasets import Unit

    names = ["vidA", "vidB", "vidC", "vidD", "vidE", "vidF"]
    splits = ["train", "train", "val", "train", "train", "test"]
    units = [Unit(n, n, s, None, (), ()) for n, s in zip(names, splits, strict=True)]
    features = np.eye(6, 128, dtype=np.float32)  # every video 1.41 from every other
    features[1] = features[2] = features[0]  # vidA-C one person: train, two votes to one

    def descriptors(listed, *args):
        return np.stack([features[names.index(u.video)] for u in listed]), [], {}

    monkeypatch.setattr(identities, "video_descriptors", descriptors)
    merged, report = identities.merge_units(units, threshold=0.6, progress=False)
    split_of = {u.video: u.split for u in merged}
    assert split_of["vidF"] == "test" and "val" in split_of.values()
    by_identity: dict[str, set] = {}
    for u in merged:
        by_identity.setdefault(u.identity, set()).add(u.split)
    assert all(len(s) == 1 for s in by_identity.values())  # still nobody in two splits
    assert split_of["vidA"] == split_of["vidB"] == split_of["vidC"]
    # with a validation identity left after merging, the CSV's choice stands
    features[2] = np.eye(1, 128, 2, dtype=np.float32)
    merged, _ = identities.merge_units(units, threshold=0.6, progress=False)
    assert [u.video for u in merged if u.split == "val"] == ["vidC"]


def test_prepare_says_when_a_split_came_out_empty(capsys):
    from speech2face.data.prepare import _say_missing_splits

    _say_missing_splits({"train": {"samples": 3}, "test": {"samples": 1}})
    err = capsys.readouterr().err
    assert "note: no 'val' samples: training validates on it" in err and "'test'" not in err
    _say_missing_splits({"train": {"samples": 3}, "val": {"samples": 1}, "test": {"samples": 1}})
    _say_missing_splits({"train": {"samples": 0}})  # nothing to train on: said elsewhere
    assert capsys.readouterr().err == ""
