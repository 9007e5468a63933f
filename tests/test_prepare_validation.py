"""What prepare reads back from its own files is validated before it is used.

Part manifests and progress files that are damaged or edited, parts of other inputs or
of another ``--num-shards``, a run without samples, bad encoder weights: each is refused
in one line naming the file or option, and nothing is written that is then refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import claim_held, killed_in_video

from speech2face import data
from speech2face.cli import main
from speech2face.demo_data import make_demo_data
from speech2face.errors import DataError, WeightsError

PART = "parts/manifest-00000-of-00001.json"
PROGRESS = "parts/progress-00000-of-00001.json"
OPTIONS = {"samples_per_shard": 2, "mix_clips": 3, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation") / "corpus"
    make_demo_data(root, speakers=3, seed=7, videos=(1, 1), clips=(3, 3), frames=1,
                   progress=False)
    return root


def prepare(corpus: Path, out: Path, **options) -> dict:
    return data.prepare("voxceleb1", corpus, out, **{**OPTIONS, **options})


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "shards"
    prepare(corpus, out)
    return out


@pytest.fixture(scope="module")
def interrupted(corpus, tmp_path_factory) -> Path:
    """A run killed in its third video (windows of one video): a progress file and shards."""
    out = tmp_path_factory.mktemp("interrupted") / "shards"
    with killed_in_video(3), pytest.raises(KeyboardInterrupt):
        prepare(corpus, out)
    assert (out / PROGRESS).is_file()
    return out


def copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(folder, out)
    return out


def edit(path: Path, change) -> None:
    """Rewrite a JSON file with ``change(content)``: its return value when not None (a
    string: the file's text), else the content it changed."""
    content = json.loads(path.read_text())
    changed = change(content)
    if changed is None:
        changed = content
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))


def one_line(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    lines = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if x.strip() and not re.search(r"\|\s*\d+/\d+ \[", x)]
    assert len(lines) <= 1, lines
    return code, "".join(lines)


def first_shard(record: dict) -> dict:
    return record["splits"]["train"]["shards"][0]


# -------------------------------------------------------------------- part manifests

PART_DAMAGE = {
    "invalid JSON": lambda m: '{"run": ',
    "a list": lambda m: [1, 2],
    "empty": lambda m: {},
    "samples a string": lambda m: m["splits"]["train"].update(samples="many"),
    "samples not its shards'": lambda m: m["splits"]["train"].update(samples=1),
    "shard path outside": lambda m: first_shard(m).update(path="../../../etc/passwd"),
    "shard missing": lambda m: first_shard(m).update(path="train/nothing.tar"),
    "skipped triples": lambda m: m.update(skipped=[["a", "b", "c"]]),
    "counts a list": lambda m: m.update(counts=[1]),
    "landmarks of another shape": lambda m: m.update(landmarks_sum=[[0, 0]]),
    "other part": lambda m: m.update(part="00001-of-00002"),
    # the same shard twice (another dropped): 38 samples of which 28 were unique
    "a shard listed twice": lambda m: m["splits"]["train"]["shards"].__setitem__(
        1, dict(first_shard(m))) if len(m["splits"]["train"]["shards"]) > 1 else
        m["splits"]["train"]["shards"].append(dict(first_shard(m))),
    "identity merging a string": lambda m: m["run"].update(identity_merging="x"),
    "identity merging without counts": lambda m: m["run"].update(identity_merging={"videos": 1}),
    "another dataset than its run's": lambda m: m.update(dataset="voxceleb2"),
    "sha256 not hex": lambda m: first_shard(m).update(sha256="z" * 64),
    # what the merge held the part to before only in the loader (exit 0, then refused)
    "shard of another size": lambda m: first_shard(m).update(size=first_shard(m)["size"] + 512),
    "features of another size": lambda m: m.update(feature_dim=7),
    "landmarks of 1e308": lambda m: m.update(landmarks_sum=[[1e308, 1e308]] * 68),
}


@pytest.mark.parametrize("damage", PART_DAMAGE.values(), ids=PART_DAMAGE.keys())
def test_a_damaged_part_manifest_is_refused_before_merging(finished, tmp_path, capsys, damage):
    out = copy(finished, tmp_path)
    (out / "manifest.json").unlink()
    part = out / PART
    edit(part, damage)
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and str(part) in err, err
    assert not (out / "manifest.json").exists()


