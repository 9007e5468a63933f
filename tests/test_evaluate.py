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


def test_l2_distance_of_equal_large_features_is_zero_and_their_tie_counts():
    """VGG-Face-like features (4096-D, ReLU'd, scale 30): the expansion |q|^2 + |g|^2 -
    2 q.g left identical vectors up to 6e-5 apart, so a tie at distance 0 between two
    identities sharing one face feature was not a tie. Reference: scipy's cdist, which
    sums the differences."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = np.abs(rng.normal(size=(12, 4096))) * 30.0
        g[7] = g[3]  # two identities with one face feature
        q = g.copy()  # perfect predictions
        d = ev.distance_matrix(q, g, "l2")
        np.testing.assert_allclose(d, cdist(q, g), rtol=1e-12, atol=0)
        assert np.all(np.diag(d) == 0.0) and d[3, 7] == d[7, 3] == 0.0
        ranks = ev.retrieval_ranks(q, g, "l2")
        assert ranks[3] == ranks[7] == 1 and not np.delete(ranks, [3, 7]).any()
        # near, not equal: still the directly summed distance
        near = g + rng.normal(scale=1e-3, size=g.shape)
        np.testing.assert_allclose(ev.distance_matrix(near, g, "l2"), cdist(near, g),
                                   rtol=1e-9, atol=0)


def test_derangement_pairs_every_sample_with_another():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 40):
        for _ in range(50):
            order = ev.derangement(rng, n)
            assert sorted(order) == list(range(n)) and not np.any(order == np.arange(n))
    # uniform over the two derangements of 3 items (chi-square-free check: both common)
    counts = {tuple(ev.derangement(rng, 3)) for _ in range(200)}
    assert counts == {(1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError, match="at least 2"):
        ev.derangement(rng, 1)


def test_shuffled_feature_baseline_never_meets_its_own_face():
    """Three samples: the baseline pairs them by one of the two cyclic shifts (the only
    pairings of each sample with another's face); a plain permutation left one or all
    of them with their own face two times in three."""
    rng = np.random.default_rng(3)
    pred, true = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    allowed = [ev.feature_similarity(pred, true[list(order)]) for order in ((1, 2, 0), (2, 0, 1))]
    for seed in range(8):
        c = ev.Collected(pred=pred, true=true, identities=np.array(["a", "b", "c"]),
                         recon_landmarks=_random_landmarks(3), canon_landmarks=_random_landmarks(3))
        assert ev.compute_metrics(c, draws=2, seed=seed)["feature_similarity_shuffled"] in allowed


def test_l1_distances_and_float64_queries_a_chunk_at_a_time(monkeypatch):
    """L1 against the float64 differences summed (identical features exactly 0 apart),
    and every metric with the queries taken to float64 a chunk at a time."""
    rng = np.random.default_rng(5)
    q, g = rng.normal(size=(23, 16)), rng.normal(size=(7, 16))
    g[2] = q[4]
    l1 = ev.distance_matrix(q, g, "l1")
    np.testing.assert_allclose(l1, np.abs(q[:, None] - g[None]).sum(-1), rtol=1e-12)
    assert l1[4, 2] == 0.0
    assert ev.distance_matrix(q[:0], g, "l1").shape == (0, 7)
    # and the queries go to float64 a chunk at a time, for every metric
    monkeypatch.setattr(ev, "_ROWS", 4)
    for metric, name in (("cosine", "cosine"), ("l2", "euclidean"), ("l1", "cityblock")):
        np.testing.assert_allclose(ev.distance_matrix(q.astype(np.float32), g, metric),
                                   cdist(q.astype(np.float32).astype(np.float64), g, name),
                                   rtol=1e-12, atol=1e-12)


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


def test_a_collapsed_face_has_no_measures():
    """Every point in one place: each measure NaN (the jaw angle was 90 degrees)."""
    m = ev.craniofacial_measurements(np.full((2, 68, 2), 50.0))
    assert np.isnan(m).all()


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


# ---------------------------------------------------------------- image-based identity
# References below are plain loops over queries and gallery items (numpy only), written
# from the definitions in docs/evaluation.md, not from the vectorised code.


def _ref_distance(a, b, metric):
    a, b = np.asarray(a, float), np.asarray(b, float)
    if metric == "cosine":
        return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if metric == "l2":
        return float(np.sqrt(((a - b) ** 2).sum()))
    return float(np.abs(a - b).sum())


def _ref_means(x, ids):
    labels = sorted(set(ids))
    return labels, np.array([np.mean([x[i] for i in range(len(ids)) if ids[i] == u], axis=0)
                             for u in labels])


def test_identity_means_and_similarity_match_loops():
    rng = np.random.default_rng(20)
    faces, recon = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    ids = ["b", "a", "c", "a", "b", "c", "c", "a", "b"]
    labels, means = ev.identity_means(faces, ids)
    ref_labels, ref_means = _ref_means(faces, ids)
    assert list(labels) == ref_labels
    np.testing.assert_allclose(means, ref_means, atol=1e-12)
    sim = ev.identity_similarity(recon, ids, labels, means)
    for metric, key in (("cosine", "cosine"), ("l2", "l2"), ("l1", "l1")):
        own, other = [], []
        for i, u in enumerate(ids):
            d = [_ref_distance(recon[i], means[j], metric) for j in range(3)]
            if metric == "cosine":
                d = [1 - v for v in d]  # reported as a similarity
            own.append(d[ref_labels.index(u)])
            other.append(np.mean([v for j, v in enumerate(d) if ref_labels[j] != u]))
        assert sim["own"][key]["mean"] == pytest.approx(np.mean(own), rel=1e-9)
        assert sim["own"][key]["std"] == pytest.approx(np.std(own), rel=1e-9)
        assert sim["other"][key]["mean"] == pytest.approx(np.mean(other), rel=1e-9)


def test_identity_similarity_with_one_identity_has_no_other():
    """No other identity: ``other`` is NaN, not 0 ("identical to every other face")."""
    faces = np.random.default_rng(1).normal(size=(3, 4))
    labels, means = ev.identity_means(faces, ["a"] * 3)
    sim = ev.identity_similarity(faces + 0.1, ["a"] * 3, labels, means)
    assert all(math.isnan(sim["other"][k]["mean"]) for k in ("cosine", "l2", "l1"))
    assert all(math.isfinite(sim["own"][k]["mean"]) for k in ("cosine", "l2", "l1"))


def _ref_recall_all(queries, ids, labels, means, metric, k):
    """recall@K with every identity in the gallery; ties count against the query."""
    hits = []
    for i, u in enumerate(ids):
        d = [_ref_distance(queries[i], g, metric) for g in means]
        own = d[list(labels).index(u)]
        rank = sum(1 for j, v in enumerate(d) if labels[j] != u and v <= own + 1e-12)
        hits.append(rank < k)
    return 100 * np.mean(hits)


def test_identity_recall_gallery_smaller_than_m_matches_loops():
    rng = np.random.default_rng(21)
    faces = rng.normal(size=(6, 5))
    ids = np.arange(6)  # one sample per identity: every draw holds the same gallery
    recon = faces + rng.normal(scale=0.9, size=faces.shape)
    labels, means = ev.identity_means(faces, ids)
    result = ev.identity_recall(recon, ids, labels, means, sizes=(100, 200, 300), draws=4)
    assert list(result) == ["6"]  # 6 identities: every requested M falls back to 6
    r = result["6"]
    assert r["gallery_size"] == 6 and r["draws"] == 4
    for metric in ev.RETRIEVAL_METRICS:
        for k in ev.RECALL_KS:
            expected = _ref_recall_all(recon, ids, labels, means, metric, k)
            assert r[metric][str(k)]["mean"] == pytest.approx(expected)
            assert r[metric][str(k)]["std"] == pytest.approx(0.0)
            assert r[metric][str(k)]["chance"] == pytest.approx(100 * min(k, 6) / 6)
    assert ev.gallery_sizes((100, 200, 300), 250) == [100, 200, 250]
    assert ev.gallery_sizes((100, 200, 300), 1000) == [100, 200, 300]


def test_identity_recall_perfect_predictor_and_ties():
    rng = np.random.default_rng(22)
    faces = rng.normal(size=(40, 8))
    ids = np.repeat(np.arange(20), 2)
    labels, means = ev.identity_means(faces, ids)
    perfect = means[np.searchsorted(labels, ids)]  # each query is its identity's mean
    result = ev.identity_recall(perfect, ids, labels, means, sizes=(10, 300), draws=5)
    assert sorted(result, key=int) == ["10", "20"]
    for r in result.values():
        for metric in ev.RETRIEVAL_METRICS:
            assert all(r[metric][str(k)]["mean"] == 100.0 for k in ev.RECALL_KS)
    # A query exactly between two identities ties: a miss at K=1, a hit at K=2.
    means2 = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    r = ev.identity_recall(queries, [0, 1, 2], np.arange(3), means2, sizes=(3,), draws=1)["3"]
    assert r["l2"]["1"]["mean"] == pytest.approx(100 / 3)
    assert r["l2"]["2"]["mean"] == pytest.approx(100.0)


def _ref_matching(queries, ids, labels, gallery, metric, genders=None):
    score, trials = 0.0, 0
    labels = list(labels)
    for i, u in enumerate(ids):
        own = _ref_distance(queries[i], gallery[labels.index(u)], metric)
        for j, v in enumerate(labels):
            if v == u or (genders is not None and genders[j] != genders[labels.index(u)]):
                continue
            other = _ref_distance(queries[i], gallery[j], metric)
            trials += 1
            score += 1.0 if own < other - 1e-12 else 0.5 if abs(own - other) <= 1e-12 else 0.0
    return (100 * score / trials if trials else float("nan")), trials


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_matching_accuracy_matches_loops(metric):
    rng = np.random.default_rng(23)
    gallery = rng.normal(size=(5, 6))
    ids = [0, 1, 1, 2, 3, 4, 4, 0]
    queries = gallery[ids] + rng.normal(scale=1.0, size=(8, 6))
    genders = np.array(["male", "female", "male", "female", "male"])
    for g in (None, genders):
        result = ev.matching_accuracy(queries, ids, np.arange(5), gallery, metric, g)
        accuracy, trials = _ref_matching(queries, ids, np.arange(5), gallery, metric, g)
        assert result["trials"] == trials
        assert result["accuracy"] == pytest.approx(accuracy)
        assert result["chance"] == 50.0
    assert ev.matching_accuracy(queries, ids, np.arange(5), gallery, metric)["trials"] == 8 * 4


def test_matching_perfect_constant_and_without_trials():
    gallery = np.eye(4)
    ids = [0, 1, 2, 3]
    assert ev.matching_accuracy(gallery, ids, np.arange(4), gallery)["accuracy"] == 100.0
    # One prediction for every voice ties with every face: exactly chance.
    constant = np.ones((4, 4))
    assert ev.matching_accuracy(constant, ids, np.arange(4), gallery)["accuracy"] == 50.0
    # Each identity of its own gender: no same-gender pair, no trial.
    lonely = ev.matching_accuracy(gallery, ids, np.arange(4), gallery, "cosine",
                                  ["male", "female", "x", "y"])
    assert lonely["trials"] == 0 and math.isnan(lonely["accuracy"])


def test_identification_rate_hand_built():
    gallery = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    # identity 0: both samples nearest to 0; identity 1: one sample nearest to 1, one to
    # 0 (their mean, (2.5, 0), is still nearest to 1); identity 2: a tie between 0 and 2.
    queries = np.array([[0.1, 0.0], [0.0, 0.2], [3.9, 0.0], [1.1, 0.0], [0.0, 2.0]])
    ids = [0, 0, 1, 1, 2]
    result = ev.identification_rate(queries, ids, np.arange(3), gallery, "l2")
    assert result["samples"] == pytest.approx(100 * 3 / 5)
    assert result["identified"] == 2 and result["identities"] == 3
    assert result["identities_rate"] == pytest.approx(200 / 3)
    assert result["chance"] == pytest.approx(100 / 3)
    # the tie is a miss; its mean query (0, 2) is as near 0 as its own: 0 comes first
    assert result["misses"] == [{"identity": 2, "nearest": 0}]
    # a tie of identity 0 with identity 2: the miss names 2, not its own 0 (first)
    tied = ev.identification_rate(np.array([[0.0, 2.0]]), [0], np.arange(3),
                                  np.array([[0.0, 0.0], [9.0, 9.0], [0.0, 4.0]]), "l2")
    assert tied["misses"] == [{"identity": 0, "nearest": 2}]
    for metric in ev.RETRIEVAL_METRICS:
        perfect = ev.identification_rate(gallery + 1, [0, 1, 2], np.arange(3), gallery + 1,
                                         metric)
        assert perfect["samples"] == perfect["identities_rate"] == 100.0


def test_thumbnails_match_pil_resize():
    """Antialiased reduction to THUMBNAIL_SIZE, as PIL's bilinear resize does it."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(3)
    images = rng.random((2, 3, 224, 224)).astype(np.float32)
    ours = ev.thumbnails(torch.from_numpy(images))
    size = ev.THUMBNAIL_SIZE
    assert ours.dtype == np.uint8 and ours.shape == (2, size * size * 3)
    for image, row in zip(images, ours, strict=True):
        channels = [np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR))
                    for c in image]  # float32 "F" images, one per channel
        reference = np.clip(np.stack(channels, axis=-1) * 255 + 0.5, 0, 255).astype(np.int16)
        assert np.abs(row.reshape(size, size, 3).astype(np.int16) - reference).max() <= 1


