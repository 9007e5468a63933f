"""The end-to-end demo in a reduced size: every stage runs and the report is complete."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speech2face.cli import main


def _finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _finite_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_small_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from speech2face import demo
    from speech2face.inference import default_model_path, reconstruct

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    settings = dict(speakers=8, decoder_steps=2, voice_steps=3, reconstructions=2,
                    corpus_options={"videos": (1, 1), "clips": (2, 2), "frames": 1},
                    train_overrides={"batch_size": 4, "checkpoint_every": 1, "keep_last": 3},
                    progress=False)
    result = demo.run_demo(out, **settings)
    report = out / "report"
    assert result.report == report
    for name in ("report.md", "metrics.json", "grid.png", "recall.png", "craniofacial.png",
                 "features.png", "attributes.png", "held_out.png"):
        assert (report / name).is_file(), name
    with Image.open(report / "grid.png") as grid:
        assert grid.size[0] > 300 and grid.size[1] > 200
    faces = sorted((report / "reconstructions").glob("*.png"))
    assert len(faces) == 2
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["samples"] == result.metrics["samples"]
    assert metrics["identities"] >= 2 and metrics["samples"] >= 2
    fs = metrics["feature_similarity"]
    assert all(math.isfinite(fs[k]["mean"]) for k in ("angle_deg", "l2", "l1"))
    recall = metrics["retrieval"]["cosine"]
    assert all(0 <= recall[k]["mean"] <= 100 for k in recall)
    # metrics.json is strict JSON: no NaN/Infinity tokens, only numbers or null.
    assert all(math.isfinite(v) for v in _finite_numbers(metrics))
    text = (report / "report.md").read_text()
    assert "generated data" in text and "recall" in text.lower()
    # The bundle was installed where `reconstruct` looks without --model.
    assert (default_model_path() / "config.json").is_file()
    clip = sorted((out / "corpus" / "wav").rglob("*.wav"))[0]
    face = reconstruct(clip)
    assert face.shape == (224, 224, 3) and face.dtype == np.uint8
    assert "report:" in capsys.readouterr().out
    _check_evaluation_resumes(out, tmp_path, monkeypatch)
    # A model handed to evaluate is borrowed: its mode and device as they were after.
    from speech2face import evaluate as ev
    from speech2face.errors import ConfigError
    from speech2face.model import load_model

    model = load_model(out / "runs" / "voice" / "model").train()
    ev.evaluate(model, out / "shards", tmp_path / "borrowed", attributes=False,
                recognizer=None, draws=2, progress=False)
    assert model.training and {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ConfigError, match="device: meta: only cpu, cuda and mps"):
        ev.evaluate(model, out / "shards", tmp_path / "meta", device="meta", progress=False)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for bad in ({"seed": -1}, {"max_samples": 3.5}, {"gallery_size": 2.5},
                {"identity_gallery_sizes": [0]}, {"grid_rows": -1}):
        with pytest.raises(ConfigError):
            ev.evaluate(model, out / "shards", tmp_path / "bad", progress=False, **bad)
    assert not (tmp_path / "bad").exists()
    # A gallery larger than the split has identities: the smaller size used, said once.
    from speech2face.cli import main

    assert main(["evaluate", "--model", str(out / "runs" / "voice" / "model"), "--data",
                 str(out / "shards"), "-o", str(tmp_path / "big"), "--gallery-size", "1000",
                 "--no-attributes", "--recognizer", "none"]) == 0
    said = capsys.readouterr()
    identities = json.loads((tmp_path / "big" / "metrics.json").read_text())["identities"]
    assert f"--gallery-size 1000: the test split has {identities} identities, so its " \
           f"galleries hold {identities}" in said.err
    # Not given: no note (it came with every evaluation, the demo's too); with
    # --max-samples it is about the samples evaluated, not the whole split.
    assert main(["evaluate", "--model", str(out / "runs" / "voice" / "model"), "--data",
                 str(out / "shards"), "-o", str(tmp_path / "plain"), "--no-attributes",
                 "--recognizer", "none"]) == 0
    assert "--gallery-size" not in capsys.readouterr().err
    assert main(["evaluate", "--model", str(out / "runs" / "voice" / "model"), "--data",
                 str(out / "shards"), "-o", str(tmp_path / "few"), "--no-attributes",
                 "--recognizer", "none", "--max-samples", "3", "--gallery-size", "50"]) == 0
    identities = json.loads((tmp_path / "few" / "metrics.json").read_text())["identities"]
    assert f"the test samples evaluated (--max-samples) hold {identities} identities" \
        in capsys.readouterr().err

    # Killed in the voice stage after its step-1 checkpoint: a rerun with the same
    # settings keeps the corpus, shards and decoder, resumes the voice encoder from step
    # 1, and ends where the uninterrupted run ended.
    voice = out / "runs" / "voice"
    shutil.rmtree(voice / "model")
    for step in (2, 3):
        shutil.rmtree(voice / "checkpoints" / f"step-{step:08d}")
    (out / ".corpus.x.tmp").mkdir()  # what a corpus killed while being written leaves
    kept = [*(out / "corpus").rglob("*.wav"),
            *(out / "runs" / "decoder" / "checkpoints").rglob("*.safetensors"),
            *(voice / "checkpoints" / "step-00000001").iterdir()]
    kept = {p: p.stat().st_mtime_ns for p in kept}  # none of these may be written again
    lines = []
    again = demo.run_demo(out, **settings, log=lines.append)
    assert any("resuming" in line for line in lines)
    assert any("already generated" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (voice / "checkpoints" / "step-00000003").is_dir()
    assert not (out / ".corpus.x.tmp").exists()
    assert again.metrics["retrieval"] == result.metrics["retrieval"]
    assert again.metrics["feature_similarity"] == result.metrics["feature_similarity"]

    # Other settings (or --fresh) clear the previous demo's outputs.
    before = demo._marker_settings(out / demo.DEMO_MARKER)
    assert demo._prepare_out(out, {**before, "speakers": 9}) == "speakers 8 -> 9"
    assert sorted(p.name for p in out.iterdir()) == [demo.DEMO_MARKER]


def _check_evaluation_resumes(demo_out, tmp_path, monkeypatch):
    """An evaluation killed after two batches continues from its saved state and ends
    with the same metrics as one that was never interrupted."""
    from speech2face import evaluate as ev

    model, shards = demo_out / "runs" / "voice" / "model", demo_out / "shards"
    settings = dict(batch_size=1, attributes=False, checkpoint_seconds=0, progress=False)
    reference = ev.evaluate(model, shards, tmp_path / "straight", **settings)
    calls = {"n": 0}
    original = ev._Collector.add

    def killed_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ev._Collector, "add", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, shards, tmp_path / "report", **settings)
    # nothing of a report yet: only the saved state, inside the report folder (which the
    # command holds locked), so that nothing beside it is in its way
    partial = tmp_path / "report" / ev.PARTIAL_DIR
    assert [p.name for p in (tmp_path / "report").iterdir()] == [ev.PARTIAL_DIR]
    assert json.loads((partial / "state.json").read_text())["batches"] == 2
    calls["n"] = -1000  # no more kills; count the batches the rerun computes
    resumed = ev.evaluate(model, shards, tmp_path / "report", **settings)
    assert calls["n"] == -1000 + reference["samples"] - 2  # only the batches not saved
    assert not partial.exists() and (tmp_path / "report" / "metrics.json").is_file()
    for key in ("feature_similarity", "retrieval", "craniofacial", "samples", "identities"):
        # compared as JSON: a constant measure's r is NaN in both
        assert json.dumps(resumed[key]) == json.dumps(reference[key]), key
    # Another model (or data, or settings) does not pick up a saved state.
    assert ev._Collector.load(partial, "other", False, 8) is None


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(out), "--no-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mine" in err
    assert (out / "thesis.tex").read_text() == "precious"


def _bad_marker(out: Path, kind: str) -> None:
    marker = out / ".speech2face-demo"
    if kind == "folder":
        marker.mkdir()
    elif kind == "link":  # to a valid marker: still not one the demo wrote here
        (out.parent / "valid").write_text(json.dumps({
            "written_by": "speech2face demo (may overwrite this folder)",
            "settings": {"speakers": 9, "seed": 0, "decoder_steps": 5, "voice_steps": 5,
                         "corpus_options": {}, "train_overrides": {}}}))
        marker.symlink_to(out.parent / "valid")
    elif kind == "fifo":
        import os

        os.mkfifo(marker)
    else:
        marker.write_bytes(kind.encode() if kind.startswith("{") else b"\xff\xfe")


@pytest.mark.parametrize("kind", [
    "not utf-8", "folder", "link", "fifo", '{"settings": "x"}', "{}", "[1]",
    '{"written_by": "speech2face demo (may overwrite this folder)", "settings": "x"}',
    '{"written_by": "speech2face demo (may overwrite this folder)", "settings": '
    '{"speakers": "8", "seed": 0, "decoder_steps": 5, "voice_steps": 5, '
    '"corpus_options": {}, "train_overrides": {}}}',
])
def test_demo_refuses_a_marker_it_did_not_write_and_deletes_nothing(tmp_path, capsys,
                                                                     monkeypatch, kind):
    """The marker was trusted unread or half read: one that was not JSON (or a folder)
    let the demo delete everything beside it; JSON of another shape gave a traceback."""
    from speech2face import demo_data

    def no_demo(*args, **kwargs):
        raise AssertionError("the demo went on")

    monkeypatch.setattr(demo_data, "make_demo_data", no_demo)
    out = tmp_path / "demo"
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "clip.wav").write_text("kept")
    (out / "important.txt").write_text("keep")
    _bad_marker(out, kind)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert main(["demo", "--out", str(out), "--speakers", "8", "--decoder-steps", "5",
                 "--voice-steps", "5", "--no-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{out / '.speech2face-demo'}: not a marker written by the demo" in err, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "important.txt").read_text() == "keep"


def test_demo_markers_it_wrote_resume_or_clear(tmp_path):
    """A marker the demo wrote: the same settings resume (nothing deleted), other ones
    and the first version's marker (no settings) clear the folder."""
    from speech2face import demo

    settings = {"speakers": 8, "seed": 0, "decoder_steps": 5, "voice_steps": 5,
                "corpus_options": {"videos": [1, 1]}, "train_overrides": {}}
    out = tmp_path / "demo"
    assert demo._prepare_out(out, settings) == "new"
    (out / "corpus").mkdir()
    assert demo._prepare_out(out, {**settings, "corpus_options": {"videos": (1, 1)}}) == "resume"
    assert (out / "corpus").is_dir()
    assert demo._prepare_out(out, {**settings, "seed": 1}) == "seed 0 -> 1"
    assert [p.name for p in out.iterdir()] == [demo.DEMO_MARKER]
    (out / demo.DEMO_MARKER).write_text(
        "written by `speech2face demo`; the demo may overwrite it\n")  # ca89754's marker
    (out / "corpus").mkdir()
    assert demo._prepare_out(out, settings) == "new"
    assert [p.name for p in out.iterdir()] == [demo.DEMO_MARKER]
    assert demo._marker_settings(out / demo.DEMO_MARKER) == settings


