"""Tests of speech2face.data: prepare (shards, skips, resume, sharding) and the loader.

One small generated corpus (6 speakers, 2 videos each, 3 clips and 2 face frames per
video) is prepared once per module as the reference; the other tests compare against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import killed_in_video

from speech2face import data
from speech2face.cli import main
from speech2face.data import datasets
from speech2face.data.prepare import _Processor
from speech2face.demo_data import make_demo_data
from speech2face.errors import ConfigError, DataError

SPEAKERS, VIDEOS, CLIPS, FRAMES = 6, 2, 3, 2
PER_SHARD = 4
MIX = 4  # clips per mixing window: windows of two videos (6 samples)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "corpus"
    make_demo_data(
        root,
        speakers=SPEAKERS,
        seed=3,
        videos=(VIDEOS, VIDEOS),
        clips=(CLIPS, CLIPS),
        frames=FRAMES,
        progress=False,
    )
    return root


def prepare_vox1(corpus: Path, out: Path, **options) -> dict:
    return data.prepare(
        "voxceleb1", corpus, out, samples_per_shard=PER_SHARD, mix_clips=MIX, progress=False,
        **options,
    )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    prepare_vox1(corpus, out)
    return out


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def members(out: Path) -> dict[str, bytes]:
    """Every file of every shard, by its name inside the tar."""
    found = {}
    for path in sorted(out.glob("*/*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert m.name not in found, f"duplicate {m.name}"
                found[m.name] = tar.extractfile(m).read()
    return found


def comparable(manifest: dict) -> dict:
    """A manifest without what depends on how the work was split into parts."""
    out = {
        k: v
        for k, v in manifest.items()
        if k not in ("mean_landmarks", "root", "num_parts", "splits")
    }
    out["splits"] = {
        name: {k: v for k, v in split.items() if k != "shards"}
        for name, split in manifest["splits"].items()
    }
    return out


# ---------------------------------------------------------------------------- prepare


def test_prepare_demo_corpus_end_to_end(corpus, reference):
    manifest = data.load_manifest(reference)
    n_clips = SPEAKERS * VIDEOS * CLIPS
    assert sum(s["samples"] for s in manifest["splits"].values()) == n_clips
    assert manifest["counts"] == {
        "clips": n_clips,
        "frames": SPEAKERS * VIDEOS * FRAMES,
        "videos": SPEAKERS * VIDEOS,
    }
    assert (
        manifest["skipped"] == []
        and manifest["encoder"] == "dlib"
        and manifest["feature_dim"] == 128
    )
    assert data.verify_shards(reference) == []
    # Splits follow the corpus's split file and are identity-disjoint.
    expected = {}
    for line in (corpus / "identity_split.csv").read_text().splitlines()[1:]:
        identity, split = line.split(",")
        expected.setdefault(split, set()).add(identity)
    got = {split: set(s["identities"]) for split, s in manifest["splits"].items()}
    assert got == expected
    assert (
        not (got["train"] & got["val"])
        and not (got["train"] & got["test"])
        and not (got["val"] & got["test"])
    )
    assert manifest["identities"] == sorted(set().union(*got.values()))
    # Every shard but a split's last is full; no temporary files are left.
    for split in manifest["splits"].values():
        assert [s["samples"] for s in split["shards"][:-1]] == [PER_SHARD] * (
            len(split["shards"]) - 1
        )
    assert not list(reference.rglob("*.partial")) and not list(
        (reference / "parts").glob("progress-*")
    )
    # The mean landmarks are the mean of the training crops' landmarks (float64 here).
    files = members(reference)
    train = [
        np.load(io.BytesIO(v))
        for k, v in files.items()
        if k.endswith(".landmarks.npy")
        and json.loads(files[k.replace("landmarks.npy", "json")])["split"] == "train"
    ]
    np.testing.assert_allclose(
        manifest["mean_landmarks"], np.mean(np.float64(train), axis=0), atol=1e-4
    )


def test_round_trip(corpus, reference):
    """Audio, crop, landmarks, feature and metadata in the shards match their sources."""
    import dlib
    from PIL import Image

    from speech2face import faces

    meta_rows = {}
    for line in (corpus / "vox1_meta.csv").read_text().splitlines()[1:]:
        identity, name, gender, _, _ = line.split("\t")
        meta_rows[identity] = (name, gender)
    files = members(reference)
    keys = sorted({k.split(".", 1)[0] for k in files})
    assert len(keys) == SPEAKERS * VIDEOS * CLIPS
    detector = dlib.get_frontal_face_detector()
    checked_faces, spreads = 0, []
    for key in keys:
        identity, video, clip = key.split("/")
        meta = json.loads(files[f"{key}.json"])
        assert (meta["identity"], meta["video"], meta["clip"]) == (identity, video, clip)
        assert meta["gender"] == meta_rows[identity][1]
        # Audio: int16 PCM of the first 6 s, or the clip tiled to 6 s, losslessly.
        pcm, rate = sf.read(corpus / "wav" / identity / video / f"{clip}.wav", dtype="int16")
        want = np.tile(pcm, -(-96000 // len(pcm)))[:96000].astype(np.float64) / 32768
        got, got_rate = sf.read(io.BytesIO(files[f"{key}.flac"]), dtype="float64")
        assert rate == got_rate == 16000
        np.testing.assert_array_equal(got, want)
        landmarks = np.load(io.BytesIO(files[f"{key}.landmarks.npy"]))
        feature = np.load(io.BytesIO(files[f"{key}.feature.npy"]))
        assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
        assert feature.shape == (128,) and feature.dtype == np.float32
        crop = np.asarray(Image.open(io.BytesIO(files[f"{key}.face.jpg"])))
        assert crop.shape == (224, 224, 3)
        if clip != "00001":
            continue
        # The face: dlib's detector on the face frame shrunk to 200 px (a VoxCeleb frame
        # is cut around the face), its box scaled back, the shape predictor on the full
        # frame: aligned, the same landmarks and crop as stored.
        frame_dir = corpus / "unzippedFaces" / meta_rows[identity][0] / "1.6" / video
        frame = sorted(frame_dir.glob("*.jpg"))[0]
        image = faces.load_image(frame)
        side = faces.FACE_CROP_DETECT_SIDE
        scale = side / max(image.shape[:2])
        small = np.asarray(
            Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        )
        box = max(detector(small, 0), key=lambda r: r.area())
        box = dlib.rectangle(*(round(v / scale) for v in (box.left(), box.top(), box.right(),
                                                           box.bottom())))
        shape = faces.dlib_model("landmarks68")(image, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        want_crop, want_landmarks = faces.align_face(image, points)
        np.testing.assert_allclose(landmarks, want_landmarks, atol=1e-4)
        assert np.abs(crop.astype(float) - want_crop).mean() < 3.0  # JPEG 95
        # dlib's documented pipeline on the whole frame (detection upsampled once) gives
        # landmarks as close as the same pipeline on the frame moved by a few pixels (the
        # shape predictor's own spread: docs/benchmarks.md), and the same identity vector.
        rect = max(detector(image, 1), key=lambda r: r.area())
        shape = faces.dlib_model("landmarks68")(image, rect)
        full = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        spread = np.abs(faces.align_face(image, full)[1] - landmarks)
        spreads.append((spread.mean(), spread.max()))
        reference_vector = np.array(
            faces.dlib_model("recognition").compute_face_descriptor(image, shape)
        )
        # same person: < 0.6 (dlib); two speakers of this corpus: about 0.4 apart. The two
        # paths differ most on the made-up faces: up to 0.17, the others 0.03-0.08 (all
        # under 0.08 when the make-up was half as strong).
        assert np.linalg.norm(reference_vector - feature) < 0.2
        checked_faces += 1
    assert checked_faces == SPEAKERS * VIDEOS
    # In the 224-px crop: on average under a pixel (the full pipeline on frames moved by
    # 3 px: 0.6), at worst a few pixels on a 140-px face.
    spreads = np.array(spreads)
    assert spreads[:, 0].mean() < 1.0 and spreads[:, 1].max() < 8.0, spreads


def test_webdataset_reads_the_shards(reference):
    import webdataset as wds

    path = sorted((reference / "train").glob("*.tar"))[0]
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(samples) == PER_SHARD
    assert {"flac", "face.jpg", "landmarks.npy", "feature.npy", "json"} <= set(samples[0])


def test_worker_processes_a_video_without_importing_torch(corpus):
    # A spawned worker imports what a video needs; torch (2 CPU-s per worker) is not.
    code = (
        "import sys\n"
        "from speech2face.data.datasets import list_units\n"
        "from speech2face.data.prepare import Options, _worker_init, _worker_run\n"
        "import os; _worker_init(Options('voxceleb1'), os.getppid())\n"
        f"result = _worker_run(list_units('voxceleb1', {str(corpus)!r})[0])\n"
        "assert len(result.samples) == 3, result.skipped\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_the_worker_pools_result_pipe_holds_whole_results():
    # A result (a video's JPEGs, FLAC and features: about 0.4 MB on the demo corpus) must
    # not block its worker until this process's result thread gets the GIL to read it.
    import fcntl

    from speech2face.data.prepare import RESULT_PIPE_BYTES, _pool

    pool = _pool(1, data.Options("voxceleb1"))
    try:
        size = fcntl.fcntl(pool._outqueue._reader.fileno(), fcntl.F_GETPIPE_SZ)
    finally:
        pool.terminate()
        pool.join()
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert size >= min(RESULT_PIPE_BYTES, limit) and size > 64 * 1024


def test_only_the_frames_the_clips_use_are_processed(corpus):
    # One clip uses one crop: the first frame with a face; the others are not read.
    from dataclasses import replace

    unit = data.list_units("voxceleb1", corpus)[0]
    one_clip = replace(unit, clips=unit.clips[:1])
    result = _Processor(data.Options("voxceleb1"))(one_clip)
    assert result.counts["frames"] == 1 and len(result.samples) == 1
    full = _Processor(data.Options("voxceleb1"))(unit)
    assert full.counts["frames"] == FRAMES
    assert result.samples[0]["files"] == full.samples[0]["files"]


def test_face_crop_frames_fall_back_to_full_size_detection(corpus, tmp_path):
    # A frame in which the face is small (not a tight face crop): nothing at 200 px,
    # so the frame is searched at full size, upsampled, and the face found there.
    from PIL import Image

    from speech2face import faces

    frame = sorted((corpus / "unzippedFaces").rglob("*.jpg"))[0]
    canvas = Image.new("RGB", (720, 720), (90, 100, 110))
    canvas.paste(Image.open(frame).resize((160, 160)), (280, 280))
    image = np.asarray(canvas)
    assert faces.detect_faces(image, upsample=0, max_side=faces.FACE_CROP_DETECT_SIDE) == []
    found = _Processor(data.Options("voxceleb1"))._detect(image, data.Frame(str(frame)))
    assert len(found) == 1 and 280 <= found[0].box[0] < found[0].box[2] <= 440


# ----------------------------------------------------------------------------- loader


def test_loader_batches_match_the_contract(reference):
    manifest = data.load_manifest(reference)
    batch = next(iter(data.make_loader(reference, "train", batch_size=3, shuffle=4, seconds=3.0)))
    assert batch["wave"].shape == (3, 48000) and batch["wave"].dtype == torch.float32
    assert batch["feature"].shape == (3, 128)
    assert (
        batch["face"].shape == (3, 3, 224, 224)
        and 0 <= batch["face"].min()
        and batch["face"].max() <= 1
    )
    assert batch["landmarks"].shape == (3, 68, 2)
    assert [manifest["identities"][i] for i in batch["identity_index"]] == [
        m["identity"] for m in batch["meta"]
    ]
    spec = next(iter(data.ShardDataset(reference, "test", batch_size=2, spectrogram=True)))
    assert spec["spectrogram"].shape == (2, 2, 598, 257) and "wave" not in spec
    # audio=False (the face decoder's stage): the same samples, the audio never decoded
    faces_only = next(iter(data.ShardDataset(reference, "test", batch_size=2, audio=False)))
    with_audio = next(iter(data.ShardDataset(reference, "test", batch_size=2)))
    assert "wave" not in faces_only and "spectrogram" not in faces_only
    for key in ("feature", "face", "landmarks", "identity_index"):
        assert torch.equal(faces_only[key], with_audio[key]), key
    whole = data.load_split(reference, "test")
    assert len(whole["meta"]) == manifest["splits"]["test"]["samples"] == whole["face"].shape[0]
    with pytest.raises(DataError, match="no 'nope' split"):
        data.ShardDataset(reference, "nope")


def test_a_new_loader_iterator_leaves_torchs_random_stream_alone(reference):
    """Training may draw from torch's global generator (dropout); a resumed run starts
    its loader's iterator at another point of that stream, so the iterator must not draw."""
    loader = data.make_loader(reference, "train", batch_size=2)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_readers_get_disjoint_shards(reference):
    """Two ranks x two DataLoader workers together read every sample exactly once."""
    everything = [
        m["clip"] and f"{m['identity']}/{m['video']}/{m['clip']}"
        for m in data.load_split(reference, "train")["meta"]
    ]
    seen = []
    for rank in range(2):
        loader = data.make_loader(
            reference,
            "train",
            batch_size=2,
            num_workers=2,
            shuffle=3,
            seed=1,
            rank=rank,
            world_size=2,
        )
        for batch in loader:
            seen += [f"{m['identity']}/{m['video']}/{m['clip']}" for m in batch["meta"]]
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))

    # Shuffling changes the order, not the set; the same seed gives the same order.
    def order(seed):
        dataset = data.ShardDataset(reference, "train", batch_size=4, shuffle=5, seed=seed)
        return [m["clip"] + m["video"] for b in dataset for m in b["meta"]]

    assert order(0) == order(0) and sorted(order(0)) == sorted(order(1)) and order(0) != order(1)