def _ref_pixel_identification(decoded, faces, ids, centred=False):
    """Loops: each identity's mean face, each identity's mean decoded image, nearest by L2,
    or (centred) by the cosine of their departures from the mean of the mean faces."""
    labels = sorted(set(ids))

    def mean(x, i):
        return np.mean([x[j].astype(float) for j in range(len(ids)) if ids[j] == i], axis=0)

    gallery = [mean(faces, i) for i in labels]
    average = np.mean(gallery, axis=0)

    def distance(a, b):
        if not centred:
            return np.sqrt(((a - b) ** 2).sum())
        a, b = a - average, b - average
        return 1.0 - np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))

    hits = 0
    for i in labels:
        d = [distance(mean(decoded, i), g) for g in gallery]
        hits += int(np.argmin(d) == labels.index(i) and sorted(d)[0] < sorted(d)[1])
    return 100.0 * hits / len(labels)


def test_decoder_identification_in_pixels_matches_loops():
    rng = np.random.default_rng(8)
    n, ids = 30, np.arange(30) % 6
    faces = rng.integers(0, 256, size=(6, 48), dtype=np.uint8)[ids]
    # Decoded images: a face plus noise, identities 0-2 their own, 3-5 another's.
    shown = np.where(ids < 3, ids, (ids + 1) % 6)
    noise = rng.normal(scale=20.0, size=(n, 48))
    decoded = np.clip(faces[np.argsort(ids[:6])][shown] + noise, 0, 255).astype(np.uint8)
    c = ev.Collected(pred=rng.normal(size=(n, 4)), true=rng.normal(size=(n, 4)), identities=ids,
                     recon_landmarks=_random_landmarks(n), canon_landmarks=_random_landmarks(n),
                     face_thumbnails=faces, canon_thumbnails=decoded)
    result = ev.compute_metrics(c, draws=2)["decoder_identification_pixels"]
    assert result["identities_rate"] == pytest.approx(
        _ref_pixel_identification(decoded, faces, list(ids), centred=True))
    assert result["l2"]["identities_rate"] == pytest.approx(
        _ref_pixel_identification(decoded, faces, list(ids)))
    assert result["identities_rate"] == pytest.approx(50.0)  # 0-2 only
    assert result["l2"]["identities_rate"] == pytest.approx(50.0)
    assert result["samples"] == pytest.approx(50.0)
    assert result["chance"] == pytest.approx(100 / 6) and result["identities"] == 6
    # 3-5 drawn as the next identity's face, each beside its nearest other by mean feature
    # (scikit-learn's cosine over the loops' means: an independent reference).
    from sklearn.metrics.pairwise import cosine_similarity

    means = np.stack([c.true[ids == i].mean(axis=0) for i in range(6)])
    cosine = cosine_similarity(means)
    np.fill_diagonal(cosine, -2)
    assert [m["identity"] for m in result["misses"]] == [3, 4, 5]
    for miss in result["misses"]:
        i = miss["identity"]
        assert miss["nearest"] == (i + 1) % 6
        assert miss["look_alike"] == int(cosine[i].argmax())
        assert miss["feature_cosine"] == pytest.approx(cosine[i].max(), abs=1e-12)
    assert result["median_nearest_feature_cosine"] == pytest.approx(
        np.median(cosine.max(axis=1)), abs=1e-12)
    json.dumps(result)  # plain types, for metrics.json
    # Rows are taken a chunk at a time: the same result whatever the chunk.
    import speech2face.evaluate as module

    small = pytest.MonkeyPatch()
    small.setattr(module, "_ROWS", 7)
    try:
        assert ev.compute_metrics(c, draws=2)["decoder_identification_pixels"] == result
    finally:
        small.undo()