class _AfterPrepare(Exception):
    """Raised in place of the decoder's training: the demo got past its shards."""


def test_a_moved_demo_folder_resumes(tmp_path, monkeypatch):
    """prepare's part identity held the corpus's absolute paths: a demo folder moved
    (`mv`) stopped at its shards with prepare's "use a new --out". The demo's shards now
    move with it; prepare's own check still sees whole paths, and what the demo cannot
    resume it names in its own words (--fresh)."""
    from speech2face import data, demo, train
    from speech2face.errors import DataError

    def stop(*args, **kwargs):
        raise _AfterPrepare

    monkeypatch.setattr(train, "train_decoder", stop)
    settings = dict(speakers=8, corpus_options={"videos": (1, 1), "clips": (2, 2), "frames": 1},
                    install=False, progress=False)
    first = tmp_path / "demo"
    with pytest.raises(_AfterPrepare):
        demo.run_demo(first, **settings, log=lambda line: None)
    shards = {p.relative_to(first): p.read_bytes() for p in (first / "shards").rglob("*.tar")}
    moved = tmp_path / "moved"
    first.rename(moved)
    lines = []
    with pytest.raises(_AfterPrepare):
        demo.run_demo(moved, **settings, log=lines.append)
    assert any("resuming" in line for line in lines)
    assert {p.relative_to(moved): p.read_bytes()
            for p in (moved / "shards").rglob("*.tar")} == shards
    # prepare on its own: the same files at another path are other inputs, as before
    from speech2face.errors import OtherRunError

    with pytest.raises(OtherRunError, match="other arguments or inputs; use a new --out"):
        data.prepare("voxceleb1", moved / "corpus", moved / "shards", progress=False)
    # a part recorded before (whole paths, not moved) goes on under `movable`
    old = tmp_path / "old_shards"
    data.prepare("voxceleb1", moved / "corpus", old, progress=False)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    data.prepare("voxceleb1", moved / "corpus", old, progress=False, movable=True)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    # a copy that lost its files' times: the demo's own line, not prepare's
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy, copy_function=shutil.copyfile)
    with pytest.raises(DataError) as refused:
        demo.run_demo(copy, **settings, log=lambda line: None)
    message = str(refused.value)
    assert message.startswith(f"{copy}: ") and message.endswith("run again with --fresh")
    assert "\n" not in message and "use a new --out" not in message