def test_training_windows_are_random_slices_of_the_clip(reference):
    """``window_seconds`` (training's ``train_seconds``): each sample's audio is a stretch
    of that length cut, sample for sample, out of its whole clip; where it starts varies
    between samples and between epochs, and the same seed repeats it."""
    whole = data.load_split(reference, "train")
    clips = {f"{m['identity']}/{m['video']}/{m['clip']}": w.numpy()
             for m, w in zip(whole["meta"], whole["wave"], strict=True)}

    def starts(epoch, seed=0):
        dataset = data.ShardDataset(reference, "train", batch_size=4, shuffle=5, seed=seed,
                                    window_seconds=2.5, random_crop=True)
        dataset.set_epoch(epoch)
        found = {}
        for batch in dataset:
            assert batch["wave"].shape[1] == 40000
            for m, w in zip(batch["meta"], batch["wave"].numpy(), strict=True):
                clip = clips[f"{m['identity']}/{m['video']}/{m['clip']}"]
                candidates = np.flatnonzero(clip[: len(clip) - len(w) + 1] == w[0])
                at = [i for i in candidates if np.array_equal(clip[i:i + len(w)], w)]
                assert at, "not a stretch of its clip"
                found[f"{m['identity']}/{m['video']}/{m['clip']}"] = at[0]
        return found

    first = starts(0)
    assert sorted(first) == sorted(clips) and len(set(first.values())) > 1
    assert starts(0) == first and starts(1) != first
    for window in (4.0, 0, float("nan"), "2"):
        with pytest.raises(ConfigError, match="window_seconds must be from 1 / 16000"):
            data.ShardDataset(reference, "train", seconds=3.0, window_seconds=window)


