"""Bad shards and bad dataset metadata: one clear error naming the file, or a skip.

Shards: the manifest's size and SHA-256 are checked before a shard is streamed, decode
errors name the shard, manifest paths may not leave the dataset folder. Datasets:
unreadable or wrong metadata tables, AVSpeech rows with nan/inf, names that are not
UTF-8 or very long, dots in clip names, a full disk, leftovers of killed runs. Every
bad input is generated here.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_data_order import tiny_files, write_split  # tests/ is on sys.path (rootdir conftest)

from speech2face import data
from speech2face.cli import main
from speech2face.data.prepare import _HashingFile
from speech2face.demo_data import make_demo_data
from speech2face.errors import DataError

KEYS = [f"id{i:05d}/v00/{c:05d}" for i in range(6) for c in range(4)]  # 24 samples


@pytest.fixture
def shards(tmp_path) -> Path:
    """24 tiny samples in shards of 8 and their manifest."""
    write_split(tmp_path, KEYS, per_shard=8, picks=(0, 1, 2))
    return tmp_path


def entry(root: Path, i: int = 1) -> dict:
    return json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][i]


def stream(root: Path) -> list[dict]:
    return list(data.ShardDataset(root, "train", seconds=0.01, rank=0, world_size=1))


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr without the progress bar's lines."""
    code = main(list(argv))
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return code, "\n".join(x for x in lines if x.strip() and not re.search(r"\|\s*\d+/\d+ \[", x))


# ------------------------------------------------------------------------------- shards


def test_intact_shards_stream_completely(shards):
    assert len(stream(shards)) == len(KEYS) and data.verify_shards(shards) == []


def test_flipped_byte_is_caught_before_any_sample_of_the_shard(shards):
    path = shards / entry(shards)["path"]
    with tarfile.open(path) as tar:  # flip one byte inside a feature.npy member
        member = next(m for m in tar.getmembers() if m.name.endswith("feature.npy"))
    blob = bytearray(path.read_bytes())
    blob[member.offset_data + member.size - 1] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert data.verify_shards(shards) == [entry(shards)["path"]]
    seen = []
    with pytest.raises(DataError, match="SHA-256 differs") as error:
        for sample in data.ShardDataset(shards, "train", seconds=0.01, rank=0, world_size=1):
            seen.append(sample["meta"][0]["identity"])
    assert str(path) in str(error.value)
    assert len(seen) == 8  # the first shard only: nothing of the damaged one


def test_truncated_shard_names_the_file(shards):
    path = shards / entry(shards)["path"]
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(DataError, match="truncated or changed") as error:
        stream(shards)
    assert str(path) in str(error.value)


def test_an_npy_header_claiming_more_than_the_member_holds_is_refused():
    """Not allocated first: a damaged shape of 4e9 elements took 15 GB before failing."""
    import io

    from speech2face.data.loader import _load_npy

    buffer = io.BytesIO()
    np.save(buffer, np.arange(128, dtype=np.float32))
    good = buffer.getvalue()
    np.testing.assert_array_equal(_load_npy(good), np.arange(128, dtype=np.float32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (4_000_000_000,)})
    damaged = header.getvalue() + np.arange(128, dtype=np.float32).tobytes()
    with pytest.raises(ValueError, match=r"claims \(4000000000,\) float32 .* holds 512 bytes"):
        _load_npy(damaged)


@pytest.mark.parametrize("options, words", [
    ({"seed": -1}, "seed must be"), ({"seed": 1.5}, "seed must be"),
    ({"shuffle": -5}, "shuffle must be a buffer size"), ({"shuffle": 2.5}, "shuffle must be"),
    ({"epoch": -1}, "epoch must be an integer >= 0"), ({"epoch": None}, "epoch must be"),
])
def test_bad_loader_options_are_refused_when_the_loader_is_made(shards, options, words):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        data.make_loader(shards, "train", batch_size=2, **options)


def test_a_folder_where_a_shard_should_be_is_named_as_such(shards):
    path = shards / entry(shards)["path"]
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match="a folder where the manifest lists a shard") as error:
        stream(shards)
    assert str(path) in str(error.value)