def test_a_rerun_over_a_damaged_part_manifest_names_it(corpus, finished, tmp_path):
    out = copy(finished, tmp_path)
    (out / PART).write_text("[1, 2]")
    with pytest.raises(DataError, match="manifest-00000-of-00001.json: malformed part manifest"):
        prepare(corpus, out)


def test_an_odd_part_file_name_is_refused(finished, tmp_path, capsys):
    out = copy(finished, tmp_path)
    (out / "manifest.json").unlink()
    (out / PART).rename(out / "parts" / "manifest-00000-of-0000x.json")
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and "manifest-00000-of-0000x.json: not a part file" in err, err
    assert not (out / "manifest.json").exists()


# -------------------------------------------------------------------- progress files

def state(change):
    return lambda saved: change(saved["state"])


PROGRESS_DAMAGE = {
    "a list": lambda s: [1],
    "null": lambda s: "null",
    "state a string": lambda s: s.update(state="x"),
    "next_window a string": state(lambda s: s.update(next_window="1")),
    "next_window -1": state(lambda s: s.update(next_window=-1)),
    "next_window 999": state(lambda s: s.update(next_window=999)),
    "next_window ahead of its shards": state(lambda s: s.update(next_window=5)),
    "samples_done 999": state(lambda s: s.update(samples_done=999)),
    "samples_done -3": state(lambda s: s.update(samples_done=-3)),
    "samples_done true": state(lambda s: s.update(samples_done=True)),
    "splits a list": state(lambda s: s.update(splits=[])),
    "counts a list": state(lambda s: s.update(counts=[1])),
    "a count beyond JSON": state(lambda s: s.update(counts={"clips": 10**40})),
    "landmarks of another shape": state(lambda s: s.update(landmarks_sum=[[0, 0]])),
    "landmarks_count off": state(lambda s: s.update(landmarks_count=99)),
    "skipped triples": state(lambda s: s.update(skipped=[["a", "b", "c"]])),
    "shard path outside": state(lambda s: first_shard(s).update(path="../../../etc/passwd")),
    "shard of another size": state(lambda s: first_shard(s).update(size=1)),
    # the resumed part's manifest would have said them; the loader refused it (exit 0)
    "shard of another digest": state(lambda s: first_shard(s).update(sha256="0" * 64)),
    "features of another size": state(lambda s: s.update(feature_dim=7)),
    "identities missing": state(lambda s: s["splits"]["train"].pop("identities")),
    "a shard listed twice": state(lambda s: s["splits"]["train"]["shards"].append(
        dict(first_shard(s)))),
}


@pytest.mark.parametrize("damage", PROGRESS_DAMAGE.values(), ids=PROGRESS_DAMAGE.keys())
def test_a_damaged_progress_file_is_refused(corpus, interrupted, tmp_path, damage):
    out = copy(interrupted, tmp_path)
    edit(out / PROGRESS, damage)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=re.escape(str(out / PROGRESS))):
        prepare(corpus, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_intact_progress_file_resumes_to_the_uninterrupted_shards(corpus, interrupted,
                                                                     finished, tmp_path):
    out = copy(interrupted, tmp_path)
    prepare(corpus, out)
    shards = {str(p.relative_to(out)): p.read_bytes() for p in out.glob("*/*.tar")}
    assert shards == {str(p.relative_to(finished)): p.read_bytes()
                      for p in finished.glob("*/*.tar")}


# ------------------------------------------------------------------------- merging


def test_parts_of_other_inputs_are_not_merged(corpus, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    clip = sorted(other.glob("wav/*/*/*.wav"))[0]
    clip.rename(clip.with_name("00099.wav"))  # one clip renamed: another listing
    out = tmp_path / "shards"
    prepare(corpus, out, shard_index=0, num_shards=2)
    # refused before part 1 does any work (it used to, and then failed to merge)
    with pytest.raises(DataError, match="manifest-00000-of-00002.json: another part of this "
                                        "--out was prepared with other inputs"):
        prepare(other, out, shard_index=1, num_shards=2)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*00001-of-00002*")) and not list(out.glob("*/*-p00001-*"))
    # the same inputs at another path (another machine's mount): the parts merge
    moved, out = tmp_path / "moved", tmp_path / "merged"
    shutil.copytree(corpus, moved)
    prepare(corpus, out, shard_index=0, num_shards=2)
    prepare(moved, out, shard_index=1, num_shards=2)
    assert data.load_manifest(out)["num_parts"] == 2


def test_one_out_holds_parts_of_one_count(corpus, finished, tmp_path, capsys):
    out = copy(finished, tmp_path)
    with pytest.raises(DataError, match="--num-shards 1"):
        prepare(corpus, out, shard_index=1, num_shards=2)
    assert not list(out.glob("*/*-p0000*"))
    # Parts of two counts (left by hand): --merge needs --num-shards, and uses it.
    two = tmp_path / "two"
    for i in range(2):
        prepare(corpus, two, shard_index=i, num_shards=2)
    shutil.copy(out / PART, two / PART)
    (two / "manifest.json").unlink()
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(two))
    assert code == 2 and "--num-shards [1, 2]" in err, err
    assert not (two / "manifest.json").exists()
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(two), "--num-shards", "3")
    assert code == 2 and "no part of a run with --num-shards 3" in err, err
    assert "--num-shards 1, 2" in err and not (two / "manifest.json").exists()
    # --merge only merges: options of a prepare run would be ignored, so they are refused
    for extra in (["voxceleb1", "--root", str(corpus)], ["--seed", "3"], ["--workers", "2"]):
        code, err = one_line(capsys, "prepare", "--merge", "-o", str(two), *extra)
        assert code == 2 and "--merge: only merges" in err, err
    assert "drop the dataset, --root" in one_line(
        capsys, "prepare", "voxceleb1", "--root", str(corpus), "--merge", "-o", str(two))[1]
    assert not (two / "manifest.json").exists()
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(two), "--num-shards", "2")
    assert code == 0, err
    assert data.load_manifest(two)["num_parts"] == 2