def test_decoder_identification_in_pixels_sees_through_the_pull_to_the_average():
    # Six faces around an average, one of them (identity 5) close to it. Each decoded
    # image is its own face drawn 70 % of the way to the average, as a decoder trained on
    # pixel losses draws it: by L2 the drawn-in images of the faces farthest out lie
    # nearer face 5 than their own; their departures from the average still point their
    # own way.
    rng = np.random.default_rng(4)
    average = rng.uniform(90, 160, size=48)
    departures = rng.normal(scale=40.0, size=(6, 48))
    departures[5] *= 0.1
    faces = np.clip(average + departures, 0, 255).astype(np.uint8)
    ids = np.repeat(np.arange(6), 2)
    centre = faces.astype(float).mean(axis=0)
    decoded = np.round(centre + 0.3 * (faces.astype(float) - centre))[ids].astype(np.uint8)
    c = ev.Collected(pred=rng.normal(size=(12, 4)), true=rng.normal(size=(12, 4)),
                     identities=ids, recon_landmarks=_random_landmarks(12),
                     canon_landmarks=_random_landmarks(12), face_thumbnails=faces[ids],
                     canon_thumbnails=decoded)
    result = ev.compute_metrics(c, draws=2)["decoder_identification_pixels"]
    # scipy's distances on the centred means: an independent reference
    gallery = faces.astype(float)
    centred = cdist(decoded[::2] - centre, gallery - centre, "cosine")
    plain = cdist(decoded[::2].astype(float), gallery, "euclidean")
    assert result["identified"] == int((centred.argmin(axis=1) == np.arange(6)).sum()) == 6
    assert result["l2"]["identified"] == int((plain.argmin(axis=1) == np.arange(6)).sum()) < 6
    assert result["origin"] == "average test face"