@pytest.mark.parametrize("count", ["2", "100000"])
def test_demo_refuses_a_speaker_count_out_of_range(tmp_path, capsys, count):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--speakers", count, "--no-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--speakers" in err and count in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code; a usage error exits from argparse (SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--seed", str(2**63)),
                                           ("--decoder-steps", "0"), ("--voice-steps", "-3"),
                                           ("--decoder-steps", "99999999999")])
def test_demo_refuses_a_bad_seed_or_step_count_before_any_work(tmp_path, capsys, option, value):
    out = tmp_path / "demo"
    assert _exit_code(["demo", "--out", str(out), option, value, "--no-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and value in err
    assert list(tmp_path.iterdir()) == []


def test_every_seed_is_checked_where_it_is_given(tmp_path, capsys):
    """numpy refuses negative seeds and torch takes 64 bits: a bad seed is one line and
    exit 2 in every command that takes one, before anything is written; the Python API
    and the training settings refuse it too."""
    from speech2face import demo, demo_data
    from speech2face.config import TrainConfig
    from speech2face.errors import ConfigError, DataError

    for argv in (["make-demo-data", "-o", str(tmp_path / "c")],
                 ["prepare", "voxceleb1", "--root", str(tmp_path), "-o", str(tmp_path / "s")],
                 ["evaluate", "--model", "m", "--data", "d", "-o", str(tmp_path / "r")]):
        assert _exit_code([*argv, "--seed", "-7"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--seed" in err and "-7" in err, err
    for stage in ("train", "train-decoder"):
        argv = [stage, "--data", str(tmp_path), "-o", str(tmp_path / "run"), "seed=-7"]
        if stage == "train":
            argv += ["--decoder", str(tmp_path)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "seed" in err and "-7" in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="seed"):
        TrainConfig.tiny("voice", seed=-1)
    with pytest.raises(DataError, match="seed"):
        demo_data.make_demo_data(tmp_path / "c", seed=-1)
    with pytest.raises(DataError, match="seed"):
        demo.run_demo(tmp_path / "d", seed=2**63, install=False)
    assert list(tmp_path.iterdir()) == []
    assert TrainConfig.tiny("voice", seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("argv, option", [
    (["make-demo-data", "--workers", "0"], "--workers"),
    (["make-demo-data", "--frames", "0"], "--frames"),
    (["make-demo-data", "--speakers", "-2"], "--speakers"),
    (["make-demo-data", "--speakers", "99999999999"], "--speakers"),
    (["make-demo-data", "--frames", "99999999"], "--frames"),
    (["prepare", "avspeech", "--root", ".", "--identity-threshold", "-1"], "--identity-threshold"),
    (["prepare", "avspeech", "--root", ".", "--identity-threshold", "nan"], "--identity-threshold"),
    (["prepare", "voxceleb1", "--root", ".", "--workers", "0"], "--workers"),
    (["prepare", "voxceleb1", "--root", ".", "--num-shards", "0"], "--num-shards"),
    (["prepare", "voxceleb1", "--root", ".", "--shard-index", "-1"], "--shard-index"),
    (["prepare", "voxceleb1", "--root", ".", "--samples-per-shard", "0"], "--samples-per-shard"),
    (["prepare", "voxceleb1", "--root", ".", "--mix-clips", "x"], "--mix-clips"),
    (["download", "avspeech", "--csv", "a_train.csv", "--num-shards", "0"], "--num-shards"),
    (["download", "avspeech", "--csv", "a_train.csv", "--workers", "0"], "--workers"),
    (["download", "avspeech", "--csv", "a_train.csv", "--max-attempts", "0"], "--max-attempts"),
    (["evaluate", "--model", "m", "--data", "d", "--gallery-size", "1"], "--gallery-size"),
    (["evaluate", "--model", "m", "--data", "d", "--max-samples", "2"], "--max-samples"),
    (["evaluate", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--model", "m", "--data", "d", "--draws", "99999999999"], "--draws"),
])
def test_counts_and_thresholds_out_of_range_are_usage_errors(tmp_path, capsys, argv, option):
    out = ["--out" if argv[0] == "download" else "-o", str(tmp_path / "out")]
    assert _exit_code([*argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_read_only_folder(tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root writes through a folder's permissions; /proc it cannot
        parent = Path("/proc")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
    out = parent / "speech2face-demo"
    try:
        assert main(["demo", "--out", str(out), "--no-install"]) == 2
    finally:
        if parent != Path("/proc"):
            parent.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speech2face-demo" in err and "cannot" in err
    assert not out.exists()


def test_band_lines_name_the_gallery_and_show_the_band_only_for_default_settings():
    from speech2face import demo

    metrics = {"retrieval": {"gallery_size": 20, "cosine": {"1": {"mean": 18.3, "chance": 5.0}}},
               "attributes": {"gender": {"agreement": 46.5},
                              "gender_decoder_true_feature": {"agreement": 70.0}}}
    default = demo.band_lines(metrics)
    r1 = next(line for line in default if "R@1" in line)
    assert "M = 20" in r1 and "18.3%" in r1 and "chance 5.0%" in r1
    low, high = demo.BAND["cosine R@1, M = {M}"][1:]
    assert f"({low:.1f}-{high:.1f})" in r1
    from_true = next(line for line in default if "decoder(v_f)" in line)
    assert "70.0%" in from_true and "chance 50.0%" in from_true
    other = demo.band_lines(metrics, default_settings=False)
    assert "not shown" in other[0] and f"({low:.1f}-{high:.1f})" not in "\n".join(other)
    # title, header, the 3 numbers present; with the band, where it was measured
    assert len(other) == len(default) - 1 == 2 + 3
    assert demo.BAND_MACHINE in default[-1] and demo.BAND_MACHINE not in "\n".join(other)
    # every number printed has its documented band, and every band a number
    assert {label for label, *_ in demo.REPORTED} == set(demo.BAND)


def test_train_overrides_reach_every_setting_of_both_stages():
    """``train_overrides`` win over the demo's own settings, the seed and steps included
    (another training seed on the same corpus: the spread of the training draws)."""
    from speech2face import demo

    for stage in ("decoder", "voice"):
        config = demo._train_config(stage, 10, {"seed": 7, "steps": 3, "lr": 0.5}, seed=2)
        assert (config.seed, config.steps, config.lr) == (7, 3, 0.5)
        assert demo._train_config(stage, 10, {}, seed=2).seed == 2


def test_demo_refuses_an_unwritable_install_place_before_any_work(tmp_path, capsys,
                                                                   monkeypatch):
    """The model's install place (the user cache) was first written at the last step:
    a cache that is a file gave a traceback after minutes of work."""
    cache = tmp_path / "cache"
    cache.write_text("a file, not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a file is in the way" in err, err
    assert "--no-install skips the install" in err and not out.exists()