# Every option of a prepare run, at its default value: given with --merge, it is refused
# all the same (each part ran with its own, which the merge would silently ignore).
RUN_OPTIONS = [["voxceleb1"], ["--root", "."], ["--workers", "1"], ["--shard-index", "0"],
               ["--encoder", "dlib"], ["--encoder-weights", "w.pth"], ["--detector", "hog"],
               ["--samples-per-shard", "1000"], ["--frames-per-video", "4"],
               ["--crops-per-sample", "1"], ["--identity-threshold", "0.6"],
               ["--identity-linkage", "average"], ["--seed", "0"], ["--mix-clips", "1000"],
               ["--descriptors-only"]]


@pytest.mark.parametrize("option", RUN_OPTIONS, ids=lambda o: o[0])
def test_merge_refuses_any_run_option_given_whatever_its_value(tmp_path, capsys, option):
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(tmp_path / "out"), *option)
    name = "the dataset" if option[0] == "voxceleb1" else option[0]
    assert code == 2 and err.endswith(f"--merge: only merges the finished parts in --out (with "
                                      f"--num-shards); drop {name}"), err
    assert not (tmp_path / "out").exists()


def test_merge_names_the_parts_not_finished(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and err.endswith(f"{out}: no part manifests to merge, and no part has "
                                      "started here (run prepare first)"), err
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out), "--num-shards", "4")
    assert code == 2 and err.endswith(f"{out / 'parts'}: parts 0-3 of 4 are not complete yet "
                                      "(no manifest-IIIII-of-00004.json)"), err
    # Parts running (or killed) before their first progress file: their lock files say how
    # many there are.
    with claim_held(out, 3, "prepare"):
        code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and err.endswith("parts 0-2 of 3 are not complete yet "
                                      "(no manifest-IIIII-of-00003.json)"), err
    prepare(corpus, out, shard_index=1, num_shards=3)
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and err.endswith("parts 0, 2 of 3 are not complete yet "
                                      "(no manifest-IIIII-of-00003.json)"), err
    prepare(corpus, out, shard_index=0, num_shards=3)
    code, err = one_line(capsys, "prepare", "--merge", "-o", str(out))
    assert code == 2 and err.endswith(f"{out / 'parts' / 'manifest-00002-of-00003.json'}: "
                                      "part 2 of 3 is not complete yet (or it ended with "
                                      "no samples: its run said so)"), err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("extra", [[], ["--num-shards", "2", "--shard-index", "1"]])
