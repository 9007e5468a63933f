"""The report: files, contents, atomic writing (metrics come from speech2face.evaluate)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import _random_landmarks  # same plausible faces as the metric tests

from speech2face import evaluate as ev
from speech2face import report

# ---------------------------------------------------------------- report


def _collected(n: int = 24, seed: int = 14) -> ev.Collected:
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, 8))
    image = rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8)
    return ev.Collected(
        pred=true + rng.normal(scale=0.5, size=true.shape),
        true=true,
        identities=np.arange(n) % 12,
        recon_landmarks=_random_landmarks(n, seed=seed),
        canon_landmarks=_random_landmarks(n, seed=seed + 1),
        genders=(["male", "female"] * (n // 2), ["male"] * n),
        ages=(list(rng.uniform(20, 60, n)), list(rng.uniform(20, 60, n))),
        grid=[(image, image, image, "id1"), (image, image, image, "id2")],
        face_embeddings=true[:, :4] * 2, recon_embeddings=true[:, :4] + 0.5,
        canon_embeddings=true[:, :4] * 2 + 0.1, recognizer="dlib",
        meta_genders=[None] * n,
        face_thumbnails=rng.integers(0, 256, size=(n, 12), dtype=np.uint8),
        canon_thumbnails=rng.integers(0, 256, size=(n, 12), dtype=np.uint8),
        canon_genders=["male", "female", "male", "male", "male", "male"] * (n // 6),
    )


def test_genders_are_checked_against_the_dataset_labels():
    """Where the dataset labels every sample's gender, the classifier's readings of the
    true faces and of the reconstructions are each compared with those labels; the
    report and the comparison table show both. Without labels, neither is made up."""
    c = _collected()
    labels = ["male", "male", "female"] * (len(c.true) // 3)
    c.meta_genders = labels
    attributes = ev.compute_metrics(c, draws=2)["attributes"]
    for key, read in (("gender_true_face_vs_dataset", c.genders[0]),
                      ("gender_reconstruction_vs_dataset", c.genders[1])):
        same = sum(a == b for a, b in zip(labels, read, strict=True))
        assert attributes[key]["agreement"] == pytest.approx(100 * same / len(labels))
        # rows: the dataset's label, columns: the classifier's reading
        pairs = list(zip(labels, read, strict=True))
        assert attributes[key]["matrix"][0][1] == pairs.count(("female", "male"))
    metrics = ev.compute_metrics(c, draws=2)
    text = report.render_report(metrics, c)["report.md"].decode()
    true_face = attributes["gender_true_face_vs_dataset"]["agreement"]
    assert (f"| gender of the true face, classifier vs dataset label (%) | {true_face:.1f} |"
            in text)
    rows = {row[0]: row[1] for row in report.comparison_rows(metrics)}
    assert rows["gender of the reconstruction vs dataset label (%)"] == f"{100 * 16 / 24:.1f}"
    assert f"true faces read as labelled {true_face:.0f}%" in report.summary(metrics)
    c.meta_genders = labels[:-1] + [None]
    unlabelled = ev.compute_metrics(c, draws=2)
    assert "gender_true_face_vs_dataset" not in unlabelled["attributes"]
    assert "read as labelled" not in report.summary(unlabelled)


def test_report_files_and_contents(tmp_path):
    c = _collected()
    metrics = ev.compute_metrics(c, gallery_size=100, draws=5)
    assert metrics["retrieval"]["gallery_size"] == 12
    assert metrics["attributes"]["gender"]["agreement"] == pytest.approx(50.0)
    # decoder(v_f)'s genders against the true faces' (a pattern of period 6: 4 agree)
    from_true = metrics["attributes"]["gender_decoder_true_feature"]
    assert from_true["agreement"] == pytest.approx(100 * 4 / 6)
    files = report.render_report(metrics, c, notice="Results on generated data.")
    out = report.write_outputs(tmp_path / "report", files)
    names = {p.name for p in out.iterdir()}
    written = {"report.md", "metrics.json", "grid.png", "recall.png", "craniofacial.png",
               "features.png", "attributes.png"}
    assert names == written | {report.REPORT_FILES}
    assert set(json.loads((out / report.REPORT_FILES).read_text())) == written
    for name in written - {"report.md", "metrics.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "> Results on generated data." in text
    assert "10.92" in text  # the paper's recall@1 beside ours
    r1 = metrics["retrieval"]["cosine"]["1"]
    assert f"{r1['mean']:.1f} ± {r1['std']:.1f}" in text
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded["feature_similarity"] == metrics["feature_similarity"]
    # The image-based sections name the recognizer and say it is not independent here.
    assert metrics["recognizer"]["same_as_training_features"] is False
    for key in ("decoder_identification", "decoder_identification_pixels"):
        ident = metrics[key]
        assert f"({ident['identified']} of {ident['identities']})" in text
    assert "| pixels (64 x 64 RGB, L2) |" in text and "| dlib embedding (l2) |" in text
    pixels = metrics["decoder_identification_pixels"]
    assert ("| pixels (64 x 64 RGB, departure from the average face, cosine) | "
            f"{pixels['identities_rate']:.1f} % ({pixels['identified']} of 12) |") in text
    assert f"{pixels['l2']['identities_rate']:.1f} % ({pixels['l2']['identified']} of 12)" in text
    assert "Identity from the image" in text and "**dlib** (4-D)" in text
    assert "1:2 voice-face matching" in text and "chance" in text
    assert "classifier on the true faces" in text  # genders for the constrained test
    assert "| gender agreement of decoder(v_f), from the true feature (%) | 66.7 |" in text
    assert "gender agreement 50% (decoder(v_f) 67%)" in report.summary(metrics)
    dlib, pixels = metrics["decoder_identification"], metrics["decoder_identification_pixels"]
    assert (f"decoder identification {pixels['identified']}/12 identities (pixels); decoder "
            f"identification {dlib['identified']}/12 identities (dlib)") in report.summary(metrics)
    # a metrics.json from before the recognizer was recorded names no judge
    older = {k: v for k, v in metrics.items() if k != "recognizer"}
    assert report.summary(older).endswith(f"{dlib['identified']}/12 identities")
    same = metrics["feature_matching"]["same_gender"]
    assert f"{same['accuracy']:.1f} ({same['trials']} trials)" in text
    assert "not comparable¹" in text and "0.78" in text  # the paper's L2 is explained
    assert list(metrics["identity"]["recall"]) == ["12"]
    dependent = ev.compute_metrics(c, draws=2, training_encoder="dlib")
    assert "Not independent here" in report.render_markdown(dependent)


def test_report_without_recognizer_has_no_image_sections():
    c = _collected()
    c.face_embeddings = c.recon_embeddings = c.canon_embeddings = c.recognizer = None
    metrics = ev.compute_metrics(c, draws=2)
    assert "recognizer" not in metrics and "feature_matching" in metrics
    text = report.render_markdown(metrics)
    assert "Identity from the image" not in text and "1:2 voice-face matching" in text


def test_write_outputs_replaces_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "report"
    report.write_outputs(out, {"report.md": b"one", "metrics.json": b"{}"})
    report.write_outputs(out, {"report.md": b"two", "metrics.json": b"{}"})
    assert (out / "report.md").read_bytes() == b"two"

    class Boom(dict):
        def __getitem__(self, key):
            if key == "metrics.json":
                raise RuntimeError("disk full")
            return super().__getitem__(key)

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        report.write_outputs(fresh, Boom({"report.md": b"x", "metrics.json": b"{}"}))
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_written_over_another_leaves_none_of_its_files(tmp_path, monkeypatch):
    """A plot the new report does not make (an option turned off) goes, and so do the
    folders it leaves empty; files the reports did not write stay. Written where the
    folder cannot be renamed into place (the working folder), file by file."""
    out = tmp_path / "report"
    report.write_outputs(out, {"report.md": b"1", "metrics.json": b"{}", "attributes.png": b"a",
                               "reconstructions/x.png": b"x"})
    (out / "notes.txt").write_text("mine")
    report.write_outputs(out, {"report.md": b"2", "metrics.json": b"{}"})
    assert sorted(p.name for p in out.iterdir()) == \
        [report.REPORT_FILES, "metrics.json", "notes.txt", "report.md"]
    # a listing edited to point outside the folder is not followed
    (tmp_path / "outside.png").write_bytes(b"o")
    (out / report.REPORT_FILES).write_text(json.dumps(["../outside.png", "report.md"]))
    report.write_outputs(out, {"metrics.json": b"{}"})
    assert (tmp_path / "outside.png").exists() and not (out / "report.md").exists()
    monkeypatch.chdir(tmp_path / "report")
    report.write_outputs(".", {"report.md": b"3", "metrics.json": b"{}"})
    assert (out / "report.md").read_bytes() == b"3" and (out / "notes.txt").exists()


def test_a_report_that_fails_to_write_leaves_the_one_before_whole(tmp_path, monkeypatch):
    """A full disk half-way through replacing a report left the new plots beside the old
    text and metrics; a file that cannot be replaced (immutable) did the same. Now the
    new files are all written first and replace the old ones together, or not at all,
    and the error names the report's file, not a temporary one."""
    import errno

    out = tmp_path / "report"
    old = {"grid.png": b"old grid", "report.md": b"old text", "metrics.json": b"{}"}
    report.write_outputs(out, old)
    new = {"grid.png": b"new grid", "features.png": b"new", "report.md": b"new text",
           "metrics.json": b'{"new": 1}'}
    real_fsync = os.fsync
    synced = []

    def full_disk(fd):  # the third file does not fit (a write's data meets the disk here)
        synced.append(fd)
        if len(synced) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        report.write_outputs(out, new)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in new} == old
    assert sorted(p.name for p in out.iterdir()) == [report.REPORT_FILES, *sorted(old)]

    real_replace = os.replace

    def immutable(src, dst, *args, **kwargs):  # report.md cannot be replaced
        if Path(dst).name == "report.md":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(PermissionError) as error:
        report.write_outputs(out, new)
    monkeypatch.undo()
    assert error.value.filename == str(out / "report.md")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in new} == old
    assert sorted(p.name for p in out.iterdir()) == [report.REPORT_FILES, *sorted(old)]
    report.write_outputs(out, new)  # and with room, the new report whole
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in new} == new