def test_identity_genders_prefers_metadata_then_classifier_majority():
    c = ev.Collected(pred=np.zeros((4, 2)), true=np.zeros((4, 2)),
                     identities=np.array([1, 1, 1, 2]), recon_landmarks=np.zeros((4, 68, 2)),
                     canon_landmarks=np.zeros((4, 68, 2)),
                     genders=(["male", "female", "male", "female"], ["male"] * 4),
                     meta_genders=["female", "female", "female", "male"])
    labels, genders, source = ev.identity_genders(c)
    assert list(labels) == [1, 2] and list(genders) == ["female", "male"]
    assert source == "metadata"
    c.meta_genders = [None] * 4
    labels, genders, source = ev.identity_genders(c)
    assert list(genders) == ["male", "female"] and source == "classifier"
    c.genders = ([], [])
    assert ev.identity_genders(c)[1:] == (None, None)
    batch = {"meta": [{"gender": "m"}, {"gender": "F"}, {"gender": None}, {}]}
    assert [ev._meta_gender(batch, i) for i in range(4)] == ["male", "female", None, None]


# ---------------------------------------------------------------- bad input


def test_missing_or_unknown_recognizer_is_a_weights_error(tmp_path, monkeypatch):
    from speech2face import faces
    from speech2face.errors import WeightsError

    with pytest.raises(WeightsError, match="unknown face recognizer"):
        ev.Recognizer("arcface")
    with pytest.raises(WeightsError, match="VGG-Face needs its weights.*--recognizer-weights"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        ev.Recognizer("vggface")
    monkeypatch.setattr(faces, "model_dir", lambda: tmp_path)
    with pytest.raises(WeightsError, match="model file is missing"):
        ev.Recognizer("dlib")


def _tiny_bundle(path, feature_dim=16):
    import torch

    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face, save_model
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    mean = torch.from_numpy(_random_landmarks(1)[0]).float()
    model = Speech2Face(FaceDecoder(FaceDecoderConfig.tiny(feature_dim), mean),
                        VoiceEncoder(VoiceEncoderConfig.tiny(feature_dim)), None, "dlib")
    return save_model(model, path)


def _manifest(folder, identities, feature_dim, encoder="dlib"):
    from speech2face.data import FORMAT_VERSION

    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "format": FORMAT_VERSION, "encoder": encoder, "feature_dim": feature_dim,
        "identities": identities,
        "splits": {"test": {"samples": 4, "identities": identities, "shards": [
            {"path": "test/test-000000.tar", "samples": 4, "size": 40960, "sha256": "0" * 64}]}}}))
    return folder