def test_kept_samples_give_the_same_batches_and_read_each_shard_once(reference, monkeypatch):
    """Training without loader workers keeps shards and decoded samples across epochs
    (``sample_cache_mb``): the batches of every epoch (order, crops, audio windows,
    spectrograms) equal those read from disk, each shard is read once, a cache too small
    for the split empties itself and reads from disk, and kept arrays cannot be changed."""
    from speech2face.config import TrainConfig
    from speech2face.data import loader

    reads = []
    real = loader.iterate_tar
    monkeypatch.setattr(loader, "iterate_tar",
                        lambda path, *a: reads.append(path) or real(path, *a))

    def epochs(cache_mb):
        config = TrainConfig.tiny("voice", sample_cache_mb=cache_mb, train_seconds=2.0,
                                  clip_seconds=3.0, shuffle_buffer=5)
        train = loader.ShardData(reference, "train", 2, config, spectrogram=True)
        return train, [[b for b in train.batches(epoch)] for epoch in range(3)]

    shards = len(data.load_manifest(reference)["splits"]["train"]["shards"])
    _, uncached = epochs(0)
    assert len(reads) == 3 * shards
    reads.clear()
    train, cached = epochs(1024)
    assert len(reads) == len(set(reads)) == shards
    assert train.cache.bytes > 0 and not train.cache.full
    for a, b in zip(uncached, cached, strict=True):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["meta"] == y["meta"]
            for key in ("spectrogram", "feature", "landmarks", "identity_index"):
                assert torch.equal(x[key], y[key]), key
            assert "face" not in x  # the voice stage trains on features, not images
    # decoded arrays are shared between epochs, so they are read-only
    kept = next(iter(train.cache._decoded.values()))
    with pytest.raises(ValueError, match="read-only"):
        kept["landmarks"][0, 0] = 1
    # each stored crop of a sample is decoded once, and kept apart from the others
    calls, crops = [], loader.SampleCache(2**20)
    raw = {"__url__": "s.tar", "__key__": "k"}
    got = [crops.decoded(raw, c, lambda c=c: calls.append(c) or {"face": np.full(3, c), "meta": {}})
           for c in (0, 1, 0, 1)]
    assert calls == [0, 1] and [int(g["face"][0]) for g in got] == [0, 1, 0, 1]
    # a budget smaller than the split: emptied, and every epoch reads the shards again
    reads.clear()
    small, too_small = epochs(1)
    assert small.cache.full and small.cache.bytes > 2**20 and not small.cache._decoded
    assert len(reads) == 3 * shards
    for a, b in zip(uncached, too_small, strict=True):
        assert [x["meta"] for x in a] == [y["meta"] for y in b]
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["spectrogram"], y["spectrogram"])


# ------------------------------------------------------------------- faults and skips


