"""Tests of speech2face.demo_data: layout, determinism, and attributes in voices and faces."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech2face import demo_data
from speech2face.cli import main
from speech2face.errors import DataError

SPEAKERS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "corpus"
    demo_data.make_demo_data(
        root, speakers=SPEAKERS, seed=5, videos=(2, 2), clips=(2, 3), frames=1, workers=2,
        progress=False,
    )
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def estimate_f0(wave: np.ndarray, rate: int = 16000) -> float:
    """Median autocorrelation pitch over loud frames (an independent numpy estimate)."""
    estimates = []
    for frame in np.lib.stride_tricks.sliding_window_view(wave, 1024)[::256]:
        frame = frame - frame.mean()
        if np.sqrt(np.mean(frame**2)) < 0.03:
            continue
        ac = np.fft.irfft(np.abs(np.fft.rfft(frame, 2048)) ** 2)[:400]
        lo, hi = rate // 400, rate // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            estimates.append(rate / lag)
    return float(np.median(estimates))


def test_layout_and_metadata(corpus):
    with open(corpus / "vox1_meta.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]
    assert len(rows) == SPEAKERS and {r["Gender"] for r in rows} <= {"m", "f"}
    with open(corpus / "identity_split.csv", newline="") as f:
        split = {r["identity"]: r["split"] for r in csv.DictReader(f)}
    assert set(split) == {r["VoxCeleb1 ID"] for r in rows}
    assert {"train", "val", "test"} == set(split.values())
    for r in rows:
        assert (r["Set"] == "test") == (split[r["VoxCeleb1 ID"]] == "test")
    durations = []
    for r in rows:
        videos = sorted((corpus / "wav" / r["VoxCeleb1 ID"]).iterdir())
        assert len(videos) == 2
        for video in videos:
            frames = list(
                (corpus / "unzippedFaces" / r["VGGFace1 ID"] / "1.6" / video.name).glob("*.jpg")
            )
            assert len(frames) == 1
            for clip in sorted(video.glob("*.wav")):
                info = sf.info(clip)
                assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
                durations.append(info.duration)
    assert min(durations) < 6.0 < max(durations)
    attributes = demo_data.load_demo_attributes(corpus)
    assert {s.identity: s.split for s in attributes.values()} == split


def test_deterministic_by_seed(corpus, tmp_path):
    kwargs = dict(speakers=SPEAKERS, videos=(2, 2), clips=(2, 3), frames=1, progress=False)
    # The fixture used 2 worker threads; one thread must write the very same corpus.
    again = demo_data.make_demo_data(tmp_path / "again", seed=5, workers=1, **kwargs)
    assert tree(again) == tree(corpus)
    other = demo_data.make_demo_data(tmp_path / "other", seed=6, **kwargs)
    assert tree(other).keys() != tree(corpus).keys()


def test_voices_carry_pitch_and_vocal_tract(corpus):
    attributes = demo_data.load_demo_attributes(corpus)
    for identity, speaker in attributes.items():
        clip = sorted((corpus / "wav" / identity).rglob("*.wav"))[0]
        wave, _ = sf.read(clip, dtype="float64")
        assert estimate_f0(wave) == pytest.approx(speaker.voice["pitch_hz"], rel=0.1)
    # Same utterance, vocal tract 20 % shorter: the spectral envelope moves up by a factor
    # of about 1.2, i.e. shifts by log(1.2) on a log-frequency axis (cross-correlation of
    # the frame-averaged log spectra between 300 Hz and 4.5 kHz).
    voice = next(iter(attributes.values())).voice
    grid = np.geomspace(300, 4500, 300)

    def log_envelope(scale):
        wave = demo_data.synthesize_speech(
            dict(voice, formant_scale=scale), 4.0, np.random.default_rng(0)
        )
        frames = np.lib.stride_tricks.sliding_window_view(wave, 1024)[::256] * np.hanning(1024)
        power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)
        env = np.log(np.interp(grid, np.fft.rfftfreq(1024, 1 / 16000), power))
        return env - env.mean()

    low, high = log_envelope(1.0), log_envelope(1.2)
    step = np.log(grid[1] / grid[0])
    shifts = range(1, 40)
    scores = [np.dot(low[:-k], high[k:]) / (len(low) - k) for k in shifts]
    assert np.exp(shifts[int(np.argmax(scores))] * step) == pytest.approx(1.2, abs=0.07)


def test_body_size_moves_only_the_upper_formants():
    # Same utterance, upper-formant scale 1.0 and 0.85 (a bigger speaker): above 2.9 kHz
    # the spectral centroid falls (F4, F5 at 3.3 / 3.75 kHz move down to 2.8 / 3.2 kHz);
    # below 2.2 kHz, where F1-F3 lie, the envelope stays as it was.
    voice, _ = demo_data.speaker_attributes(np.zeros(demo_data.N_LATENTS), "m")
    freqs = np.fft.rfftfreq(1024, 1 / 16000)

    def spectrum(scale):
        wave = demo_data.synthesize_speech(
            dict(voice, high_formant_scale=scale), 4.0, np.random.default_rng(0)
        )
        frames = np.lib.stride_tricks.sliding_window_view(wave, 1024)[::256] * np.hanning(1024)
        return np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)

    small, big = spectrum(1.0), spectrum(0.85)
    upper = (freqs >= 2500) & (freqs <= 4500)

    def centroid(power):
        return np.sum(freqs[upper] * power[upper]) / np.sum(power[upper])

    assert centroid(small) - centroid(big) > 150  # Hz
    lower = (freqs >= 300) & (freqs <= 2200)
    assert np.corrcoef(np.log(small[lower]), np.log(big[lower]))[0, 1] > 0.98


@pytest.fixture(scope="module")
def detected(corpus) -> list[tuple]:
    """Every face frame of the corpus as ``(frame, speaker, face, crop)``: dlib's first
    detection and its aligned crop, or None and None where nothing was found. Detected
    once for the tests below."""
    from speech2face import faces

    by_name = {s.name: s for s in demo_data.load_demo_attributes(corpus).values()}
    rows = []
    for frame in sorted((corpus / "unzippedFaces").rglob("*.jpg")):
        found = faces.detect_faces(frame)
        crop = faces.align_face(frame, found[0])[0] if found else None
        rows.append((frame, by_name[frame.parts[-4]], found[0] if found else None, crop))
    return rows


def test_faces_are_detected_and_carry_identity(corpus, detected):
    from speech2face.face_encoders import load_face_encoder

    attributes = demo_data.load_demo_attributes(corpus)
    crops, owners, widths = [], [], {}
    for _, speaker, face, crop in detected:
        if face is None:
            continue
        crops.append(crop)
        owners.append(speaker.identity)
        lm = face.landmarks
        # Face width relative to the distance between the eyes, from dlib's landmarks.
        eyes = np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0))
        widths.setdefault(speaker.identity, []).append(np.ptp(lm[0:17, 0]) / eyes)
    assert len(crops) == len(detected)  # every generated face is found
    # The generated face width shows in the measured geometry.
    ids = sorted(widths)
    measured = [np.mean(widths[i]) for i in ids]
    wanted = [attributes[i].face["width"] for i in ids]
    assert np.corrcoef(measured, wanted)[0, 1] > 0.5
    # dlib's embedding tells the identities apart across videos (nearest neighbour).
    vectors = load_face_encoder("dlib").embed(np.stack(crops)).numpy()
    dist = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    owners = np.array(owners)
    accuracy = np.mean(owners[dist.argmin(1)] == owners)
    assert accuracy >= 0.75  # chance: 1 / 8
    # ... and it sees gender: the nearest face of *another* speaker has the same gender.
    genders = np.array([attributes[o].gender for o in owners])
    dist[owners[:, None] == owners[None, :]] = np.inf
    assert len(set(genders)) == 2
    assert np.mean(genders[dist.argmin(1)] == genders) >= 0.8


def _patch(image: np.ndarray, x: float, y: float, half: int) -> np.ndarray:
    """The pixels (K, 3) of a square of side 2 * half around (x, y)."""
    return image[int(y) - half : int(y) + half, int(x) - half : int(x) + half].reshape(-1, 3)


def test_faces_show_gender_age_and_skin_tone(detected):
    """The traits a person sees, measured on the frames with dlib's landmarks and numpy:
    skin darkness follows ``tone``, grey hair follows ``age``, men's chins are darker
    (beard) than women's, and women's upper lids bluer (eye shadow)."""
    from speech2face import faces

    rows = []
    for frame, speaker, face, _ in detected:
        image = faces.load_image(frame).astype(np.float64) / 255.0
        lm = face.landmarks
        width = np.ptp(lm[0:17, 0])
        small, large = max(2, int(0.04 * width)), max(2, int(0.08 * width))
        cheeks = np.concatenate([_patch(image, *(0.5 * (lm[2] + lm[31])), small),
                                 _patch(image, *(0.5 * (lm[14] + lm[35])), small)])
        chin = _patch(image, lm[8, 0], 0.5 * (lm[8, 1] + lm[57, 1]), small)
        crown = _patch(image, lm[27, 0], lm[19:25, 1].min() - 0.45 * width, large)
        saturation = np.mean(crown.max(1) - crown.min(1))
        lids = np.concatenate([_patch(image, *(0.6 * lm[38] + 0.4 * lm[20]), small),
                               _patch(image, *(0.6 * lm[43] + 0.4 * lm[23]), small)])
        rows.append((speaker, cheeks.mean(), saturation, chin.mean() / cheeks.mean(),
                     np.mean(lids[:, 2] - lids[:, 1])))
    tone = [s.face["tone"] for s, *_ in rows]
    age = [s.face["age"] for s, *_ in rows]
    assert np.corrcoef(tone, [r[1] for r in rows])[0, 1] < -0.7  # darker skin
    assert np.corrcoef(age, [r[2] for r in rows])[0, 1] < -0.5  # greyer (less saturated) hair
    male = np.array([s.gender == "m" for s, *_ in rows])
    assert male.any() and not male.all()
    chin_ratio = np.array([r[3] for r in rows])
    assert chin_ratio[male].max() < chin_ratio[~male].min()  # beard: a darker chin
    lid_blue = np.array([r[4] for r in rows])
    assert lid_blue[~male].min() > lid_blue[male].max()  # eye shadow


def test_average_faces_read_as_their_gender(detected):
    """The evaluation's gender classifier reads each gender's average face, at the tiny
    decoder's 64 px, as that gender: a decoder drawing a speaker blurred and drawn toward
    the average face still shows the gender (with faint make-up and stubble, the average
    woman of the demo's corpus read as a man)."""
    from PIL import Image

    from speech2face.evaluate import AttributeClassifier

    small = {"f": [], "m": []}
    for _, speaker, _, crop in detected:
        thumbnail = Image.fromarray(crop).resize((64, 64), Image.Resampling.BOX)
        small[speaker.gender].append(np.asarray(thumbnail, np.float64))
    means = [np.asarray(Image.fromarray(np.uint8(np.mean(small[g], 0) + 0.5)).resize(
        (224, 224), Image.Resampling.BILINEAR)) for g in ("f", "m")]
    assert AttributeClassifier()(means)[0] == ["female", "male"]


def test_an_interrupt_stops_after_the_speakers_being_written(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (a KeyboardInterrupt) waited for the pool to write every
    speaker, 14 s on a Zen 1 for the demo's 40: now the speakers not yet started are
    cancelled, and nothing of the corpus is left."""
    import threading
    import time

    written, lock = [], threading.Lock()

    def write_speaker(tmp, person, *args):
        with lock:
            written.append(person)
            first = len(written) == 1
        if first:
            raise KeyboardInterrupt
        time.sleep(0.05)

    monkeypatch.setattr(demo_data, "_write_speaker", write_speaker)
    with pytest.raises(KeyboardInterrupt):
        demo_data.make_demo_data(tmp_path / "corpus", speakers=40, workers=2, progress=False)
    assert len(written) <= 4, len(written)  # the first two, and at most the next two
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output_and_cli(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        demo_data.make_demo_data(tmp_path / "full", speakers=1)
    assert main(["make-demo-data", "--out", str(tmp_path / "full"), "--speakers", "1"]) == 2
    assert (
        main(["make-demo-data", "--out", str(tmp_path / "cli"), "--speakers", "1", "--seed", "2"])
        == 0
    )
    assert "1 speakers" in capsys.readouterr().out
    assert (tmp_path / "cli" / "vox1_meta.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_rerun_over_a_finished_corpus_does_nothing_and_other_settings_are_refused(
    tmp_path, capsys
):
    """As prepare and train: a rerun of the same command (e.g. after a kill that came
    once the corpus was published) keeps the corpus; other settings are one line."""
    out = tmp_path / "corpus"
    argv = ["make-demo-data", "--out", str(out), "--speakers", "1", "--seed", "2"]
    assert main(argv) == 0
    def corpus():  # the lock file (rewritten with its pid by every run) aside
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*")
                if p.is_file() and p.name != ".speech2face.lock"}

    files = corpus()
    capsys.readouterr()
    assert main(argv) == 0
    assert "already generated" in capsys.readouterr().out
    assert corpus() == files
    assert main([*argv[:-1], "3"]) == 2
    assert "made with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    ({"videos": (3, 2)}, "videos must be a range (low, high)"),  # numpy's "low >= high"
    ({"clips": (4, 1)}, "clips must be a range (low, high)"),
    ({"videos": (1,)}, "videos must be a range (low, high)"),  # an IndexError
    ({"videos": (1.5, 2)}, "videos must be a range (low, high)"),  # accepted before
    ({"frames": 2.5}, "frames must be a whole number of at least 1, got 2.5"),  # TypeError
    ({"speakers": 0}, "speakers must be a whole number of at least 1, got 0"),
])
def test_bad_ranges_are_one_data_error(tmp_path, option, message):
    from speech2face.demo_data import make_demo_data
    from speech2face.errors import DataError

    with pytest.raises(DataError, match=re.escape(message)):
        make_demo_data(tmp_path / "corpus", progress=False, **option)
    assert not (tmp_path / "corpus").exists()
