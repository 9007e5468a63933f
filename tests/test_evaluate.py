"""Evaluation metrics on hand-built cases with known answers, against scipy references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import pearsonr

from speech2face import evaluate as ev


def _random_landmarks(n: int, seed: int = 0) -> np.ndarray:
    """Plausible faces: a mean shape jittered per sample, so every measure varies."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    base = np.stack([100 + 60 * np.cos(angles), 110 + 70 * np.sin(angles)], axis=1)
    return base[None] + rng.normal(0, 4.0, size=(n, 68, 2))


# ---------------------------------------------------------------- feature similarity


def test_feature_similarity_identical_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 16))
    sim = ev.feature_similarity(x, x)
    assert sim["angle_deg"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert sim["l2"]["mean"] == pytest.approx(0.0, abs=1e-7)
    assert sim["l1"]["mean"] == 0.0


def test_feature_similarity_matches_reference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    sim = ev.feature_similarity(a, b)
    cos = 1 - np.diag(cdist(a, b, "cosine"))
    angles = np.degrees(np.arccos(cos))
    l2 = np.array([np.linalg.norm(x / np.linalg.norm(x) - y / np.linalg.norm(y))
                   for x, y in zip(a, b, strict=True)])
    l1 = np.diag(cdist(a, b, "cityblock"))
    assert sim["angle_deg"]["mean"] == pytest.approx(angles.mean(), rel=1e-9)
    assert sim["angle_deg"]["std"] == pytest.approx(angles.std(), rel=1e-9)
    assert sim["l2"]["mean"] == pytest.approx(l2.mean(), rel=1e-9)
    assert sim["l1"]["mean"] == pytest.approx(l1.mean(), rel=1e-9)


def test_feature_similarity_orthogonal_and_opposite():
    a = np.array([[1.0, 0.0], [0.0, 3.0]])
    b = np.array([[0.0, 2.0], [0.0, -1.0]])
    sim = ev.feature_similarity(a, b)
    assert sim["angle_deg"]["mean"] == pytest.approx((90 + 180) / 2)
    assert sim["l2"]["mean"] == pytest.approx((math.sqrt(2) + 2) / 2)
    assert sim["l1"]["mean"] == pytest.approx((3 + 4) / 2)


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("metric,scipy_name", [("cosine", "cosine"), ("l2", "euclidean"),
                                               ("l1", "cityblock")])
def test_distance_matrix_matches_scipy(metric, scipy_name):
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    np.testing.assert_allclose(ev.distance_matrix(q, g, metric), cdist(q, g, scipy_name),
                               atol=1e-9)


def test_retrieval_ranks_hand_built():
    gallery = np.array([[0.0], [1.0], [3.0]])
    queries = np.array([[0.9], [1.1], [1.9]])  # nearest items: 1, 1, 1 (then 3)
    ranks = ev.retrieval_ranks(queries, gallery, "l1")
    # query 0's own item (0.0) is second after 1.0; query 1 own is nearest; query 2's
    # own item 3.0 (d 1.1) comes after 1.0 (d 0.9) and before 0.0 (d 1.9).
    np.testing.assert_array_equal(ranks, [1, 0, 1])


def test_identical_features_give_full_recall():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(60, 32))
    ids = np.repeat(np.arange(30), 2)
    result = ev.retrieval_recall(feats, feats, ids, gallery_size=20, draws=5)
    assert result["gallery_size"] == 20
    for metric in ev.RETRIEVAL_METRICS:
        for k in ev.RECALL_KS:
            assert result[metric][str(k)]["mean"] == 100.0
            assert result[metric][str(k)]["chance"] == pytest.approx(100 * k / 20)


def test_unrelated_features_give_chance():
    rng = np.random.default_rng(4)
    pred, true = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    ids = np.arange(400)
    result = ev.retrieval_recall(pred, true, ids, gallery_size=100, draws=200, seed=1)
    for metric in ev.RETRIEVAL_METRICS:
        for k in ev.RECALL_KS:
            r = result[metric][str(k)]
            # 200 draws x 100 queries: the standard error of the mean is well under 1 point.
            assert r["mean"] == pytest.approx(r["chance"], abs=max(1.0, 0.2 * r["chance"]))


def test_constant_features_do_not_beat_chance():
    true = np.random.default_rng(5).normal(size=(50, 8))
    # One prediction for every voice: exactly one query can rank its own face first.
    result = ev.retrieval_recall(np.ones_like(true), true, np.arange(50), gallery_size=50,
                                 draws=1)
    assert result["cosine"]["1"]["mean"] == pytest.approx(2.0)
    # A gallery of identical faces: every item ties, and ties count against the query.
    result = ev.retrieval_recall(true, np.ones_like(true), np.arange(50), gallery_size=50,
                                 draws=1)
    for metric in ev.RETRIEVAL_METRICS:
        assert result[metric]["10"]["mean"] == 0.0