@pytest.mark.parametrize("case,message", [
    ("one identity", "1 identity"),
    ("feature size", "16-D"),
    ("face encoder", "16-D face features (vggface) but the model predicts 16-D (dlib)"),
    ("recognizer", "give one with --recognizer-weights FILE"),
    ("weights without a recognizer", "--recognizer-weights: is for --recognizer vggface"),
    ("a folder as weights", "a folder, not a weights file"),
])
def test_evaluate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch,
                                                          case, message):
    from speech2face.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _tiny_bundle(tmp_path / "model")
    identities = ["id1"] if case == "one identity" else ["id1", "id2"]
    shards = _manifest(tmp_path / "shards", identities, 128 if case == "feature size" else 16,
                       "vggface" if case == "face encoder" else "dlib")
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(bundle), "--data", str(shards), "--out", str(out)]
    if case == "recognizer":
        args += ["--recognizer", "vggface"]
    if case == "weights without a recognizer":
        args += ["--recognizer", "none", "--recognizer-weights", str(tmp_path / "w.pth")]
    if case == "a folder as weights":
        args += ["--recognizer", "vggface", "--recognizer-weights", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("setting, message", [
    ({"gallery_size": 1}, "gallery_size must be a whole number of at least 2, got 1"),
    ({"draws": 0}, "draws must be a whole number of at least 1, got 0"),
    ({"draws": 10**11}, "draws must be at most 100000, got 100000000000"),
    ({"batch_size": 0}, "batch_size must be a whole number of at least 1, got 0"),
    ({"max_samples": 2}, "max_samples must be a whole number of at least 3, got 2"),
    ({"max_samples": 3.5}, "max_samples must be a whole number of at least 3, got 3.5"),
    ({"seed": -1}, "seed must be an integer from 0"),
])
def test_evaluate_refuses_bad_settings_before_loading_anything(tmp_path, setting, message):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ev.evaluate(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "report", **setting)
    assert list(tmp_path.iterdir()) == []


def test_collector_reuses_shard_features_made_by_the_recognizer(tmp_path):
    import torch

    from speech2face.model import load_model

    model = load_model(_tiny_bundle(tmp_path / "model"))
    calls = []

    class Fake:
        name, metric = "dlib", "l2"

        def __init__(self, made_features):
            self.made_features = made_features

        def __call__(self, images):
            calls.append(len(images))
            return np.full((len(images), 3), 7.0, dtype=np.float32)

    torch.manual_seed(1)
    batch = {"spectrogram": torch.randn(2, 2, 300, 257), "feature": torch.randn(2, 16),
             "face": torch.rand(2, 3, 224, 224), "identity_index": torch.tensor([0, 1]),
             "meta": [{"identity": "a", "gender": "f"}, {"identity": "b", "gender": "m"}]}
    for made, expected_calls in ((True, 2), (False, 3)):
        calls.clear()
        collector = ev._Collector(attributes=False, grid_rows=1, recognizer=Fake(made))
        with torch.inference_mode():  # as collect() runs it
            collector.add(model, batch)
        c = collector.result()
        assert len(calls) == expected_calls
        expected = batch["feature"].numpy() if made else np.full((2, 3), 7.0)
        np.testing.assert_array_equal(c.face_embeddings, expected)
        assert c.recon_embeddings.shape == c.canon_embeddings.shape == (2, 3)
        assert c.meta_genders == ["female", "male"] and len(c.grid) == 1


def test_collector_classifies_the_decoders_own_output_and_keeps_it_on_resume(tmp_path):
    """The gender of decoder(v_f) (how legible the decoder makes gender) comes from the
    classifier run on the decoder's image of the true feature, survives a saved and
    reloaded state, and its agreement with the true faces is the share of equal labels."""
    import torch

    from speech2face.inference import to_uint8_images
    from speech2face.model import load_model

    model = load_model(_tiny_bundle(tmp_path / "model"))
    seen = []

    def by_brightness(images):  # a stand-in classifier: a deterministic label per image
        seen.append(np.stack(images))
        return (["male" if image.mean() > 127 else "female" for image in images],
                [30.0] * len(images))

    torch.manual_seed(2)
    batch = {"spectrogram": torch.randn(4, 2, 300, 257), "feature": torch.randn(4, 16),
             "face": torch.rand(4, 3, 224, 224), "identity_index": torch.tensor([0, 1, 2, 3]),
             "meta": [{"identity": k} for k in "abcd"]}
    collector = ev._Collector(attributes=True, grid_rows=0)
    collector.classifier = by_brightness
    with torch.inference_mode():
        collector.add(model, batch)
        canon = to_uint8_images(model.decode(batch["feature"]).image)
    np.testing.assert_array_equal(seen[-1], np.stack(canon))  # decoder(v_f), not v_s
    expected = ["male" if image.mean() > 127 else "female" for image in canon]
    collector.save(tmp_path / "state", "k")
    c = ev._Collector.load(tmp_path / "state", "k", True, 0).result()
    assert c.canon_genders == expected
    true = c.genders[0]
    agreement = 100 * sum(a == b for a, b in zip(true, expected, strict=True)) / len(true)
    metrics = ev.compute_metrics(c, draws=2)
    from_true = metrics["attributes"]["gender_decoder_true_feature"]
    assert from_true["agreement"] == pytest.approx(agreement)
    assert int(np.trace(np.asarray(from_true["matrix"]))) == round(agreement * len(true) / 100)
    # A state saved before these genders were kept: the measure is left out, not wrong.
    c.canon_genders = []
    assert "gender_decoder_true_feature" not in ev.compute_metrics(c, draws=2)["attributes"]


@pytest.mark.parametrize("damage", [
    lambda s: s.update(genders=[["male"], "female"]),
    lambda s: s.update(ages=[[30.0], ["old"]]),
    lambda s: s.update(canon_genders=[1, 2]),
    lambda s: s.update(ids=s["ids"][:-1]),  # fewer ids than saved rows
    lambda s: s.update(ids=5),  # not a list: must not be measured before it is checked
    lambda s: s.update(arrays="../elsewhere.npz"),
    lambda s: s.update(batches="2"),
    lambda s: s.update(shown=[["a"]]),  # not hashable: would fail building the set
    lambda s: s.update(grid_labels=["a", "b"]),  # rows the arrays do not have
    lambda s: s.clear(),
    lambda s: s.update(batches=-5),  # would replay (count twice) what was collected
    lambda s: s.update(batches=3),  # more batches than its 2 samples fill at batch size 2
    lambda s: {"npz": lambda a: a.update(pred=np.full_like(a["pred"], np.nan))},
    lambda s: {"npz": lambda a: a.update(true=a["true"][:, :5])},  # another feature width
    lambda s: {"npz": lambda a: a.update(rec_lm=np.array([["x"] * 2] * 2))},
    lambda s: {"npz": lambda a: a.update(face_px=a["face_px"].astype(np.float32))},
    lambda s: {"npz": lambda a: a.update(extra=np.zeros(2))},
    lambda s: {"npz": None},  # a truncated file
])
def test_collector_ignores_a_damaged_saved_state(tmp_path, damage):
    """A saved evaluation state is validated before use: one that does not match what
    save() writes is ignored (the evaluation starts over), not trusted."""
    import torch

    from speech2face.model import load_model

    model = load_model(_tiny_bundle(tmp_path / "model"))
    torch.manual_seed(3)
    batch = {"spectrogram": torch.randn(2, 2, 300, 257), "feature": torch.randn(2, 16),
             "face": torch.rand(2, 3, 224, 224), "identity_index": torch.tensor([0, 1]),
             "meta": [{"identity": "a"}, {"identity": "b"}]}
    collector = ev._Collector(attributes=True, grid_rows=1)
    collector.classifier = lambda images: (["male"] * len(images), [30.0] * len(images))
    with torch.inference_mode():
        collector.add(model, batch)
    collector.save(tmp_path / "state", "k")
    assert ev._Collector.load(tmp_path / "state", "k", True, 1) is not None
    assert ev._Collector.load(tmp_path / "state", "k", True, 1, batch_size=2) is not None
    path = tmp_path / "state" / "state.json"
    state = json.loads(path.read_text())
    arrays = damage(state)
    if arrays is None:
        path.write_text(json.dumps(state))
    else:  # the arrays' file damaged instead
        npz = tmp_path / "state" / state["arrays"]
        if arrays["npz"] is None:
            npz.write_bytes(npz.read_bytes()[:100])
        else:
            with np.load(npz) as f:
                saved = dict(f)
            arrays["npz"](saved)
            np.savez(npz, **saved)
    assert ev._Collector.load(tmp_path / "state", "k", True, 1, batch_size=2) is None


def test_misses_are_named_from_the_manifest_for_both_judges(tmp_path):
    shards = _manifest(tmp_path / "shards", ["id1", "id2", "id3"], 16)
    metrics = {"decoder_identification_pixels": {"misses": [
                   {"identity": 0, "nearest": 2, "look_alike": 1, "feature_cosine": 0.9}]},
               "decoder_identification": {"misses": [{"identity": 2, "nearest": 0}]}}
    ev._name_misses(metrics, shards)
    assert metrics["decoder_identification_pixels"]["misses"] == [
        {"identity": "id1", "nearest": "id3", "look_alike": "id2", "feature_cosine": 0.9}]
    assert metrics["decoder_identification"]["misses"] == [{"identity": "id3", "nearest": "id1"}]


def test_the_attribute_classifiers_runtime_leaves_nothing_in_tmp():
    # onnxruntime 1.29 and 1.30 write an empty /tmp/mat-debug-<pid>.log on import
    # (pyproject.toml excludes them); a process that loads the attribute classifier must
    # leave no file behind.
    import subprocess
    import sys
    from pathlib import Path

    child = subprocess.run(
        [sys.executable, "-c", "import os, onnxruntime; print(os.getpid())"],
        capture_output=True, text=True, check=True)
    assert not Path(f"/tmp/mat-debug-{child.stdout.strip()}.log").exists()


def test_a_saved_evaluation_is_not_resumed_with_other_recognizer_weights():
    """VGG-Face's weights are the user's file: another file gives other embeddings, so a
    state saved with one is not continued with the other (the key holds the weights)."""
    import torch

    class Recognizer:
        name = "vggface"

        def __init__(self, seed):
            torch.manual_seed(seed)
            self.encoder = torch.nn.Linear(4, 3)

    one, same, other = Recognizer(0), Recognizer(0), Recognizer(1)
    assert ev._recognizer_digest(one) == ev._recognizer_digest(same)
    assert ev._recognizer_digest(one) != ev._recognizer_digest(other)
    assert ev._recognizer_digest(None) is None