def test_mean_landmarks_a_face_crop_cannot_have_are_refused(shards):
    """1e308 is finite in JSON; as float32 pixels it is infinity, and training then stopped
    with a misleading "diverged, lower lr"."""
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["mean_landmarks"] = [[1e308, 100.0]] + [[100.0, 100.0]] * 67
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="mean_landmarks"):
        data.load_manifest(shards)


@pytest.mark.parametrize("bad, problem", [
    ("../../etc/passwd", "outside the dataset folder"), ("/etc/passwd", "is absolute"),
    ("train/../../x.tar", "outside the dataset folder"),
    (None, "is absolute"),  # inside the folder, but absolute: accepted before (see docs)
])
def test_manifest_paths_outside_the_dataset_folder_are_refused(shards, bad, problem):
    manifest = json.loads((shards / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    first["path"] = bad or str((shards / first["path"]).resolve())
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=problem):
        data.load_manifest(shards)


@pytest.mark.parametrize("text", [b"\xff\xfe binary", b"[1, 2]", b'{"format": 2, "splits": 3}',
                                  b"[" * 100_000 + b"]" * 100_000])  # too deep for json
def test_malformed_manifests_are_one_error(shards, text):
    (shards / "manifest.json").write_bytes(text)
    with pytest.raises(DataError, match="manifest"):
        data.load_manifest(shards)


def test_decode_error_names_the_shard_and_the_sample(tmp_path):
    entries: list[dict] = []
    from speech2face.data.prepare import _SplitWriter

    writer = _SplitWriter(tmp_path, "train", "", 0, 8, entries.append)
    files = tiny_files("id00000/v00/00000")
    writer.write({"key": "id00000/v00/00000", "files": {**files, "flac": b"not audio"}})
    writer.close()
    manifest = {"format": data.FORMAT_VERSION, "encoder": "dlib", "feature_dim": 136,
                "identities": ["id00000"],
                "splits": {"train": {"samples": 1, "identities": [], "shards": entries}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as error:
        stream(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "train" / "train-000000.tar") in message
    assert "id00000/v00/00000" in message and "undecodable" in message


# ---------------------------------------------------------------------- dataset metadata


@pytest.fixture
def vox1(tmp_path) -> Path:
    """A VoxCeleb1 layout that lists (its files need not decode: listing fails first)."""
    root = tmp_path / "vox1"
    (root / "wav" / "id10001" / "vid").mkdir(parents=True)
    (root / "wav" / "id10001" / "vid" / "00001.wav").write_bytes(b"")
    (root / "unzippedFaces" / "A.B" / "1.6" / "vid").mkdir(parents=True)
    (root / "unzippedFaces" / "A.B" / "1.6" / "vid" / "1.jpg").write_bytes(b"")
    (root / "vox1_meta.csv").write_text(
        "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\nid10001\tA.B\tm\tX\tdev\n"
    )
    return root


def break_binary(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")


def break_folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("vox1_meta.csv", break_binary, "not UTF-8"),
        ("vox1_meta.csv", break_folder, "is a folder"),
        ("vox1_meta.csv", lambda p: p.write_text("id\tname\nid10001\tA.B\n".replace("id\t", "x\t")),
         "no 'VoxCeleb1 ID' column"),
        ("vox1_meta.csv", lambda p: p.write_text("id10001\tA.B\tm\tX\tdev\n"),
         "no 'VoxCeleb1 ID' column"),
        ("identity_split.csv", break_binary, "not UTF-8"),
        ("identity_split.csv", break_folder, "is a folder"),
        ("identity_split.csv", lambda p: p.write_text("who,where\nid10001,train\n"),
         "no 'identity' column"),
        ("unzippedFaces", shutil.rmtree, "no unzippedFaces"),
    ],
)
def test_bad_voxceleb1_metadata_is_one_line(vox1, tmp_path, capsys, name, damage, expected):
    damage(vox1 / name)
    out = tmp_path / "out"
    code, err = cli(capsys, "prepare", "voxceleb1", "--root", str(vox1), "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert expected in err and name in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "row", ["vid,nan,3.0,0.5,0.5", "vid,1.0,inf,0.5,0.5", "vid,4.0,3.0,0.5,0.5",
            "vid,1.0,3.0,1.5,0.5", "vid,1.0", "vid,a,b,c,d"],
)
def test_bad_avspeech_rows_name_the_line(tmp_path, capsys, row):
    root = tmp_path / "avspeech"
    root.mkdir()
    (root / "avspeech_train.csv").write_text(f"good,1.0,3.0,0.5,0.5\n{row}\n")
    code, err = cli(capsys, "prepare", "avspeech", "--root", str(root),
                    "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "avspeech_train.csv" in err and "line 2" in err


def test_non_utf8_folder_names_are_skipped_with_a_reason(vox1):
    odd = Path(bytes(vox1 / "wav").decode() + "/" + b"id\xff10002".decode("utf-8",
                                                                         "surrogateescape"))
    try:
        odd.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses non-UTF-8 names")
    units = data.list_units("voxceleb1", vox1)
    skipped = [u for u in units if u.skip == "name is not valid UTF-8"]
    assert len(skipped) == 1 and "\\xff" in skipped[0].identity
    json.dumps([u.key for u in units])  # every key is printable


def test_links_to_nothing_fifos_and_link_loops_are_skipped_with_a_reason(vox1):
    """Not dropped unseen: a clip behind a broken link (storage moved) is data missing."""
    video = vox1 / "wav" / "id10001" / "vid"
    (video / "00002.wav").symlink_to(vox1 / "moved" / "00002.wav")
    (video / "00003.wav").symlink_to(video / "00003.wav")  # a loop
    os.mkfifo(video / "00004.wav")
    (video / "notes.txt").symlink_to(vox1 / "moved" / "notes.txt")  # not a clip: ignored
    faces = vox1 / "unzippedFaces" / "A.B" / "1.6" / "vid"
    (faces / "2.jpg").symlink_to(vox1 / "moved" / "2.jpg")
    units = data.list_units("voxceleb1", vox1)
    skipped = {Path(u.identity).name: u.skip for u in units if u.video == ""}
    assert skipped == dict.fromkeys(["00002.wav", "00003.wav", "00004.wav", "2.jpg"],
                                    "not a readable file (a broken link, a link loop, a FIFO "
                                    "or a device)")
    (listed,) = [u for u in units if u.video == "vid"]
    assert [Path(c.path).name for c in listed.clips] == ["00001.wav"]
    assert [Path(f.path).name for f in listed.frames] == ["1.jpg"]


# ------------------------------------------------------------------- prepare end to end


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Two speakers; one identity renamed to 200 characters, one clip named with dots."""
    root = tmp_path_factory.mktemp("integrity") / "corpus"
    make_demo_data(root, speakers=3, seed=5, videos=(1, 1), clips=(3, 3), frames=1,
                   progress=False)
    old = sorted(p.name for p in (root / "wav").iterdir())[0]
    new = "id" + "x" * 198
    (root / "wav" / old).rename(root / "wav" / new)
    for table in ("vox1_meta.csv", "identity_split.csv"):
        (root / table).write_text((root / table).read_text().replace(old, new))
    clip = sorted((root / "wav").glob("*/*/*.wav"))[-1]
    clip.rename(clip.with_name("00001.part.2.wav"))
    return root


def test_long_names_and_dotted_clips_survive(small_corpus, tmp_path):
    out = tmp_path / "shards"
    data.prepare("voxceleb1", small_corpus, out, progress=False)
    manifest = data.load_manifest(out)
    assert manifest["skipped"] == [] and data.verify_shards(out) == []
    metas = [m for split in manifest["splits"] for m in data.load_split(out, split)["meta"]]
    assert len(metas) == sum(s["samples"] for s in manifest["splits"].values()) == 9
    assert "00001.part.2" in {m["clip"] for m in metas}
    assert "id" + "x" * 198 in {m["identity"] for m in metas}


def test_disk_full_is_one_line_and_the_rerun_continues(small_corpus, tmp_path, capsys,
                                                        monkeypatch):
    out = tmp_path / "shards"
    reference = tmp_path / "reference"
    data.prepare("voxceleb1", small_corpus, reference, samples_per_shard=2, progress=False)
    written = {"bytes": 0}
    original = _HashingFile.write

    def fill_up(self, block):
        written["bytes"] += len(block)
        if written["bytes"] > 500_000 and not self.f.closed:  # after two or three shards
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
        return original(self, block)

    monkeypatch.setattr(_HashingFile, "write", fill_up)
    argv = ["prepare", "voxceleb1", "--root", str(small_corpus), "--out", str(out),
            "--samples-per-shard", "2"]
    code, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and "disk full" in err, err
    assert not list(out.rglob("*.partial"))  # the unfinished shard went with the run
    # what a kill leaves instead, for the rerun to remove
    (out / "train" / ".train-000099.tar.partial").write_bytes(b"half a shard")
    (out / "parts" / ".progress-00000-of-00001.json.abc123.tmp").write_text("{")
    monkeypatch.setattr(_HashingFile, "write", original)
    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    assert {p.relative_to(out): p.read_bytes() for p in out.glob("*/*.tar")} == {
        p.relative_to(reference): p.read_bytes() for p in reference.glob("*/*.tar")
    }


def test_no_samples_at_all_is_an_error(small_corpus, tmp_path, capsys):
    root = tmp_path / "faceless"
    shutil.copytree(small_corpus, root)
    from PIL import Image

    for frame in root.glob("unzippedFaces/*/*/*/*.jpg"):
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(frame)
    code, err = cli(capsys, "prepare", "voxceleb1", "--root", str(root),
                    "--out", str(tmp_path / "out"))
    assert code == 2 and "no samples" in err and "no face found" in err, err


# ---------------------------------------------------------------- sample contents, arguments


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _flac(wave, rate: int) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="FLAC")
    return buffer.getvalue()


def _wav(wave) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, wave, 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _jpeg(size: int = 224) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bomb_jpeg(width: int, height: int) -> bytes:
    blob = bytearray(_jpeg(8))
    at = blob.index(b"\xff\xc0")
    blob[at + 5:at + 7] = height.to_bytes(2, "big")
    blob[at + 7:at + 9] = width.to_bytes(2, "big")
    return bytes(blob)


def _one_sample_split(root: Path, **members: bytes) -> Path:
    """One sample (``tiny_files`` with ``members`` replaced) in a shard, and its manifest."""
    from speech2face.data.prepare import _SplitWriter

    entries: list[dict] = []
    writer = _SplitWriter(root, "train", "", 0, 8, entries.append)
    writer.write({"key": "id00000/v00/00000", "files": {**tiny_files("id00000/v00/00000"),
                                                        **members}})
    writer.close()
    manifest = {"format": data.FORMAT_VERSION, "encoder": "dlib", "feature_dim": 136,
                "identities": ["id00000"],
                "splits": {"train": {"samples": 1, "identities": [], "shards": entries}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


BAD_MEMBERS = {
    "stereo audio": ({"flac": _flac(np.full((200, 2), 0.1, np.float32), 16000)}, "2 channel"),
    "8 kHz audio": ({"flac": _flac(np.full(800, 0.1, np.float32), 8000)}, "8000 Hz"),
    "decompression bomb": ({"face.jpg": _bomb_jpeg(60000, 60000)}, "too large"),
    "small face": ({"face.jpg": _jpeg(4)}, "4 x 4 pixels"),
    "json list": ({"json": b"[1, 2]"}, "json is not an object"),
    "unknown identity": ({"json": b'{"identity": "ghost"}'}, "'ghost' is not in"),
    "short feature": ({"feature.npy": _npy(np.zeros(5, np.float32))}, r"feature is float32 \(5,\)"),
    "NaN feature": ({"feature.npy": _npy(np.full(136, np.nan, np.float32))}, "finite"),
    "landmarks (3,)": ({"landmarks.npy": _npy(np.zeros(3, np.float32))}, "landmarks are"),
    # the batches' dtypes are the format's: float32, not whatever the member says
    "float64 feature": ({"feature.npy": _npy(np.zeros(136))}, "feature is float64"),
    "float16 landmarks": ({"landmarks.npy": _npy(np.zeros((68, 2), np.float16))},
                          "landmarks are float16"),
    # soundfile reads any format it recognises: a float WAV can hold NaN, FLAC cannot
    "WAV audio": ({"flac": _wav(np.full(800, np.nan, np.float32))}, "audio is WAV"),
    "another split's sample": ({"json": b'{"identity": "id00000", "split": "test"}'},
                               "a sample of the 'test' split in a 'train' shard"),
}


@pytest.mark.parametrize("case", BAD_MEMBERS)
def test_sample_members_are_checked_against_the_format_and_manifest(tmp_path, case):
    members, expected = BAD_MEMBERS[case]
    root = _one_sample_split(tmp_path, **members)
    with pytest.raises(DataError, match=expected) as error:
        stream(root)
    message = str(error.value)
    assert str(root / "train" / "train-000000.tar") in message
    assert "id00000/v00/00000" in message and "\n" not in message


FEATURE_MEMBERS = {
    "NaN feature": ({"feature.npy": _npy(np.full(136, np.nan, np.float32))}, "finite"),
    "short feature": ({"feature.npy": _npy(np.zeros(5, np.float32))}, r"float32 \(5,\)"),
    "unknown identity": ({"json": b'{"identity": "ghost"}'}, "'ghost' is not in"),
    "identity a number": ({"json": b'{"identity": 7}'}, "'identity' name"),
    # a header claiming 1.86 TiB: numpy would try to allocate it before reading
    "huge header": ({"feature.npy": _npy(np.zeros(136, np.float32)).replace(
        b"(136,)", b"(2000000000, 128)")}, "header claims"),
}


@pytest.mark.parametrize("case", FEATURE_MEMBERS)
def test_training_features_are_checked_as_the_loader_checks_them(tmp_path, case):
    """train and train-decoder read the features alone (standardisation, the identity
    classifier): the same checks as a batch's, one error naming the shard and sample."""
    members, expected = FEATURE_MEMBERS[case]
    root = _one_sample_split(tmp_path, **members)
    with pytest.raises(DataError, match=expected) as error:
        data.training_features(root, progress=False)
    assert str(root / "train" / "train-000000.tar") in str(error.value)
    assert "id00000/v00/00000" in str(error.value)


def test_a_training_command_on_a_bad_feature_is_one_line(tmp_path, capsys):
    root = _one_sample_split(tmp_path / "shards", **FEATURE_MEMBERS["huge header"][0])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["mean_landmarks"] = [[60.0 + 10 * (i % 10), 40.0 + 20 * (i // 10)]
                                  for i in range(68)]
    (root / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli(capsys, "train-decoder", "--data", str(root), "-o", str(tmp_path / "run"),
                    "--no-progress", "preset=tiny", "steps=1", "val_batches=0", "batch_size=1")
    assert code == 2 and len(err.splitlines()) == 1 and "header claims" in err, err
    assert not (tmp_path / "run").exists()


def _rewrite_shard(root: Path, i: int, blob: bytes, samples: int | None = None) -> Path:
    """Shard ``i`` replaced by ``blob``, its manifest entry made to match (size, SHA-256
    and, given, sample counts): what only the contents can tell."""
    import hashlib

    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][i]
    (root / shard["path"]).write_bytes(blob)
    shard.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    if samples is not None:
        manifest["splits"]["train"]["samples"] += samples - shard["samples"]
        shard["samples"] = samples
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / shard["path"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_a_shard_holding_another_count_than_its_manifest_is_refused(shards):
    path = _rewrite_shard(shards, 1, (shards / entry(shards)["path"]).read_bytes(), samples=5)
    with pytest.raises(DataError, match="holds 8 samples, the manifest says 5") as error:
        stream(shards)
    assert str(path) in str(error.value)
    # a shard emptied of its samples (a tar of nothing) with the manifest's counts kept
    _rewrite_shard(shards, 1, _tar([]), samples=8)
    with pytest.raises(DataError, match="holds 0 samples, the manifest says 8"):
        stream(shards)
    with pytest.raises(DataError, match="holds 0 samples"):  # and where features are read
        data.training_features(shards, progress=False)


def test_a_sample_twice_in_a_shard_is_refused(shards):
    members = _members(shards / entry(shards)["path"])
    first = [m for m in members if m[0].startswith(members[0][0].split(".")[0] + ".")]
    _rewrite_shard(shards, 1, _tar(members[len(first):] + first), samples=8)
    assert len(stream(shards)) == len(KEYS)  # reordered: still whole
    _rewrite_shard(shards, 1, _tar(members + first), samples=9)
    with pytest.raises(DataError, match="holds sample .* twice"):
        stream(shards)


def test_a_compressed_shard_is_refused_before_it_is_expanded(shards):
    import gzip

    path = shards / entry(shards)["path"]
    # counted so that the manifest's check (512 bytes a sample at least) lets it by
    _rewrite_shard(shards, 1, gzip.compress(path.read_bytes()), samples=2)
    with pytest.raises(DataError, match="a compressed file; shards are plain tar") as error:
        stream(shards)
    assert str(path) in str(error.value)


def test_unsorted_or_repeated_identities_are_refused(shards):
    """A sample's identity_index is its identity's place in the list: a reordered list
    would silently relabel every sample."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for names in (manifest["identities"][::-1], manifest["identities"][:1] * 2):
        (shards / "manifest.json").write_text(json.dumps({**manifest, "identities": names}))
        with pytest.raises(DataError, match="'identities' is not sorted or names an identity "
                                            "twice"):
            data.load_manifest(shards)


def test_shard_paths_that_cannot_be_resolved_are_one_error(shards, tmp_path):
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "train" / "loop.tar").symlink_to("loop.tar")
    manifest["splits"]["train"]["shards"][0]["path"] = "train/loop.tar"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="'train/loop.tar' cannot be resolved"):
        data.load_manifest(shards)
    with pytest.raises(DataError, match="unreadable") as error:
        data.load_manifest(tmp_path / ("x" * 300))
    assert "\n" not in str(error.value)


def test_a_data_path_that_is_another_file_is_named_as_such(shards, tmp_path, capsys):
    """``--data notes.txt`` is not "an unreadable manifest": it is not a dataset at all."""
    notes = tmp_path / "notes.txt"
    for text in ("some notes\n", "[1, 2]", b"\xff\xfe"):
        notes.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(DataError) as error:
            data.load_manifest(notes)
        assert str(error.value) == (f"{notes}: is a file, not a prepared dataset folder "
                                    "(prepare's --out, with manifest.json)")
    code = main(["serve", "--gallery", str(notes), "--model", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith(f"{notes}: is a file, not a prepared dataset folder "
                                      "(prepare's --out, with manifest.json)"), err
    # the manifest itself, damaged, is still a damaged manifest
    (shards / "manifest.json").write_text("some notes")
    with pytest.raises(DataError, match="manifest.json: unreadable manifest"):
        data.load_manifest(shards / "manifest.json")
    (shards / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="manifest.json: malformed manifest"):
        data.load_manifest(shards)


@pytest.mark.parametrize(("call", "expected"), [
    (lambda root: data.make_loader(root, "train", rank=1), "rank and world_size go together"),
    (lambda root: data.make_loader(root, "train", world_size=2), "rank and world_size go"),
    (lambda root: data.make_loader(root, "train", num_workers=1.5), "num_workers must"),
    (lambda root: data.make_loader(root, "train", num_workers=None), "num_workers must"),
    (lambda root: data.make_loader(root, "train", num_workers="2"), "num_workers must"),
    (lambda root: data.make_loader(root, "train", num_workers=-1), "num_workers must"),
    (lambda root: data.make_loader(root, ["train"]), "split must be a name"),
    (lambda root: data.make_loader(root, "train", window_seconds=1e-5), "window_seconds must"),
    (lambda root: data.make_loader(root, "train", seconds=1e-6), "seconds must"),
    (lambda root: data.make_loader(root, "train", seconds=0.01, spectrogram=True),
     "seconds must be at least 0.025"),
    (lambda root: data.make_loader(root, "train", window_seconds=0.01, spectrogram=True),
     "window_seconds must be at least 0.025"),
])
def test_reading_arguments_are_named(shards, call, expected):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        call(shards)


def test_a_path_that_is_not_a_path_is_named():
    with pytest.raises(DataError, match="a shard folder or manifest path is a str or "
                                        "os.PathLike, not NoneType"):
        data.make_loader(None, "train")


def test_a_workers_data_error_comes_out_as_data_error(tmp_path):
    root = _one_sample_split(tmp_path, **{"face.jpg": b"\xff\xd8garbage"})
    with pytest.raises(DataError, match="id00000/v00/00000") as error:
        list(data.make_loader(root, "train", batch_size=1, num_workers=1, seconds=0.01))
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


@pytest.mark.parametrize(("call", "name"), [
    (lambda root: data.make_loader(root, "train", batch_size=0), "batch_size"),
    (lambda root: data.make_loader(root, "train", batch_size=-3), "batch_size"),
    (lambda root: data.make_loader(root, "train", seconds=-1), "seconds"),
    (lambda root: data.make_loader(root, "train", seconds=0), "seconds"),
    (lambda root: data.load_split(root, "train", max_samples=-1), "max_samples"),
    (lambda root: data.make_loader(root, "train", rank=0, world_size=0), "world_size"),
    (lambda root: data.make_loader(root, "train", rank=5, world_size=2), "rank"),
])
def test_reading_arguments_are_checked(shards, call, name):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{name} must"):
        call(shards)


@pytest.mark.parametrize(("change", "expected"), [
    ({"feature_dim": None}, "feature_dim"),
    ({"feature_dim": 10**7}, "feature_dim"),
    ({"feature_dim": "128"}, "feature_dim"),
    ({"mean_landmarks": [[1.0, "x"]] * 68}, "mean_landmarks"),
    ({"mean_landmarks": [[1.0, 2.0]] * 3}, "mean_landmarks"),
    ({"crops_per_sample": "2"}, "crops_per_sample"),
    ({"seconds": 0}, "seconds"),
    ({"seconds": float("nan")}, "seconds"),
    ({"seconds": 1e9}, "seconds"),
    ({"seconds": "6"}, "seconds"),
    # each loaded without complaint before
    ({"dataset": "imagenet"}, "dataset"),
    ({"samples_per_shard": 0}, "samples_per_shard"),
    ({"num_parts": 0}, "num_parts"),
    ({"counts": {"clips": -1}}, "counts"),
    ({"skipped_by_reason": []}, "skipped_by_reason"),
    ({"skipped": "x"}, "skipped"),
    ({"skipped": [{"item": "a"}]}, "skipped"),
    ({"identity_merging": 5}, "identity_merging"),
])
def test_manifest_fields_are_checked(shards, change, expected):
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(DataError, match=f"malformed manifest: '{expected}'"):
        data.load_manifest(shards)


def test_manifest_without_feature_dim_is_refused(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["feature_dim"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="'feature_dim'"):
        data.load_manifest(shards)


def test_manifest_nul_byte_and_unknown_split_identity_are_refused(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["identities"] = ["ghost"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="identities that are not in 'identities'"):
        data.load_manifest(shards)
    # an identity without a sample: a class the classifier would have and never see
    samples = manifest["splits"]["train"]["samples"]
    manifest["identities"] = sorted(manifest["identities"] + [f"~{i}" for i in range(samples)])
    manifest["splits"]["train"]["identities"] = manifest["identities"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"lists {len(manifest['identities'])} identities for "
                                        f"{samples} samples"):
        data.load_manifest(shards)
    manifest["splits"]["train"]["identities"] = []
    manifest["splits"]["train"]["shards"][0]["path"] = "train/a\0b.tar"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="NUL byte"):
        data.load_manifest(shards)


def test_idle_loader_workers_are_said_once(shards, capfd):
    """More loader workers than shards: one warning from the command's process, not one
    from every idle worker at every epoch (10 lines on the default preset)."""
    import warnings

    count = len(data.load_manifest(shards)["splits"]["train"]["shards"])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for epoch in range(2):
            loader = data.make_loader(shards, "train", batch_size=2, num_workers=count + 2,
                                      epoch=epoch)
            assert sum(len(b["meta"]) for b in loader) > 0
    assert sum("have nothing to read" in str(w.message) for w in said) == 1
    err = capfd.readouterr().err  # the workers' own
    assert "has no shard" not in err and "Warning" not in err, err


def test_repeat_with_a_reader_without_a_shard_is_refused_not_a_hang(shards):
    """repeat=True, the DDP setting docs/data.md gives, with more readers than shards: the
    idle reader rebuilt an empty pipeline forever (a busy loop, its rank waiting)."""
    from speech2face.data.loader import ShardDataset
    from speech2face.errors import ConfigError

    count = len(data.load_manifest(shards)["splits"]["train"]["shards"])
    with pytest.raises(ConfigError, match=f"train: {count} shard\\(s\\) for {count + 1} readers "
                                          f"\\({count + 1} processes x 1 loader worker\\): "
                                          "with repeat=True a reader without a shard never"):
        data.make_loader(shards, "train", batch_size=2, repeat=True, rank=0,
                         world_size=count + 1)
    with pytest.warns(UserWarning, match="has no shard to read"):
        idle = ShardDataset(shards, "train", batch_size=2, repeat=True, rank=count,
                            world_size=count + 1)
        assert list(idle.samples()) == []  # ends (the spin was here)
    busy = ShardDataset(shards, "train", batch_size=2, repeat=True, rank=0, world_size=count)
    first = [s["meta"]["key"] for s in itertools.islice(busy.samples(), 10)]
    assert len(first) == 10  # a reader with a shard repeats it as before


def _npy(array: np.ndarray, version=None) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(128, dtype=np.float32), np.arange(136, dtype=np.float32).reshape(68, 2),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array(2.5), np.zeros(0, np.float32),
    np.arange(24, dtype=">i8").reshape(2, 3, 4), np.array([True, False]),
    np.array(["ab", "c"]), np.zeros(2, dtype=[("x", "<f4"), ("y", "<i2")]),
], ids=["1d", "2d", "fortran", "0d", "empty", "big-endian-3d", "bool", "unicode", "structured"])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_members_load_as_numpy_loads_them_without_ast(array, version, monkeypatch):
    """numpy's own loader is the reference; the headers numpy writes for plain arrays are
    read without ``ast`` (CPython 3.11.7 can fail ``ast.literal_eval`` at random in a
    loader worker), other headers (structured dtypes) by numpy."""
    import ast
    import io

    from speech2face.data.loader import _load_npy

    data = _npy(array, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.names is None:  # numpy would parse it with ast: it must not be needed
        monkeypatch.setattr(ast, "literal_eval", lambda *_: pytest.fail("ast used"))
    loaded = _load_npy(data)
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    np.testing.assert_array_equal(loaded, expected)
    assert loaded.flags.writeable


def test_an_object_npy_member_is_refused_without_unpickling():
    import io

    from speech2face.data.loader import _load_npy

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    with pytest.raises(ValueError, match=r"claims \(1,\) object"):
        _load_npy(header.getvalue() + b"\x80\x04N.")  # a pickle of None


def test_an_aborted_shard_is_removed_even_when_its_close_fails(tmp_path, monkeypatch):
    """A full disk fails the unfinished shard's close too; its ``.partial`` file must still
    go (it was left behind, taking room on the disk that was full)."""
    from speech2face.data.prepare import _SplitWriter

    writer = _SplitWriter(tmp_path, "train", "", 0, 8, lambda entry: None)
    writer.write({"key": "id00000/v00/00000", "files": tiny_files("id00000/v00/00000")})
    (partial,) = [Path(name) for name in writer._files]
    assert partial.exists()
    for file in writer._files.values():
        real_close = file.f.close

        def close(real_close=real_close):
            real_close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(file.f, "close", close)
    writer.abort()
    assert not partial.exists(), sorted(tmp_path.rglob("*"))