def test_bad_inputs_are_skipped_and_counted(corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    ids = sorted(p.name for p in (root / "wav").iterdir())
    names = {
        line.split("\t")[0]: line.split("\t")[1]
        for line in (root / "vox1_meta.csv").read_text().splitlines()[1:]
    }
    # 1. a corrupt clip and an empty one
    videos = sorted((root / "wav" / ids[0]).iterdir())
    (videos[0] / "00002.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    (videos[0] / "00003.wav").write_bytes(b"")
    # 2. a video with face frames but no audio
    no_audio = sorted((root / "wav" / ids[1]).iterdir())[0]
    shutil.rmtree(no_audio)
    # 3. a frame without a face (one of two frames of a video)
    frame = sorted((root / "unzippedFaces" / names[ids[2]] / "1.6").glob("*/*.jpg"))[0]
    from PIL import Image

    Image.new("RGB", (320, 320), (128, 120, 110)).save(frame)
    # 4. an identity without its metadata row
    meta = (root / "vox1_meta.csv").read_text().splitlines()
    (root / "vox1_meta.csv").write_text(
        "\n".join(line for line in meta if not line.startswith(ids[3])) + "\n"
    )

    out = tmp_path / "shards"
    data.prepare("voxceleb1", root, out, samples_per_shard=PER_SHARD, mix_clips=MIX, progress=False)
    manifest = data.load_manifest(out)
    reasons = {(s["item"], s["reason"]) for s in manifest["skipped"]}
    assert any(
        item.endswith(f"{ids[0]}/{videos[0].name}/00002.wav") and "not" in reason
        for item, reason in reasons
    )
    assert (str(videos[0] / "00003.wav"), "empty file") in reasons
    assert (f"{ids[1]}/{no_audio.name}", "video has no audio clips") in reasons
    assert (str(frame), "no face found") in reasons
    missing = [(i, r) for i, r in reasons if i.startswith(ids[3] + "/")]
    assert len(missing) == VIDEOS and all(r.startswith("no metadata row") for _, r in missing)
    assert (
        manifest["counts"]["clips_skipped"] == 2 + VIDEOS * CLIPS
        and manifest["counts"]["frames_skipped"] == 1
    )
    total = SPEAKERS * VIDEOS * CLIPS - 2 - CLIPS - VIDEOS * CLIPS
    assert sum(s["samples"] for s in manifest["splits"].values()) == total
    assert ids[3] not in manifest["identities"]
    assert data.verify_shards(out) == [] and not list(out.rglob("*.partial"))
    assert sum(len(list(data.iterate_tar(p))) for p in out.glob("*/*.tar")) == total


def test_killed_run_resumes_to_identical_shards(corpus, reference, tmp_path):
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "speech2face",
        "prepare",
        "voxceleb1",
        "--root",
        str(corpus),
        "--out",
        str(out),
        "--samples-per-shard",
        str(PER_SHARD),
        "--mix-clips",
        str(MIX),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "parts" / "progress-00000-of-00001.json"
    deadline = time.time() + 600  # a guard only: a loaded machine can be very slow
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["state"]["next_window"] >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    # Whatever exists under a final name is a complete shard recorded in the progress file.
    state = json.loads(progress.read_text())["state"]
    recorded = {
        s["path"]: s["sha256"] for split in state["splits"].values() for s in split["shards"]
    }
    for path in out.glob("*/*.tar"):
        name = str(path.relative_to(out))
        if name in recorded:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[name]
        else:  # renamed but killed before the progress file was written: still complete
            with tarfile.open(path) as tar:
                assert len(tar.getmembers()) == 5 * PER_SHARD
    prepare_vox1(corpus, out)
    assert shard_files(out) == shard_files(reference)
    assert data.load_manifest(out) == {**data.load_manifest(reference), "root": str(out)}
    assert not list(out.rglob("*.partial"))


def test_crash_inside_a_video_resumes_without_loss_or_duplicates(
    corpus, reference, tmp_path, monkeypatch
):
    """A crash (here: in the fourth video) after a shard that ended inside a window."""
    out = tmp_path / "shards"
    with killed_in_video(4), pytest.raises(KeyboardInterrupt):
        prepare_vox1(corpus, out)
    state = json.loads((out / "parts" / "progress-00000-of-00001.json").read_text())["state"]
    # Shards of 4 over windows of 6 samples (two videos): the crash in the second window
    # comes after a shard that ended inside the first, so the rerun must redo the first
    # window and drop its first four samples.
    assert (state["next_window"], state["samples_done"]) == (0, 4)
    assert not list(out.rglob("*.partial"))  # the unfinished shard went with the run
    # another version of prepare's processing does not continue it (nor write anything)
    module = sys.modules[_Processor.__module__]
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        m.setattr(module, "PROCESSING_VERSION", module.PROCESSING_VERSION + 1)
        with pytest.raises(DataError, match="begun by another version of prepare"):
            prepare_vox1(corpus, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    prepare_vox1(corpus, out)
    assert shard_files(out) == shard_files(reference)
    assert data.load_manifest(out) == {**data.load_manifest(reference), "root": str(out)}



def test_a_split_whose_first_windows_give_no_sample_resumes_to_the_same_manifest(
        corpus, reference, tmp_path, monkeypatch):
    """Windows that give no sample (no face in any frame of the val split's videos) are
    recorded, skips and counts, before the next split's first sample closes the last
    shard before them, and that close checkpointed a position before them: a run killed
    after it counted those windows' skips twice on the rerun (the shards were right, the
    manifest's counts and the part's list of skips were not)."""
    import shutil

    from PIL import Image

    from speech2face.data.prepare import _SplitWriter

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    val = set(data.load_manifest(reference)["splits"]["val"]["identities"])
    for line in (root / "vox1_meta.csv").read_text().splitlines()[1:]:
        identity, name = line.split("\t")[:2]
        if identity in val:
            for frame in (root / "unzippedFaces" / name).rglob("*.jpg"):
                Image.new("RGB", (224, 224), (128, 128, 128)).save(frame)
    whole = prepare_vox1(root, tmp_path / "whole")
    assert whole["counts"]["videos_skipped"] > 0 and "val" not in whole["splits"]

    write = _SplitWriter.write

    def killed_at_test(self, sample):
        if self.split == "test":
            raise KeyboardInterrupt
        return write(self, sample)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(_SplitWriter, "write", killed_at_test)
        prepare_vox1(root, out)
    prepare_vox1(root, out)
    assert shard_files(out) == shard_files(tmp_path / "whole")
    assert data.load_manifest(out) == {**data.load_manifest(tmp_path / "whole"), "root": str(out)}
    part = "parts/manifest-00000-of-00001.json"
    assert (out / part).read_bytes() == (tmp_path / "whole" / part).read_bytes()

def test_two_shard_indices_together_equal_one_run(corpus, reference, tmp_path):
    out = tmp_path / "shards"
    # Part 1 also exercises the worker pool (this process and 2 spawned ones, results
    # written in order whoever computed them).
    parts = [
        data.prepare(
            "voxceleb1",
            corpus,
            out,
            shard_index=i,
            num_shards=2,
            samples_per_shard=PER_SHARD,
            mix_clips=MIX,
            workers=1 + 2 * i,
            progress=False,
        )
        for i in range(2)
    ]
    assert all(sum(s["samples"] for s in p["splits"].values()) > 0 for p in parts)  # both did work
    merged, single = data.load_manifest(out), data.load_manifest(reference)
    assert merged["num_parts"] == 2
    assert comparable(merged) == comparable(single)
    np.testing.assert_allclose(merged["mean_landmarks"], single["mean_landmarks"], atol=1e-4)
    assert members(out) == members(reference)
    assert data.verify_shards(out) == []
    assert data.merge_manifests(out) == {k: v for k, v in merged.items() if k != "root"}
    # By hand on the command line: only --out is needed.
    from speech2face.cli import main

    (out / "manifest.json").unlink()
    assert main(["prepare", "-o", str(out), "--merge"]) == 0
    assert data.load_manifest(out) == merged
    assert main(["prepare", "-o", str(out)]) == 2  # neither a dataset nor --merge


def test_cluster_sequence_with_local_processes(corpus, reference, tmp_path):
    """A job array as local processes: three parts at once into one --out, then --merge.
    Part 0 runs two workers: a command that has not imported torch forks its worker."""
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "speech2face", "prepare", "voxceleb1", "--root", str(corpus),
            "--out", str(out), "--samples-per-shard", str(PER_SHARD), "--mix-clips", str(MIX),
            "--num-shards", "3"]
    jobs = [subprocess.Popen([*base, "--shard-index", str(i), "--workers", str(2 - min(i, 1))],
                             env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(3)]
    for job in jobs:
        _, err = job.communicate(timeout=900)
        assert job.returncode == 0, err.decode()
    (out / "manifest.json").unlink()  # the last part merged; do it as the merge step would
    merge = subprocess.run([sys.executable, "-m", "speech2face", "prepare", "--out", str(out),
                            "--merge"], env=env, capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr
    merged, single = data.load_manifest(out), data.load_manifest(reference)
    assert merged["num_parts"] == 3 and comparable(merged) == comparable(single)
    np.testing.assert_allclose(merged["mean_landmarks"], single["mean_landmarks"], atol=1e-4)
    assert members(out) == members(reference) and data.verify_shards(out) == []


def test_a_part_with_other_options_than_its_siblings_is_refused_before_it_works(
        corpus, reference, tmp_path, capsys):
    """Part 1 given another --seed than part 0 processed every video and only then failed
    to merge, and its corrected rerun was refused as "other arguments" too: now it is
    refused before it writes anything, and the corrected part goes on and merges."""
    from speech2face.cli import main

    out = tmp_path / "shards"
    base = ["prepare", "voxceleb1", "--root", str(corpus), "--out", str(out),
            "--samples-per-shard", str(PER_SHARD), "--mix-clips", str(MIX), "--num-shards", "2"]
    assert main([*base, "--shard-index", "0"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main([*base, "--shard-index", "1", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"speech2face prepare: error: {out}/parts/manifest-00000-of-00002.json: "
                   "another part of this --out was prepared with other --seed; give this part "
                   "the same inputs and options as the others, or use a new --out"), err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main([*base, "--shard-index", "1"]) == 0
    assert members(out) == members(reference)
    # The last part's lines are about the merged run: its splits, and a note only where
    # the run lacks a split (from the part's own splits the note was false).
    said = capsys.readouterr()
    merged = data.load_manifest(out)
    sizes = ", ".join(f"{k}: {v['samples']}" for k, v in merged["splits"].items())
    assert f"all 2 parts merged: samples {sizes}" in said.out
    for split in ("val", "test"):
        assert (f"no {split!r} samples" in said.err) == (not merged["splits"].get(split))


def test_ctrl_c_with_workers_ends_in_one_line_and_the_rerun_continues(corpus, reference,
                                                                     tmp_path):
    """Ctrl-C reaches the whole process group: with a pool the command ends at once with
    "interrupted" (exit 130) and no worker's traceback, never hangs, and the rerun
    finishes the same shards. Sent at several moments of the run."""
    import signal
    import time

    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "speech2face", "prepare", "voxceleb1", "--root",
               str(corpus), "--out", str(out), "--samples-per-shard", str(PER_SHARD),
               "--mix-clips", str(MIX), "--workers", "3"]
    for delay in (1.5, 2.5, 3.5):
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(delay)
        if job.poll() is not None:
            break  # finished before this moment
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=60)  # a hang fails here
        if job.returncode == 0:  # the signal came as the run was ending: then it is whole
            assert "Traceback" not in err and (out / "manifest.json").exists(), err
            assert members(out) == members(reference)
            break
        last = err.replace("\r", "\n").strip().splitlines()[-1:]  # after the progress bar
        assert job.returncode == 130 and last == ["speech2face prepare: interrupted"], err
        assert "Traceback" not in err and "terminate called" not in err, err
    finish = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert members(out) == members(reference)


def test_ctrl_c_as_the_pool_starts_closes_the_bar_on_the_way_out(corpus, tmp_path, capsys,
                                                                 monkeypatch):
    """A Ctrl-C while the worker pool was starting left prepare's progress bar open until
    it was collected, after the command's "interrupted" line (seen on a slow CI machine).
    The signal is sent from inside the pool's start, where a real one landed; the bar must
    be closed (and erased) by the time the interrupt leaves ``prepare``, while the
    traceback still holds its frame. A pool that cannot start is said as such."""
    stage = sys.modules["speech2face.data.prepare"]  # the module (data.prepare: its function)
    start_pool = stage._pool

    def ctrl_c_while_starting(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return start_pool(*args, **kwargs)

    monkeypatch.setattr(stage, "_pool", ctrl_c_while_starting)
    out = tmp_path / "shards"
    options = dict(samples_per_shard=PER_SHARD, workers=2, progress=True)
    with pytest.raises(KeyboardInterrupt) as stopped:
        data.prepare("voxceleb1", corpus, out, **options)
    shown = capsys.readouterr().err.split("\n")[-1].split("\r")[-1]  # what a terminal shows
    assert stopped.traceback and shown.strip() == "", shown
    assert not (out / "manifest.json").exists()

    def no_processes_left(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(stage, "_pool", no_processes_left)
    with pytest.raises(DataError, match=r"cannot start 1 worker process\(es\) \(Resource "
                                        r"temporarily unavailable\); use fewer --workers"):
        data.prepare("voxceleb1", corpus, out, **options)


def test_ctrl_c_while_spawned_workers_import_ends_in_one_line(corpus, tmp_path):
    """Spawned workers (torch imported first, or the vggface encoder) spend seconds
    importing before they ignore SIGINT: a Ctrl-C then made each print its own
    KeyboardInterrupt traceback above the command's "interrupted" line. The signal goes
    to the whole process group right after the pool is made, as a terminal sends it."""
    script = f"""
import os, signal, sys
import torch  # the pool is then spawned, not forked
import speech2face.data.prepare
stage = sys.modules["speech2face.data.prepare"]
start = stage._pool
def ctrl_c_after_start(*args, **kwargs):
    pool = start(*args, **kwargs)
    os.killpg(0, signal.SIGINT)  # the workers are importing
    return pool
stage._pool = ctrl_c_after_start
from speech2face.cli import main
sys.exit(main(["prepare", "voxceleb1", "--root", {str(corpus)!r}, "--out",
               {str(tmp_path / "shards")!r}, "--workers", "3"]))
"""
    job = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120, start_new_session=True)
    last = job.stderr.replace("\r", "\n").strip().splitlines()[-1:]  # after the progress bar
    assert job.returncode == 130 and last == ["speech2face prepare: interrupted"], job.stderr
    assert "Traceback" not in job.stderr and "KeyboardInterrupt" not in job.stderr, job.stderr


def _prepare_with(corpus: Path, out: Path, patch: str) -> subprocess.CompletedProcess:
    """``speech2face prepare --workers 2`` in a fresh process without torch (the
    workers are then forked from a child process that loads the models), with ``patch``
    run first: it may replace prepare's functions, which the forked processes inherit."""
    script = f"""
import os, signal, sys
import speech2face.data.prepare
stage = sys.modules["speech2face.data.prepare"]
MAIN = os.getpid()
{patch}
from speech2face.cli import main
assert "torch" not in sys.modules
sys.exit(main(["prepare", "voxceleb1", "--root", {str(corpus)!r}, "--out", {str(out)!r},
               "--samples-per-shard", "{PER_SHARD}", "--mix-clips", "{MIX}", "--workers", "2"]))
"""
    return subprocess.run([sys.executable, "-c", script],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300, start_new_session=True)


def test_an_error_in_a_forked_worker_is_the_commands_one_line(corpus, tmp_path):
    """A unit that raises a DataError in the process that computes the units, or in
    its pool, ends the command with that error's line (exit 2): the error crosses one or
    two process boundaries, pickled as its path and problem."""
    patch = """
from speech2face.errors import DataError
call, calls = stage._Processor.__call__, []
def failing(self, unit):
    calls.append(1)  # each process counts its own
    if len(calls) == 3:
        raise DataError(unit.video, "unreadable in a test")
    return call(self, unit)
stage._Processor.__call__ = failing
"""
    job = _prepare_with(corpus, tmp_path / "shards", patch)
    last = job.stderr.replace("\r", "\n").strip().splitlines()[-1:]
    assert job.returncode == 2 and len(last) == 1, job.stderr
    assert last[0].startswith("speech2face prepare: error: ") and \
        last[0].endswith(": unreadable in a test"), job.stderr
    assert "Traceback" not in job.stderr, job.stderr


def test_a_failed_prepare_leaves_no_thread_process_or_pipe_behind(corpus, tmp_path):
    """``prepare()`` called from Python (no torch: the forked child) that fails: the
    caller goes on (a notebook, a service) without the thread that took the child's
    results (it stayed blocked on the pipe for ever), the child, or their pipes."""
    script = f"""
import multiprocessing, os, sys, threading, time
import speech2face.data.prepare
stage = sys.modules["speech2face.data.prepare"]  # (the package's prepare is the function)
from speech2face.errors import DataError
call, calls = stage._Processor.__call__, []
def failing(self, unit):
    calls.append(1)
    if len(calls) == 3:
        raise DataError(unit.video, "unreadable in a test")
    return call(self, unit)
stage._Processor.__call__ = failing
fds = lambda: len(os.listdir("/proc/self/fd"))
before = fds()
assert "torch" not in sys.modules  # so the forked child computes the units
try:
    stage.prepare("voxceleb1", {str(corpus)!r}, {str(tmp_path / "shards")!r}, workers=2,
                  samples_per_shard={PER_SHARD}, mix_clips={MIX}, progress=False)
except DataError:
    pass
# tqdm's one monitor thread, started by any bar (even a disabled one), is tqdm's
threads = lambda: sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor")
deadline = time.monotonic() + 5
while time.monotonic() < deadline and (threads() != ["MainThread"] or
                                       multiprocessing.active_children()):
    time.sleep(0.05)
print(threads(), multiprocessing.active_children(), fds() - before)
"""
    job = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert job.returncode == 0, job.stderr
    assert job.stdout.split() == ["['MainThread']", "[]", "0"], job.stdout


def test_a_killed_worker_process_ends_the_command_in_one_line_and_the_rerun_continues(
        corpus, reference, tmp_path):
    """The process computing the units, or a worker of its pool, killed (the kernel's
    OOM killer, an operator): the command says so in one line (exit 2) instead of
    waiting for ever for the lost video, and the rerun finishes the same shards."""
    out = tmp_path / "shards"
    for which in ("==", "!="):  # that one; a worker of its pool
        patch = f"""
call, calls = stage._Processor.__call__, []
def killed(self, unit):
    calls.append(1)
    if os.getppid() {which} MAIN and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, unit)
stage._Processor.__call__ = killed
"""
        job = _prepare_with(corpus, out, patch)
        last = job.stderr.replace("\r", "\n").strip().splitlines()[-1:]
        assert job.returncode == 2 and last == [
            "speech2face prepare: error: a worker process ended before its work was done "
            "(killed by SIGKILL; out of memory?); rerun the same command to continue"], \
            job.stderr
        assert "Traceback" not in job.stderr and not (out / "manifest.json").exists()
    finish = _prepare_with(corpus, out, "")
    assert finish.returncode == 0, finish.stderr
    assert members(out) == members(reference)


def test_a_worker_that_exits_with_an_error_is_named_by_its_exit_code(corpus, tmp_path):
    """A script that calls prepare() with workers at its top level, without ``if
    __name__ == "__main__":``: each spawned worker re-runs it and exits with Python's
    error (exit code 1). The caller's error says so and points at that error, rather
    than guessing at memory and asking for a rerun that would fail the same way."""
    script = tmp_path / "no_main_guard.py"
    script.write_text(f"""import torch  # the spawned workers' path
from speech2face.data import prepare
prepare("voxceleb1", {str(corpus)!r}, {str(tmp_path / "shards")!r}, workers=2,
        samples_per_shard={PER_SHARD}, mix_clips={MIX}, progress=False)
""")
    job = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert job.returncode == 1, job.stderr
    assert job.stderr.strip().splitlines()[-1] == (
        "speech2face.errors.DataError: a worker process ended before its work was done "
        "(exit code 1); its error is printed above"), job.stderr
    assert "__main__" in job.stderr, job.stderr  # Python's own advice, from a worker


def test_an_error_that_cannot_cross_processes_ends_the_command_not_hangs(corpus, tmp_path):
    """A bug's exception that pickles but cannot be rebuilt (an __init__ of two
    arguments), raised in the process computing the units or in its pool, killed the
    thread that received it and the command waited for ever: now the command ends with
    its traceback, naming it (exit 1, as any bug)."""
    for which in ("==", "!="):  # the units' process; its pool's worker
        patch = f"""
class TwoArguments(Exception):
    def __init__(self, what, where):
        super().__init__(f"{{what}} at {{where}}")
call, calls = stage._Processor.__call__, []
def failing(self, unit):
    calls.append(1)
    if os.getppid() {which} MAIN and len(calls) == 3:
        raise TwoArguments("a bug", "the third video")
    return call(self, unit)
stage._Processor.__call__ = failing
"""
        job = _prepare_with(corpus, tmp_path / f"shards{len(which)}{which[0]}", patch)
        assert job.returncode == 1, job.stderr
        assert "RuntimeError: TwoArguments: a bug at the third video" in job.stderr, job.stderr


def test_workers_run_where_the_command_is_pid_1(corpus, reference, tmp_path):
    """In a container without an init the command is PID 1, the parent of its workers:
    they took a parent of 1 for a dead one and exited, and every --workers 2 run failed
    (before the forked child, hung). Run in a new PID namespace where ``unshare`` may."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unshare, or no right to make a PID namespace here")
    out = tmp_path / "shards"
    job = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "speech2face",
         "prepare", "voxceleb1", "--root", str(corpus), "--out", str(out),
         "--samples-per-shard", str(PER_SHARD), "--mix-clips", str(MIX), "--workers", "2"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300, check=False)
    assert job.returncode == 0, job.stderr
    assert members(out) == members(reference)


def test_workers_start_where_signal_masks_do_not_exist(corpus, reference, tmp_path,
                                                       monkeypatch):
    """Without POSIX signal masks (signal.pthread_sigmask: Windows) the pool starts as
    before, unmasked, and the shards are the same."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # the standard library's own use of masks, first
    from speech2face import utils

    stage = sys.modules["speech2face.data.prepare"]
    monkeypatch.setattr(stage, "SIGNAL_MASKS", False)
    monkeypatch.setattr(utils, "SIGNAL_MASKS", False)
    monkeypatch.setattr(stage.signal, "pthread_sigmask", None)  # any call would fail
    prepare_vox1(corpus, tmp_path / "shards", workers=2)
    assert members(tmp_path / "shards") == members(reference)


def test_rerun_is_a_no_op_and_other_arguments_are_refused(corpus, reference, tmp_path):
    before = shard_files(reference)
    prepare_vox1(corpus, reference)
    assert shard_files(reference) == before
    with pytest.raises(DataError, match="other arguments"):
        data.prepare(
            "voxceleb1", corpus, reference, samples_per_shard=PER_SHARD + 1, progress=False
        )
    from speech2face.cli import main

    assert (
        main(
            [
                "prepare",
                "voxceleb1",
                "--root",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ splits


def test_voxceleb1_official_split_and_carved_validation(tmp_path):
    """Without a split file: test = id10270-id10309 (official), val = a hashed 5% of dev."""
    root = tmp_path / "vox1"
    ids = [f"id{n}" for n in range(10001, 10401)]
    rows = ["VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"]
    for n, identity in enumerate(ids):
        official_test = 10270 <= int(identity[2:]) <= 10309
        rows.append(
            f"{identity}\tName_{n}\t{'mf'[n % 2]}\tUK\t{'test' if official_test else 'dev'}"
        )
        (root / "wav" / identity / "vid").mkdir(parents=True)
        (root / "wav" / identity / "vid" / "00001.wav").write_bytes(b"")
        (root / "unzippedFaces" / f"Name_{n}" / "1.6" / "vid").mkdir(parents=True)
        (root / "unzippedFaces" / f"Name_{n}" / "1.6" / "vid" / "0000001.jpg").write_bytes(b"")
    (root / "vox1_meta.csv").write_text("\n".join(rows) + "\n")
    units = data.list_units("voxceleb1", root)
    split_of = {u.identity: u.split for u in units}
    assert {i for i, s in split_of.items() if s == "test"} == data.VOX1_TEST_IDENTITIES
    val = {i for i, s in split_of.items() if s == "val"}
    assert len(val) == round(0.05 * (len(ids) - 40)) and not val & data.VOX1_TEST_IDENTITIES
    assert [u.split for u in units] == sorted((u.split for u in units), key=data.SPLITS.index)
    # Sharding across machines: every video in exactly one part, the same split everywhere.
    keys = [{u.key for u in units if data.stable_hash(u.key) % 3 == i} for i in range(3)]
    assert set.union(*keys) == {u.key for u in units} and sum(map(len, keys)) == len(units)
    assert data.list_units("voxceleb1", root) == units  # deterministic
    with pytest.raises(DataError, match="no wav/"):
        data.list_units("voxceleb1", root / "wav")


def _voxceleb_tree(root: Path, dataset: str, sets: dict[str, str]) -> Path:
    """The files list_units reads of a VoxCeleb folder (empty media), with these Sets;
    returns the metadata table."""
    for n, identity in enumerate(sets):
        if dataset == "voxceleb1":
            (root / "wav" / identity / "vid").mkdir(parents=True)
            (root / "wav" / identity / "vid" / "00001.wav").write_bytes(b"")
            (root / "unzippedFaces" / f"N{n}" / "1.6" / "vid").mkdir(parents=True)
            (root / "unzippedFaces" / f"N{n}" / "1.6" / "vid" / "0000001.jpg").write_bytes(b"")
        else:
            (root / "mp4" / identity / "vid").mkdir(parents=True)
            (root / "mp4" / identity / "vid" / "00001.mp4").write_bytes(b"")
    if dataset == "voxceleb1":
        meta = root / "vox1_meta.csv"
        rows = ["VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"] + [
            f"{i}\tN{n}\tm\tUK\t{s}" for n, (i, s) in enumerate(sets.items())]
    else:
        meta = root / "vox2_meta.csv"
        rows = ["VoxCeleb2 ID ,VGGFace2 ID ,Gender ,Set "] + [
            f"{i} ,n{n:06d} ,m ,{s} " for n, (i, s) in enumerate(sets.items())]
    meta.write_text("\n".join(rows) + "\n")
    return meta


@pytest.mark.parametrize("dataset", ["voxceleb1", "voxceleb2"])
def test_a_set_other_than_dev_or_test_is_refused(tmp_path, dataset):
    """An unknown Set would silently make its identity a training one."""
    first = "id10001" if dataset == "voxceleb1" else "id00012"
    second = "id10002" if dataset == "voxceleb1" else "id00015"
    meta = _voxceleb_tree(tmp_path / "ok", dataset, {first: "Dev", second: "TEST"})
    assert {u.identity: u.split for u in data.list_units(dataset, meta.parent)}[second] == "test"
    meta = _voxceleb_tree(tmp_path / "typo", dataset, {first: "dev", second: "tst"})
    with pytest.raises(DataError) as error:
        data.list_units(dataset, meta.parent)
    assert str(error.value) == f"{meta}: {second}: unknown Set 'tst' (expected dev or test)"


def test_a_voxceleb2_identity_without_a_set_is_refused(tmp_path):
    meta = _voxceleb_tree(tmp_path, "voxceleb2", {"id00012": "dev", "id00015": ""})
    with pytest.raises(DataError, match=f"{meta}: id00015: no Set value"):
        data.list_units("voxceleb2", tmp_path)


def test_a_root_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "notes.csv").write_text("id,split\n")
    code = main(["prepare", "voxceleb1", "--root", str(tmp_path / "notes.csv"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("notes.csv: is a file, not the dataset's folder"), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="nothing: dataset folder not found"):
        data.list_units("voxceleb1", tmp_path / "nothing")


# -------------------------------------------------------------- VoxCeleb2 and AVSpeech


def _write_mp4(
    path: Path, frames: list[np.ndarray], audio: np.ndarray | None, fps: int = 5
) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=16000)
            astream.layout = "mono"
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if astream is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = 16000
            for packet in astream.encode(frame):
                container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)


def _demo_face_and_voice(corpus: Path, k: int) -> tuple[list[np.ndarray], np.ndarray]:
    from PIL import Image

    identity = sorted(p.name for p in (corpus / "wav").iterdir())[k]
    name = next(
        line.split("\t")[1]
        for line in (corpus / "vox1_meta.csv").read_text().splitlines()
        if line.startswith(identity)
    )
    frames = [
        np.asarray(Image.open(p))
        for p in sorted((corpus / "unzippedFaces" / name).rglob("*.jpg"))[:2]
    ]
    wave, _ = sf.read(sorted((corpus / "wav" / identity).rglob("*.wav"))[0], dtype="float32")
    return frames, wave[:48000]


def test_voxceleb2_mp4_layout(corpus, tmp_path):
    root = tmp_path / "vox2"
    rows = ["VoxCeleb2 ID ,VGGFace2 ID ,Gender ,Set "]
    for k, (identity, split) in enumerate(
        [("id00012", "dev"), ("id00015", "test"), ("id00017", "dev")]
    ):
        rows.append(f"{identity} ,n{k:06d} ,{'mf'[k % 2]} ,{split} ")
        frames, wave = _demo_face_and_voice(corpus, k)
        for clip in ("00001", "00002"):
            # The third identity's video has no audio track and no .m4a: it is skipped.
            _write_mp4(
                root / split / "mp4" / identity / "vidA" / f"{clip}.mp4",
                frames * 5,
                wave if k < 2 else None,
            )
    (root / "vox2_meta.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    data.prepare("voxceleb2", root, out, frames_per_video=1, progress=False)
    manifest = data.load_manifest(out)
    assert manifest["splits"]["test"]["identities"] == ["id00015"]
    assert sum(s["samples"] for s in manifest["splits"].values()) == 4
    assert manifest["skipped_by_reason"]["no audio track"] == 2
    assert any(s["item"] == "id00017/vidA" for s in manifest["skipped"])
    batch = data.load_split(out, "test")
    assert batch["wave"].shape == (2, 96000) and batch["feature"].shape == (2, 128)
    # Without its Set column no identity would be test: refused, not a split without test.
    (root / "vox2_meta.csv").write_text("\n".join(
        ",".join(row.split(",")[:3]) for row in rows) + "\n")
    with pytest.raises(DataError, match="has no 'Set' column"):
        data.list_units("voxceleb2", root)


def test_avspeech_segments(corpus, tmp_path, monkeypatch):
    real_read = datasets.read_avspeech_csvs
    root = tmp_path / "avspeech"
    frames, wave = _demo_face_and_voice(corpus, 0)
    _write_mp4(
        root / "videos" / "AvSpeechVid1.mp4", frames * 10, np.concatenate([wave, wave])
    )  # 4 s
    (root / "avspeech_train.csv").write_text(
        "AvSpeechVid1,0.000000,1.500000,0.5,0.45\n"
        "AvSpeechVid1,2.000000,3.900000,0.5,0.45\n"
        "NotDownloaded,1.0,4.0,0.5,0.5\n"
    )
    (root / "avspeech_test.csv").write_text("")
    out = tmp_path / "shards"
    data.prepare("avspeech", root, out, progress=False)
    manifest = data.load_manifest(out)
    split = "val" if "val" in manifest["splits"] else "train"
    assert manifest["splits"][split]["samples"] == 2
    assert {"item": "NotDownloaded/NotDownloaded", "reason": "video not downloaded"} in manifest[
        "skipped"
    ]
    metas = data.load_split(out, split)["meta"]
    assert sorted((m["clip"], m["start"], m["end"]) for m in metas) == [
        ("s000000000", 0.0, 1.5),
        ("s000002000", 2.0, 3.9),
    ]
    # A video with segments in both CSVs is test, whichever CSV lists it first.
    for first in ("train", "test"):
        other = "test" if first == "train" else "train"
        rows = {first: "AvSpeechVid1,0.000000,1.500000,0.5,0.45\n",
                other: "AvSpeechVid1,2.000000,3.900000,0.5,0.45\n"}
        tables = [(root / f"avspeech_{s}.csv", s) for s in (first, other)]
        for path, s in tables:
            path.write_text(rows[s])
        monkeypatch.setattr(datasets, "read_avspeech_csvs",
                            lambda _, order=tables: real_read(order))
        (unit,) = [u for u in datasets.list_avspeech(root, 1) if u.video == "AvSpeechVid1"]
        assert unit.split == "test" and len(unit.clips) == 2