def test_an_out_that_is_a_file_is_named_as_such(corpus, tmp_path, capsys, extra):
    (tmp_path / "out").write_text("notes\n")
    code, err = one_line(capsys, "prepare", "voxceleb1", "--root", str(corpus),
                         "--out", str(tmp_path / "out"), *extra)
    assert code == 2 and err.endswith(f"{tmp_path / 'out'}: is a file; the output is a "
                                      "folder"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out").read_text() == "notes\n"


# --------------------------------------------------------------- nothing half-written


def test_no_samples_writes_no_manifest(corpus, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "faceless"
    shutil.copytree(corpus, root)
    for frame in root.glob("unzippedFaces/*/*/*/*.jpg"):
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(frame)
    out = tmp_path / "out"
    argv = ["prepare", "voxceleb1", "--root", str(root), "--out", str(out)]
    for _ in range(2):  # the rerun is refused for the same reason, not blocked
        code, err = one_line(capsys, *argv)
        assert code == 2 and "no samples" in err and "no face found" in err, err
        assert not (out / "manifest.json").exists() and not (out / PART).exists()
        assert not (out / PROGRESS).exists()
        assert not out.exists()  # no empty parts/ or split folders, no lock left behind


def test_an_unknown_detector_or_a_file_as_out_is_refused_before_out_is_made(corpus, tmp_path):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown face detector 'foo'"):
        prepare(corpus, tmp_path / "out", detector="foo")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(DataError, match="file: is a file; the output is a folder"):
        prepare(corpus, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_encoder_weights_for_an_encoder_without_weights_are_refused(corpus, tmp_path, capsys):
    """dlib's encoder takes no weights file: the option was silently ignored."""
    (tmp_path / "vgg.pth").write_bytes(b"weights")
    out = tmp_path / "out"
    code, err = one_line(capsys, "prepare", "voxceleb1", "--root", str(corpus), "-o",
                         str(out), "--encoder-weights", str(tmp_path / "vgg.pth"))
    assert code == 2 and err.endswith("error: --encoder-weights: is for --encoder vggface; the "
                                      "dlib encoder takes no weights file"), err
    assert not out.exists()


@pytest.mark.parametrize("weights", ["missing.pth", "junk.pth"])
def test_bad_encoder_weights_are_refused_before_out_is_made(corpus, tmp_path, weights):
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=re.escape(weights)):
        prepare(corpus, out, encoder="vggface", encoder_weights=tmp_path / weights)
    assert not out.exists()


def _rewrite_in_place(path: Path) -> None:
    """The same name and size, other content (samples reversed), a later time."""
    import soundfile as sf

    wave, rate = sf.read(path, dtype="int16")
    info = sf.info(path)
    sf.write(path, wave[::-1].copy(), rate, subtype=info.subtype, format=info.format)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_inputs_changed_in_place_are_refused(corpus, tmp_path, state):
    """Every clip rewritten with the same name and size: a rerun (finishing or
    continuing) refuses the folder instead of mixing old and new samples."""
    root, out = tmp_path / "corpus", tmp_path / "shards"
    shutil.copytree(corpus, root)
    if state == "finished":
        prepare(root, out)
    else:
        with killed_in_video(3), pytest.raises(KeyboardInterrupt):
            prepare(root, out)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    wavs = sorted(root.rglob("*.wav"))
    assert wavs
    for wav in wavs:
        size = wav.stat().st_size
        _rewrite_in_place(wav)
        assert wav.stat().st_size == size
    with pytest.raises(DataError, match="other arguments or inputs"):
        prepare(root, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_the_listing_fingerprint_sees_every_field_and_not_the_mount_point():
    from dataclasses import replace

    from speech2face.data.datasets import Clip, Frame, Unit
    from speech2face.data.parts import listing_fingerprint

    def listing(root: str) -> list[Unit]:
        return [Unit("id1", "v1", "train", "m", (Clip("00001", f"{root}/wav/id1/v1/1.wav"),),
                     (Frame(f"{root}/faces/id1/v1/1.jpg", None),))]

    here, there = listing("/data/vox1"), listing("/mnt/o'brien/vox1")
    assert listing_fingerprint(here, "/data/vox1") == listing_fingerprint(there,
                                                                          "/mnt/o'brien/vox1")
    assert listing_fingerprint(here) != listing_fingerprint(there)  # without root: paths count
    base = listing_fingerprint(here, "/data/vox1")
    unit = here[0]
    for changed in (replace(unit, split="test"), replace(unit, gender="f"),
                    replace(unit, clips=(replace(unit.clips[0], end=3.0),)),
                    replace(unit, frames=(replace(unit.frames[0], time=1.0),)),
                    replace(unit, skip="no frames")):
        assert listing_fingerprint([changed], "/data/vox1") != base


def test_the_corpus_is_one_however_its_path_is_spelled(corpus, finished, tmp_path,
                                                       monkeypatch):
    """A rerun with --root "corpus/" or its absolute path is the same run (a no-op), not
    "other arguments or inputs"; an --out inside --root is refused (the listing would
    take in the shards)."""
    out = copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.chdir(corpus.parent)
    for spelling in (f"{corpus.name}/", str(corpus.resolve()), f"./{corpus.name}"):
        prepare(Path(spelling), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="is inside --root"):
        prepare(corpus, corpus / "wav" / "shards")
    assert not (corpus / "wav" / "shards").exists()


@pytest.mark.parametrize("option, value", [
    ("--identity-threshold", "inf"), ("--identity-threshold", "5"), ("--workers", "100000"),
    ("--crops-per-sample", "1000000"), ("--frames-per-video", "1000"),
])
def test_counts_and_thresholds_are_bounded(corpus, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as usage:
        main(["prepare", "voxceleb1", "--root", str(corpus), "--out", str(tmp_path / "o"),
              option, value])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and option in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_runs_of_another_shard_count_beside_an_array_are_refused(corpus, tmp_path, capsys):
    """While a job of a 2-part array writes --out, an unsharded run or a 3-part job would
    leave parts of two counts in one folder (neither then merges): refused in one line,
    nothing written; once the job has ended, the unsharded run goes."""
    out = tmp_path / "shards"
    base = ["prepare", "voxceleb1", "--root", str(corpus), "--out", str(out),
            "--samples-per-shard", "2", "--mix-clips", "3"]
    with claim_held(out, 2, "prepare"):  # job 1 of 2, still running
        for sharding in ([], ["--num-shards", "3", "--shard-index", "0"]):
            code, err = one_line(capsys, *base, *sharding)
            assert code == 2 and "another prepare into it splits the work into 2" in err, err
        assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert main(base) == 0  # the killed job's claim file stays, held by nobody: no matter
    assert not (out / ".speech2face.shards-00001.lock").exists()  # its last holder took it


@pytest.mark.parametrize("change, words", [
    # an unbalanced quote swallowed the rest of the file into one field (7 of 8 speakers
    # then "had no metadata row"); in a large file it was a csv.Error traceback
    (lambda rows: rows[:2] + ['"' + rows[2]] + rows[3:], "runs over several lines"),
    (lambda rows: rows + ["\t".join(f if i != 2 else {"m": "f"}.get(f, "m")
                                    for i, f in enumerate(rows[1].split("\t")))],
     "has two rows that differ"),  # the last one won: the speaker changed gender
])
def test_metadata_tables_are_read_strictly(corpus, tmp_path, change, words):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    rows = (root / "vox1_meta.csv").read_text().splitlines()
    (root / "vox1_meta.csv").write_text("\n".join(change(rows)) + "\n")
    with pytest.raises(DataError, match=words) as error:
        data.list_units("voxceleb1", root)
    assert "vox1_meta.csv" in str(error.value)


def test_a_split_file_giving_one_identity_two_splits_is_refused(corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    identity = data.list_units("voxceleb1", root)[0].identity
    (root / "identity_split.csv").write_text(
        f"identity,split\n{identity},train\n{identity},test\n")
    with pytest.raises(DataError, match=f"{identity} is given two splits"):
        data.list_units("voxceleb1", root)


@pytest.mark.parametrize("name", ["manifest.json", "parts/progress-00000-of-00001.json"])
def test_a_folder_where_prepare_writes_a_file_is_named(corpus, tmp_path, name):
    out = tmp_path / "shards"
    (out / name).mkdir(parents=True)
    (out / "parts").mkdir(exist_ok=True)
    with pytest.raises(DataError, match="is in the way") as error:
        prepare(corpus, out)
    assert str(error.value).startswith(str(out / name))


def test_an_avspeech_csv_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "avspeech_train.csv").mkdir()
    (tmp_path / "avspeech_test.csv").write_text("AbCdEfGhIjK,1.0,4.0,0.5,0.5\n")
    with pytest.raises(DataError, match="avspeech_train.csv: is not a file"):
        data.list_units("avspeech", tmp_path)


def test_an_identity_missing_from_the_split_file_is_named_so(corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    lines = (root / "identity_split.csv").read_text().splitlines()
    left_out = lines[1].split(",")[0]
    (root / "identity_split.csv").write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    reasons = {u.skip for u in data.list_units("voxceleb1", root) if u.identity == left_out}
    assert reasons == {f"{left_out} is not in identity_split.csv"}  # was "no metadata row"


def test_avspeech_csvs_without_rows_are_said_so(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"avspeech_{split}.csv").write_text("\n")
    with pytest.raises(DataError, match="hold no rows"):
        data.list_units("avspeech", tmp_path)