def test_metrics_json_has_no_nan(tmp_path):
    c = _collected()
    c.recon_landmarks[:] = c.recon_landmarks[0]  # constant measures: correlation undefined
    metrics = ev.compute_metrics(c, draws=2)
    assert np.isnan(metrics["craniofacial"]["jaw_angle"]["r"])
    text = report.render_report(metrics, c)["metrics.json"].decode()
    assert "NaN" not in text and json.loads(text)["craniofacial"]["jaw_angle"]["r"] is None


def test_evaluate_command_bad_data_is_one_line_error(tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(tmp_path / "nomodel"), "--data",
                 str(tmp_path / "noshards"), "--out", str(out)])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_compare_command_puts_runs_side_by_side(tmp_path, capsys):
    from speech2face.cli import main

    c = _collected()
    for name, seed in (("a", 1), ("b", 2)):
        metrics = ev.compute_metrics(c, draws=2, seed=seed)
        report.write_outputs(tmp_path / name, report.render_report(metrics, c))
    out = tmp_path / "table.md"
    assert main(["compare", f"paper={tmp_path / 'a'}", f"baseline={tmp_path / 'b'}",
                 "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert out.read_text() == table
    header, rule, *rows = table.strip().splitlines()
    assert header == "| measure | paper | baseline | chance |"
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    r1, r1_b = first["retrieval"]["cosine"]["1"], second["retrieval"]["cosine"]["1"]
    assert rows[0] == (f"| feature retrieval R@1, cosine, M = 12 (%) | {r1['mean']:.1f} | "
                       f"{r1_b['mean']:.1f} | {r1['chance']:.1f} |")
    shuffled = first["feature_similarity_shuffled"]["angle_deg"]["mean"]
    assert any(f"(shuffled {shuffled:.1f})" in row for row in rows)
    assert any(row.startswith("| 1:2 matching, features (%)") and row.endswith("| 50.0 |")
               for row in rows)
    assert main(["compare", f"x={tmp_path / 'nothing'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing: not found")
    (tmp_path / "empty").mkdir()
    assert main(["compare", f"x={tmp_path / 'empty'}"]) == 2
    assert "empty/metrics.json: no metrics.json in this folder" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text('{"retrieval": {')
    assert main(["compare", f"x={tmp_path / 'cut.json'}"]) == 2
    assert "cut.json: not valid JSON" in capsys.readouterr().err
    # the table never replaces a report it was made from
    assert main(["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}",
                 "-o", str(tmp_path / "a" / "metrics.json")]) == 2
    assert f"is inside the report {tmp_path / 'a'} that is compared" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == first
    # nor any file of its folder: its text, its images, its list of what it wrote
    for name in ("report.md", "grid.png", report.REPORT_FILES, "new.md"):
        assert main(["compare", f"a={tmp_path / 'a' / 'metrics.json'}", f"b={tmp_path / 'b'}",
                     "-o", str(tmp_path / "b" / name)]) == 2
        assert "is inside the report" in capsys.readouterr().err
    assert not (tmp_path / "b" / "new.md").exists()
    assert (tmp_path / "a" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # counts the table's note shows are checked like the other values
    for key, value in (("samples", -1), ("samples", "many"), ("identities", 0)):
        (tmp_path / "edited.json").write_text(json.dumps({**first, key: value}))
        assert main(["compare", f"x={tmp_path / 'edited.json'}"]) == 2
        assert f"{key} is {json.dumps(value)}, expected a whole number" in \
            capsys.readouterr().err


def test_compare_shows_every_runs_rows_and_says_where_runs_differ(tmp_path, capsys):
    from speech2face.cli import main

    c = _collected()
    full = ev.compute_metrics(c, draws=2, seed=1)
    smaller = ev.compute_metrics(c, draws=2, seed=1, gallery_size=5)
    smaller["split"], full["split"] = "val", "test"
    without = {k: v for k, v in full.items() if k != "attributes"}
    for name, metrics in (("full", full), ("smaller", smaller), ("without", without)):
        (tmp_path / f"{name}.json").write_text(json.dumps(report._json_ready(metrics)))
    assert main(["compare", f"none={tmp_path / 'without.json'}",
                 f"full={tmp_path / 'full.json'}"]) == 0
    table = capsys.readouterr().out
    assert "| gender agreement, reconstruction vs true face (%) | n/a |" in table
    assert "Note:" not in table
    assert main(["compare", f"full={tmp_path / 'full.json'}",
                 f"smaller={tmp_path / 'smaller.json'}"]) == 0
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note == ("Note: these evaluations differ in split (full: test, smaller: val); "
                    "gallery size M (full: 12, smaller: 5): their numbers are not measured "
                    "alike.")


def test_compare_judges_data_by_its_shards_not_by_the_path_typed(tmp_path, capsys):
    """Reports of the same shards named by other paths (relative, from another folder,
    a copy) compare without a note; other shards under the same path get one."""
    from speech2face.cli import main

    metrics = ev.compute_metrics(_collected(), draws=2, seed=1)
    runs = {"a": {**metrics, "data": "demo/shards", "data_sha256": "1" * 64},
            "b": {**metrics, "data": "/elsewhere/shards", "data_sha256": "1" * 64},
            "c": {**metrics, "data": "demo/shards", "data_sha256": "2" * 64}}
    for name, run in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report._json_ready(run)))
    assert main(["compare", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}"]) == 0
    assert "Note:" not in capsys.readouterr().out
    assert main(["compare", f"a={tmp_path / 'a.json'}", f"c={tmp_path / 'c.json'}"]) == 0
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note.startswith("Note: these evaluations differ in data (a: 1111")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`speech2face ... | head -1`: once the pipe's reader has gone, the command stops as
    SIGPIPE would end it (exit 141), without a traceback."""
    import subprocess
    import sys

    metrics = ev.compute_metrics(_collected(), draws=2, seed=1)
    (tmp_path / "a.json").write_text(json.dumps(report._json_ready(metrics)))
    process = subprocess.Popen([sys.executable, "-m", "speech2face", "compare",
                                f"a={tmp_path / 'a.json'}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the command writes its table
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141, err
    assert err == ""


def test_a_report_names_its_model_by_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "runs" / "voice").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ev._model_source("runs/voice") == str(tmp_path / "runs" / "voice")
    assert ev._model_source("demo") == "demo"  # an installed model's name stays a name


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(format=99), "metrics format 99; this version reads format 1"),
    (lambda m: m["retrieval"]["cosine"]["1"].update(mean="high"),
     'retrieval.cosine."1".mean is "high", expected a number from 0 to 100'),
    (lambda m: m["retrieval"]["cosine"]["1"].update(mean=1e308),
     'retrieval.cosine."1".mean is 1e+308, expected a number'),
    (lambda m: m["feature_similarity"]["angle_deg"].update(mean=-500),
     "feature_similarity.angle_deg.mean is -500, expected a number from 0 to 180"),
    (lambda m: m["craniofacial"]["mean"].update(r=7.5), "craniofacial.mean.r is 7.5"),
    (lambda m: m["retrieval"].update(gallery_size=-3), "retrieval.gallery_size is -3"),
    (lambda m: m["feature_matching"]["unconstrained"].update(accuracy=True),
     "feature_matching.unconstrained.accuracy is true, expected a number"),
    (lambda m: m.update(retrieval=[1, 2]), "retrieval is a list, expected an object"),
    (lambda m: m["retrieval"]["cosine"]["1"].pop("chance"),
     'retrieval.cosine."1".chance is missing, expected a number'),
    (lambda m: m.pop("craniofacial"), "craniofacial is missing, expected an object"),
    # printed as "M = -5" and a table row split by "|" before
    (lambda m: m["identity"].update(recall={"-5": m["identity"]["recall"].popitem()[1]}),
     "identity.recall's gallery sizes are ['-5']"),
    (lambda m: m["recognizer"].update(name="x | y\n|z"), 'recognizer.name is "x | y\\n|z"'),
    # said as a Python exception before ("KeyError: '1'", "TypeError: string indices ...")
    (lambda m: m["retrieval"].update(cosine={}), 'retrieval.cosine."1" is missing, expected an '
                                                 "object"),
    (lambda m: m["retrieval"]["cosine"].update({"1": "x"}),
     'retrieval.cosine."1" is "x", expected an object'),
    (lambda m: m.update(attributes=None), "attributes is null, expected an object"),
    (lambda m: m.pop("recognizer"), "recognizer is missing, expected an object"),
    # shown as n/a (or not at all) before, exit 0
    (lambda m: m["retrieval"]["cosine"]["1"].update(mean=None),
     'retrieval.cosine."1".mean is null, expected a number'),
    (lambda m: m.update(matching=5), "matching is 5, expected an object"),
    (lambda m: m.update(feature_matching="x"), 'feature_matching is "x", expected an object'),
    (lambda m: m.update(decoder_identification_pixels="x"),
     'decoder_identification_pixels is "x", expected an object'),
    (lambda m: m["feature_matching"].pop("unconstrained"),
     "feature_matching.unconstrained is missing, expected an object"),
    (lambda m: m.update(split=5), "split is 5, expected a string"),  # the note's values
    (lambda m: m.update(format=True), "metrics format true; this version reads format 1"),
])
def test_compare_refuses_a_damaged_metrics_file_in_one_line(edit, words, tmp_path, capsys):
    from speech2face.cli import main

    metrics = ev.compute_metrics(_collected(), draws=2, seed=1)
    edit(metrics)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "table.md"
    assert main(["compare", f"a={tmp_path}", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err and words in err
    assert not out.exists()


def test_compare_shows_what_a_report_lacks_or_leaves_undefined_as_n_a(tmp_path, capsys):
    """Reports of older versions (no format, no data digest, no image matching, no gender
    references) and of options turned off (no attributes, no recognizer) compare beside a
    current one: what they lack is n/a, and so is what evaluate writes as null (NaN: a
    correlation of constant measures, matching without trials, no genders)."""
    from speech2face.cli import main

    metrics = report._json_ready(ev.compute_metrics(_collected(), draws=2, seed=1))
    current = {"format": ev.METRICS_FORMAT, "split": "test", "data": str(tmp_path),
               "data_sha256": "1" * 64, **metrics}
    older = json.loads(json.dumps(metrics))  # (a deep copy)
    del older["matching"], older["attributes"]["gender_decoder_true_feature"]
    older["craniofacial"]["mean"]["r"] = None
    older["feature_matching"]["unconstrained"]["accuracy"] = None
    older["feature_matching"]["same_gender"] = None
    skipped = {k: v for k, v in metrics.items() if k not in (
        "attributes", "recognizer", "identity", "matching", "decoder_identification",
        "decoder_identification_pixels", "feature_matching")}
    for name, run in (("current", current), ("older", older), ("skipped", skipped)):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    assert main(["compare", *(f"{n}={tmp_path / n}.json"
                              for n in ("current", "older", "skipped"))]) == 0
    rows = {row.split(" | ")[0][2:]: row.split(" | ")[1:4]
            for row in capsys.readouterr().out.splitlines()[2:] if row.startswith("| ")}
    matching = metrics["matching"]["unconstrained"]["accuracy"]
    assert rows["1:2 matching, images, dlib (%)"] == [f"{matching:.1f}", "n/a", "n/a"]
    assert rows["1:2 matching, features (%)"][1:] == ["n/a", "n/a"]
    assert rows["1:2 matching, features, same gender (%)"][1:] == ["n/a", "n/a"]
    shuffled = metrics["craniofacial"]["mean"]["shuffled"]
    assert rows["craniofacial mean Pearson r"][1] == f"n/a (shuffled {shuffled:.2f})"
    assert rows["gender agreement of decoder(v_f), from the true feature (%)"][1:] == \
        ["n/a", "n/a"]
    assert rows["gender agreement, reconstruction vs true face (%)"][2] == "n/a"


def test_compare_keeps_names_and_values_inside_their_cells(tmp_path):
    """A run named "a|b" split its column in two; a newline in a value ended the row."""
    metrics = report._json_ready(ev.compute_metrics(_collected(), draws=2, seed=1))
    other = {**metrics, "split": "test|x\nnew row"}
    table = report.render_comparison({"a|b": metrics, "c": other})
    header, rule = table.splitlines()[:2]
    assert header == "| measure | a\\|b | c | chance |" and rule == "|---|---|---|---|"
    note = [line for line in table.splitlines() if line.startswith("Note:")]
    assert len(note) == 1 and "c: test\\|x new row" in note[0]


def test_compare_refuses_a_name_twice_and_a_folder_as_its_table(tmp_path, capsys):
    from speech2face.cli import main

    report.write_outputs(tmp_path / "a", report.render_report(
        ev.compute_metrics(_collected(), draws=2, seed=1), _collected()))
    assert main(["compare", f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"]) == 2
    assert "given twice" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main(["compare", f"x={tmp_path / 'a'}", "-o", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "folder"]


def test_decoder_identification_misses_are_listed_with_their_feature_look_alikes():
    pixels = {"identities_rate": 70.0, "identified": 7, "identities": 10, "samples": 78.3,
              "chance": 10.0, "size": 64, "median_nearest_feature_cosine": 0.9712,
              "misses": [{"identity": "id10008", "nearest": "id10010",
                          "look_alike": "id10015", "feature_cosine": 0.99451}]}
    lines = report._decoder_identification_lines({"decoder_identification_pixels": pixels})
    text = "\n".join(lines)
    assert "(7 of 10)" in text and "cosine 0.9712 or less" in text
    assert "| id10008 | id10010 | id10015 | 0.9945 |" in text
    # without misses (or from an older metrics.json without look-alikes), no table
    for fewer in ({**pixels, "misses": []},
                  {**pixels, "misses": [{"identity": "a", "nearest": "b"}]}):
        text = "\n".join(report._decoder_identification_lines(
            {"decoder_identification_pixels": fewer}))
        assert "nearest face feature" not in text


def test_the_feature_plot_pairs_samples_as_the_metrics_did(monkeypatch):
    """features.png's "another sample's face" histogram is the metrics' shuffled pairing:
    the same seed, recorded in metrics.json."""
    c = _collected()
    metrics = ev.compute_metrics(c, draws=2, seed=3)
    assert metrics["seed"] == 3
    seen = []
    monkeypatch.setattr(report, "plot_features", lambda c, seed=0: seen.append(seed) or b"")
    report.render_report(metrics, c)
    assert seen == [3]


def test_a_report_of_another_split_names_that_split():
    c = _collected()
    metrics = ev.compute_metrics(c, draws=2, seed=1)
    text = report.render_markdown({**metrics, "split": "val"})
    assert "test identit" not in text and "test sample" not in text
    assert "val identities" in text and "split `val`" in text
    assert "test identities" in report.render_markdown({**metrics, "split": "test"})