def test_gallery_shrinks_to_available_identities_and_is_seeded():
    rng = np.random.default_rng(6)
    pred, true = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    ids = np.repeat(["a", "b", "c", "d"], 3)
    r1 = ev.retrieval_recall(pred, true, ids, draws=10, seed=7)
    r2 = ev.retrieval_recall(pred, true, ids, draws=10, seed=7)
    assert r1 == r2
    assert r1["gallery_size"] == 4
    assert r1["cosine"]["10"]["chance"] == 100.0
    assert r1["cosine"]["10"]["mean"] == 100.0
    with pytest.raises(ValueError):
        ev.retrieval_recall(pred, true, ["a"] * 12)


def test_noisy_features_recall_between_chance_and_perfect():
    rng = np.random.default_rng(8)
    true = rng.normal(size=(200, 32))
    pred = true + rng.normal(scale=1.2, size=true.shape)
    result = ev.retrieval_recall(pred, true, np.arange(200), gallery_size=100, draws=20)
    r1 = result["cosine"]["1"]["mean"]
    assert 5.0 < r1 < 100.0


# ---------------------------------------------------------------- correlations


def test_pearson_matches_scipy_and_recovers_known_correlation():
    rng = np.random.default_rng(9)
    x = rng.normal(size=20000)
    for rho in (0.0, 0.3, 0.8):
        y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=x.size)
        r = ev.pearson(x, y)
        assert r == pytest.approx(pearsonr(x, y).statistic, abs=1e-10)
        assert r == pytest.approx(rho, abs=0.02)
    cols = rng.normal(size=(30, 3))
    other = rng.normal(size=(30, 3))
    expected = [pearsonr(cols[:, i], other[:, i]).statistic for i in range(3)]
    np.testing.assert_allclose(ev.pearson(cols, other), expected, atol=1e-12)
    assert np.isnan(ev.pearson(np.ones(5), np.arange(5.0)))


def _reference_measure(lm: np.ndarray, name: str) -> float:
    """Independent, one-face-at-a-time definitions (docs/evaluation.md)."""
    d = lambda a, b: float(np.hypot(*(lm[a] - lm[b])))  # noqa: E731
    face_w, face_h = d(0, 16), d(27, 8)
    if name == "jaw_angle":
        u, v = lm[4] - lm[8], lm[12] - lm[8]
        return math.degrees(math.acos(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
    if name == "eye_distance":
        return float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))) / face_w
    return {
        "face_width_height": face_w / face_h,
        "lower_face_height": d(33, 8) / face_h,
        "jaw_width": d(4, 12) / face_w,
        "nose_width_height": d(31, 35) / d(27, 33),
        "nose_width": d(31, 35) / face_w,
        "mouth_width": d(48, 54) / face_w,
        "mouth_nose_width": d(48, 54) / d(31, 35),
        "inner_eye_distance": d(39, 42) / d(36, 45),
        "eye_width": (d(36, 39) + d(42, 45)) / 2 / face_w,
    }[name]


def test_craniofacial_measurements_match_reference_and_are_invariant():
    lm = _random_landmarks(4, seed=10)
    m = ev.craniofacial_measurements(lm)
    assert m.shape == (4, len(ev.CRANIOFACIAL_NAMES))
    for i in range(4):
        for j, name in enumerate(ev.CRANIOFACIAL_NAMES):
            assert m[i, j] == pytest.approx(_reference_measure(lm[i], name), rel=1e-9)
    theta = 0.3
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    moved = 2.5 * lm @ rot.T + np.array([13.0, -7.0])
    np.testing.assert_allclose(ev.craniofacial_measurements(moved), m, rtol=1e-9)
    np.testing.assert_allclose(ev.craniofacial_measurements(lm[..., ::-1]), m, rtol=1e-9)


def test_craniofacial_hand_built_values():
    lm = np.zeros((68, 2))
    lm[0], lm[16] = (0, 0), (10, 0)  # face width 10
    lm[27], lm[8] = (5, 0), (5, 20)  # face height 20
    lm[4], lm[12] = (2, 17), (8, 17)  # jaw width 6, jaw angle 2*atan(3/3) = 90 deg
    lm[31], lm[35], lm[33] = (4, 12), (6, 12), (5, 12)  # nose width 2, height 12
    lm[48], lm[54] = (3, 15), (7, 15)  # mouth width 4
    m = dict(zip(ev.CRANIOFACIAL_NAMES, ev.craniofacial_measurements(lm)[0], strict=True))
    assert m["face_width_height"] == pytest.approx(0.5)
    assert m["jaw_width"] == pytest.approx(0.6)
    assert m["jaw_angle"] == pytest.approx(90.0)
    assert m["nose_width_height"] == pytest.approx(2 / 12)
    assert m["lower_face_height"] == pytest.approx(8 / 20)
    assert m["mouth_width"] == pytest.approx(0.4)
    assert m["mouth_nose_width"] == pytest.approx(2.0)


def test_craniofacial_correlations_perfect_noisy_and_shuffled():
    true = _random_landmarks(300, seed=11)
    same = ev.craniofacial_correlations(true, true, shuffles=10)
    for name in ev.CRANIOFACIAL_NAMES:
        assert same[name]["r"] == pytest.approx(1.0)
        assert abs(same[name]["shuffled"]) < 0.1
    unrelated = ev.craniofacial_correlations(_random_landmarks(300, seed=12), true)
    assert abs(unrelated["mean"]["r"]) < 0.1
    noisy = true + np.random.default_rng(13).normal(0, 3.0, size=true.shape)
    partial = ev.craniofacial_correlations(noisy, true)
    assert 0.2 < partial["mean"]["r"] < 0.95
    assert partial["mean"]["r"] > partial["mean"]["shuffled"] + 0.2


# ---------------------------------------------------------------- attributes


def test_gender_agreement_hand_built():
    result = ev.gender_agreement(["male", "male", "female", "female"],
                                 ["male", "female", "female", "female"])
    assert result["labels"] == ["female", "male"]
    assert result["matrix"] == [[2, 0], [1, 1]]
    assert result["agreement"] == pytest.approx(75.0)


def test_age_agreement_hand_built():
    true = [10, 25, 35, 70]
    rec = [15, 29, 45, 61]
    result = ev.age_agreement(true, rec)
    m = np.array(result["matrix"])
    assert m.sum() == 4 and np.trace(m) == 3  # only 35 -> 45 changes bucket
    assert m[2, 3] == 1
    assert result["agreement"] == pytest.approx(75.0)
    assert result["mean_abs_diff"] == pytest.approx((5 + 4 + 10 + 9) / 4)
    assert result["pearson"] == pytest.approx(pearsonr(true, rec).statistic)
    np.testing.assert_array_equal(ev.age_bucket([0, 19.9, 20, 59, 60, 90]), [0, 0, 1, 4, 5, 5])


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
    )


def test_report_files_and_contents(tmp_path):
    c = _collected()
    metrics = ev.compute_metrics(c, gallery_size=100, draws=5)
    assert metrics["retrieval"]["gallery_size"] == 12
    assert metrics["attributes"]["gender"]["agreement"] == pytest.approx(50.0)
    files = ev.render_report(metrics, c, notice="Results on generated data.")
    out = ev.write_outputs(tmp_path / "report", files)
    names = {p.name for p in out.iterdir()}
    assert names == {"report.md", "metrics.json", "grid.png", "recall.png", "craniofacial.png",
                     "features.png", "attributes.png"}
    for name in names - {"report.md", "metrics.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "> Results on generated data." in text
    assert "10.92" in text  # the paper's recall@1 beside ours
    r1 = metrics["retrieval"]["cosine"]["1"]
    assert f"{r1['mean']:.1f} ± {r1['std']:.1f}" in text
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded["feature_similarity"] == metrics["feature_similarity"]


def test_write_outputs_replaces_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "report"
    ev.write_outputs(out, {"report.md": b"one", "metrics.json": b"{}"})
    ev.write_outputs(out, {"report.md": b"two", "metrics.json": b"{}"})
    assert (out / "report.md").read_bytes() == b"two"

    class Boom(dict):
        def __getitem__(self, key):
            if key == "metrics.json":
                raise RuntimeError("disk full")
            return super().__getitem__(key)

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        ev.write_outputs(fresh, Boom({"report.md": b"x", "metrics.json": b"{}"}))
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_metrics_json_has_no_nan(tmp_path):
    c = _collected()
    c.recon_landmarks[:] = c.recon_landmarks[0]  # constant measures: correlation undefined
    metrics = ev.compute_metrics(c, draws=2)
    assert np.isnan(metrics["craniofacial"]["jaw_angle"]["r"])
    text = ev.render_report(metrics, c)["metrics.json"].decode()
    assert "NaN" not in text and json.loads(text)["craniofacial"]["jaw_angle"]["r"] is None


def test_evaluate_command_bad_data_is_one_line_error(tmp_path, capsys):
    from speech2face.cli import main

    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(tmp_path / "nomodel"), "--data",
                 str(tmp_path / "noshards"), "--out", str(out)])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()
