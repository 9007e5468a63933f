"""A generated corpus in VoxCeleb1's layout whose voices and faces share hidden attributes.

Every generated speaker has a small vector of latent attributes (standard normal, plus a
gender). The same latents drive

* the **voice**, synthesised with numpy by a source-filter model: a glottal pulse train
  at the speaker's pitch (with its own amount of intonation), aspiration noise for
  breathiness, vowel formants scaled by the speaker's vocal-tract length, syllables at
  the speaker's speaking rate; and
* the **face**: one real public-domain photograph (``assets/face.jpg``, NASA's portrait
  of Eileen Collins, see ``assets/README.md``) warped with the project's own sparse
  image warp (:func:`speech2face.warp.sparse_image_warp`) on its 68 landmarks: face
  width, jaw, chin, eye spacing and size, brows, nose length and width, mouth width and
  height; plus skin tone and illumination.

So the voice-to-face mapping is learnable, and dlib's detector, shape predictor and
face embedder work on the faces because they are a real face, geometrically edited.
Per video the face gets a small pose and lighting jitter, per frame a smaller one; each
clip is a different utterance, some shorter and some longer than 6 s.

The folder layout is VoxCeleb1's (``docs/data.md``), so the corpus goes through exactly
the same ``speech2face prepare voxceleb1`` path as the real dataset::

    OUT/vox1_meta.csv              VoxCeleb1 ID, VGGFace1 ID, Gender, Nationality, Set
    OUT/identity_split.csv         identity,split (train / val / test)
    OUT/wav/<id>/<video>/<clip>.wav                    16 kHz mono PCM
    OUT/unzippedFaces/<name>/1.6/<video>/<frame>.jpg   face frames (VoxCeleb1's face release)
    OUT/demo_attributes.json       the hidden attributes (ground truth)

Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from speech2face.errors import DataError
from speech2face.utils import output_entries, publish_dir, temp_dir_beside

SAMPLE_RATE = 16_000  # Hz, VoxCeleb's rate (and the paper's, section 3.1)
FRAME_SIZE = 320  # px, side of the square face frames (moderate: generation and detection speed)
VIDEOS_PER_SPEAKER = (2, 3)  # inclusive range
CLIPS_PER_VIDEO = (2, 4)  # inclusive range
FRAMES_PER_VIDEO = 3
CLIP_SECONDS_RANGE = (3.0, 9.0)  # utterance lengths: some shorter, some longer than 6 s
N_LATENTS = 5  # hidden attributes per speaker besides gender
FACE_LIMIT = 1.6  # face-shape parameters saturate softly at this many units
TEST_FRACTION = 0.25  # of the speakers, held out for testing (at least one)
VAL_FRACTION = 0.1  # of the speakers, for validation (at least one with >= 3 speakers)

# Synthesis framing: 32 ms frames, 8 ms hop (4x overlap, so overlap-add is 4 slices).
_N_FFT = 512
_HOP = 128

# Vowel formants F1-F3 of adult male speakers (Hz; Peterson & Barney 1952), F4 and F5
# fixed; the speaker's formant scale multiplies all of them.
_VOWELS = np.array(
    [
        [270, 2290, 3010],  # i
        [390, 1990, 2550],  # I
        [530, 1840, 2480],  # E
        [660, 1720, 2410],  # ae
        [730, 1090, 2440],  # a
        [570, 840, 2410],  # O
        [440, 1020, 2240],  # U
        [300, 870, 2240],  # u
        [640, 1190, 2390],  # ^
        [490, 1350, 1690],  # er
    ],
    dtype=np.float64,
)
_HIGH_FORMANTS = np.array([3300.0, 3750.0])
_BANDWIDTHS = np.array([70.0, 100.0, 140.0, 200.0, 260.0])
_NATIONALITIES = ("UK", "USA", "India", "Ireland", "Canada", "Australia", "Germany", "France")
_VIDEO_ID_ALPHABET = np.array(
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
)

# iBUG 300-W landmark groups (0-based).
_JAW = np.arange(0, 17)
_LOWER_JAW = np.arange(3, 14)
_CHIN = np.arange(5, 12)
_BROWS = np.arange(17, 27)
_NOSE_BRIDGE = np.arange(27, 31)
_NOSTRILS = np.arange(31, 36)
_RIGHT_EYE = np.arange(36, 42)  # the subject's right eye, on the left of the picture
_LEFT_EYE = np.arange(42, 48)
_MOUTH = np.arange(48, 68)


@dataclass(frozen=True)
class Speaker:
    """One generated identity: its hidden attributes and what they become.

    ``latent`` is the shared cause; ``voice`` and ``face`` are deterministic functions of
    it (and of ``gender``), both stored so tests and evaluations can check them.
    """

    identity: str
    name: str
    gender: str  # "m" or "f"
    nationality: str
    split: str
    latent: tuple[float, ...]
    voice: dict
    face: dict


# ----------------------------------------------------------------------- attributes


def speaker_attributes(latent: np.ndarray, gender: str) -> tuple[dict, dict]:
    """Map a speaker's latents to voice parameters and face-shape parameters.

    latent: ``(N_LATENTS,)`` standard normal. Every face parameter depends on latents
    that also change the voice, with large effects on both sides, so a voice encoder
    can infer the face. Returns ``(voice, face)`` dicts of floats.
    """
    a = np.asarray(latent, dtype=np.float64)
    g = 1.0 if gender == "m" else -1.0
    voice = {
        # Male and female pitch ranges around 115 / 210 Hz; a[0] is "body size".
        "pitch_hz": (115.0 if g > 0 else 210.0) * float(np.exp(-0.16 * a[0])),
        # Semitones of intonation (std of the pitch contour).
        "pitch_variation": float(1.0 + 2.5 / (1.0 + np.exp(-1.5 * a[1]))),
        # Longer vocal tract -> lower formants (female tracts ~15 % shorter).
        "formant_scale": (1.0 if g > 0 else 1.15) * float(np.exp(-0.08 * a[2])),
        "syllables_per_second": float(4.0 * np.exp(0.25 * a[3])),
        "breathiness": float(0.05 + 0.55 / (1.0 + np.exp(-1.5 * a[4]))),
    }
    # Soft limit: extreme warps (beyond about two standard deviations) stop looking like
    # a face to dlib's HOG detector.
    clip = lambda v: float(FACE_LIMIT * np.tanh(v / FACE_LIMIT))  # noqa: E731
    face = {
        "width": clip(0.6 * g + 0.6 * a[2]),
        "jaw": clip(0.5 * g + 0.7 * a[0]),
        "chin": clip(0.8 * a[2] - 0.3 * g),
        "eye_spacing": clip(0.9 * a[4]),
        "eye_size": clip(-0.5 * g + 0.8 * a[1]),
        "brows": clip(-0.5 * g + 0.6 * a[1]),
        "nose_length": clip(0.9 * a[0]),
        "nose_width": clip(0.5 * g + 0.6 * a[4]),
        "mouth_width": clip(1.0 * a[3]),
        "mouth_height": clip(0.7 * a[3] - 0.3 * a[1]),
        # Skin tone: darkness and warmth, from latents that also set pitch and breathiness.
        "tone": clip(0.7 * a[0] - 0.5 * a[4]),
        "warmth": clip(0.7 * a[3] + 0.3 * g),
    }
    return voice, face


def _make_speakers(n: int, rng: np.random.Generator) -> list[Speaker]:
    latents = rng.standard_normal((n, N_LATENTS))
    genders = np.where(rng.random(n) < 0.5, "m", "f")
    order = rng.permutation(n)
    n_test = max(1, int(round(TEST_FRACTION * n))) if n >= 2 else 0
    n_val = max(1, int(round(VAL_FRACTION * n))) if n >= 3 else 0
    splits = np.array(["train"] * n, dtype=object)
    splits[order[:n_test]] = "test"
    splits[order[n_test : n_test + n_val]] = "val"
    speakers = []
    for i in range(n):
        voice, face = speaker_attributes(latents[i], str(genders[i]))
        speakers.append(
            Speaker(
                identity=f"id{10001 + i}",
                name=f"Demo_Speaker_{i + 1:03d}",
                gender=str(genders[i]),
                nationality=_NATIONALITIES[int(rng.integers(len(_NATIONALITIES)))],
                split=str(splits[i]),
                latent=tuple(float(v) for v in latents[i]),
                voice=voice,
                face=face,
            )
        )
    return speakers


# -------------------------------------------------------------------------------- voice


def synthesize_speech(voice: dict, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One utterance of babble in a speaker's voice (source-filter model).

    voice: as :func:`speaker_attributes` returns it. Returns ``(round(seconds * 16000),)``
    float32 in [-1, 1]: phrases of syllables (a fricative or stop, then a vowel) with
    pauses, a glottal source at the speaker's pitch with intonation and aspiration noise,
    filtered by five formants scaled by the speaker's vocal-tract length.
    """
    n = int(round(seconds * SAMPLE_RATE))
    n_frames = n // _HOP + 1
    frame_s = _HOP / SAMPLE_RATE

    formants = np.zeros((n_frames, 3))
    voiced = np.zeros(n_frames)
    frication = np.zeros(n_frames)
    loudness = np.zeros(n_frames)
    semitones = np.zeros(n_frames)
    pos = int(rng.uniform(0.05, 0.25) / frame_s)
    last_vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
    formants[:] = last_vowel
    while pos < n_frames:
        phrase_start = pos
        for _ in range(int(rng.integers(3, 9))):
            length = max(
                6, int(np.exp(rng.normal(0.0, 0.25)) / voice["syllables_per_second"] / frame_s)
            )
            onset = int(length * rng.uniform(0.15, 0.35))
            end = min(pos + length, n_frames)
            vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
            formants[pos:end] = vowel
            if rng.random() < 0.5:
                frication[pos : min(pos + onset, n_frames)] = rng.uniform(0.4, 1.0)
            vowel_frames = max(0, end - (pos + onset))
            voiced[pos + onset : end] = 1.0
            loudness[pos + onset : end] = (
                np.sin(np.linspace(0.15, np.pi - 0.15, vowel_frames)) ** 0.5
            )
            loudness[pos + onset : end] *= rng.uniform(0.6, 1.0)
            # A pitch accent on some syllables.
            if rng.random() < 0.35:
                semitones[pos + onset : end] += rng.uniform(0.5, 1.5) * np.hanning(vowel_frames)
            pos = end
            if pos >= n_frames:
                break
        # Declination over the phrase: pitch falls by about a semitone and a half.
        span = pos - phrase_start
        semitones[phrase_start:pos] += np.linspace(1.0, -1.0, span) * 0.75
        formants[pos:] = formants[pos - 1]
        pos += int(rng.uniform(0.12, 0.45) / frame_s)

    # Slow random wander of the pitch, scaled by the speaker's intonation.
    wander = np.convolve(rng.standard_normal(n_frames + 40), np.hanning(41) / 6.0, mode="valid")[
        :n_frames
    ]
    semitones = voice["pitch_variation"] * (0.5 * semitones + wander)
    f0 = voice["pitch_hz"] * 2.0 ** (semitones / 12.0)
    # Coarticulation: formant targets glide over ~40 ms.
    kernel = np.hanning(11)
    kernel /= kernel.sum()
    formants = np.stack(
        [np.convolve(np.pad(f, 5, mode="edge"), kernel, "valid") for f in formants.T], 1
    )
    voiced = np.convolve(np.pad(voiced, 2, mode="edge"), np.ones(5) / 5, "valid")

    t_frames = np.arange(n_frames) * _HOP
    t = np.arange(n)
    f0_s = np.interp(t, t_frames, f0)
    voiced_s = np.interp(t, t_frames, voiced)
    loud_s = np.interp(t, t_frames, loudness)
    fric_s = np.interp(t, t_frames, frication)

    # Glottal flow (raised-cosine opening, faster closing) and its derivative: the
    # excitation, with the characteristic -12 dB/octave source tilt of real voices
    # after the +6 dB/octave lip radiation.
    phase = np.cumsum(f0_s / SAMPLE_RATE)
    frac = phase % 1.0
    open_quotient = 0.6
    flow = np.where(
        frac < open_quotient,
        0.5 - 0.5 * np.cos(np.pi * frac / open_quotient),
        np.cos(0.5 * np.pi * np.minimum((frac - open_quotient) / 0.35, 1.0)),
    )
    excitation = np.diff(flow, prepend=flow[0]) * (SAMPLE_RATE / voice["pitch_hz"]) * 0.05
    noise = rng.standard_normal(n)
    breath = voice["breathiness"]
    voiced_source = (
        voiced_s
        * loud_s
        * ((1.0 - 0.6 * breath) * excitation + 0.35 * breath * noise * (0.3 + flow))
    )
    fricative_source = fric_s * 0.25 * rng.standard_normal(n)

    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / SAMPLE_RATE)  # (257,)
    all_formants = np.concatenate([formants, np.broadcast_to(_HIGH_FORMANTS, (n_frames, 2))], 1)
    all_formants = all_formants * voice["formant_scale"]  # (F, 5)
    bandwidths = _BANDWIDTHS * voice["formant_scale"]
    # Product of second-order resonator magnitudes |H(f)| = F^2 / sqrt((F^2 - f^2)^2 +
    # (B f)^2) over the five formants, with one square root for all five.
    squared = all_formants**2  # (F, 5)
    denominator = np.ones((n_frames, len(freqs)))
    for k in range(squared.shape[1]):
        term = np.subtract.outer(squared[:, k], freqs**2)
        term *= term
        term += (bandwidths[k] * freqs) ** 2
        denominator *= term
    vowel_filter = np.prod(squared, axis=1)[:, None] / np.sqrt(denominator)  # (F, 257)
    vowel_filter /= vowel_filter.max(axis=1, keepdims=True)
    hiss = (freqs / (freqs + 2500.0 * voice["formant_scale"])) ** 3  # fricatives: high-pass

    out = _filter_stft(voiced_source, vowel_filter) + _filter_stft(fricative_source, hiss[None, :])
    out = out[:n]
    out *= 0.1 * float(np.exp(rng.uniform(-0.3, 0.3))) / (np.sqrt(np.mean(out**2)) + 1e-12)
    out += 3e-4 * rng.standard_normal(n)  # a recording noise floor: never digital silence
    return np.clip(out, -0.99, 0.99).astype(np.float32)


def _filter_stft(signal: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Time-varying filtering by weighted overlap-add: ``gains`` (F or 1, 257) per frame."""
    n_frames = gains.shape[0] if gains.shape[0] > 1 else len(signal) // _HOP + 1
    padded = np.pad(signal, (_N_FFT - _HOP, _N_FFT + n_frames * _HOP - len(signal)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP][:n_frames]
    window = np.hanning(_N_FFT + 1)[:-1]
    spec = np.fft.rfft(frames * window, axis=1) * gains
    frames = np.fft.irfft(spec, n=_N_FFT, axis=1) * window
    overlap = _N_FFT // _HOP
    blocks = np.zeros((n_frames + overlap - 1, _HOP))
    for c in range(overlap):
        blocks[c : c + n_frames] += frames[:, c * _HOP : (c + 1) * _HOP]
    # Hann^2 at 4x overlap sums to 1.5 everywhere.
    out = blocks.reshape(-1) / 1.5
    return out[_N_FFT - _HOP :]


# --------------------------------------------------------------------------------- face


def base_face() -> tuple[np.ndarray, np.ndarray]:
    """The bundled photograph resized to ``FRAME_SIZE`` and its landmarks.

    Returns ``(image uint8 (S, S, 3), landmarks float64 (68, 2) (x, y))``, S = FRAME_SIZE.
    """
    from PIL import Image

    # The package folder, not importlib.resources: an editable install can make the
    # package a namespace package, which importlib.resources cannot read from.
    assets = Path(__file__).resolve().parent / "assets"
    image = Image.open(assets / "face.jpg").convert("RGB")
    landmarks = np.array(
        json.loads((assets / "face_landmarks.json").read_text())["landmarks"], float
    )
    scale = FRAME_SIZE / image.width
    image = image.resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BICUBIC)
    # Pixel centres: x_new + 0.5 = (x_old + 0.5) * scale.
    return np.asarray(image), (landmarks + 0.5) * scale - 0.5


def face_landmarks(base: np.ndarray, face: dict) -> np.ndarray:
    """Move the base landmarks ``(68, 2)`` (x, y) by a speaker's face parameters."""
    p = np.array(base, dtype=np.float64)
    unit = p[_JAW, 0].max() - p[_JAW, 0].min()  # face width in px
    centre_x = p[:, 0].mean()
    top = p[_BROWS, 1].min()
    height = p[_JAW, 1].max() - top

    def scale_x(idx, factor, about):
        p[idx, 0] = about + (p[idx, 0] - about) * factor

    def scale_about(idx, factor):
        c = p[idx].mean(0)
        p[idx] = c + (p[idx] - c) * factor

    # Face width: the whole jaw line, more at the cheeks than at the chin.
    lowness = np.clip((p[_JAW, 1] - top) / height, 0, 1)
    p[_JAW, 0] = centre_x + (p[_JAW, 0] - centre_x) * (
        1 + 0.09 * face["width"] * (1.2 - 0.6 * lowness)
    )
    # Jaw: a square (wide lower jaw) or a pointed one.
    w = np.sin(np.linspace(0, np.pi, len(_LOWER_JAW)))
    p[_LOWER_JAW, 0] = centre_x + (p[_LOWER_JAW, 0] - centre_x) * (1 + 0.10 * face["jaw"] * w)
    # Chin: a longer or shorter lower face.
    p[_CHIN, 1] += 0.07 * unit * face["chin"] * np.sin(np.linspace(0.3, np.pi - 0.3, len(_CHIN)))
    # Eyes: spacing and size.
    p[_RIGHT_EYE, 0] -= 0.025 * unit * face["eye_spacing"]
    p[_LEFT_EYE, 0] += 0.025 * unit * face["eye_spacing"]
    scale_about(_RIGHT_EYE, 1 + 0.12 * face["eye_size"])
    scale_about(_LEFT_EYE, 1 + 0.12 * face["eye_size"])
    # Brows: higher or lower above the eyes.
    p[_BROWS, 1] -= 0.03 * unit * face["brows"]
    # Nose: length (nostrils move down) and width.
    nose_shift = 0.045 * unit * face["nose_length"]
    p[_NOSTRILS, 1] += nose_shift
    p[_NOSE_BRIDGE[1:], 1] += nose_shift * np.array([0.33, 0.66, 1.0])
    scale_x(_NOSTRILS, 1 + 0.14 * face["nose_width"], p[_NOSTRILS, 0].mean())
    # Mouth: width and lip height, and it follows the nose and chin a little.
    scale_x(_MOUTH, 1 + 0.14 * face["mouth_width"], p[_MOUTH, 0].mean())
    c = p[_MOUTH, 1].mean()
    p[_MOUTH, 1] = c + (p[_MOUTH, 1] - c) * (1 + 0.2 * face["mouth_height"])
    # The mouth moves with the nose (a long nose must not fold into the upper lip) and
    # a little with the chin.
    p[_MOUTH, 1] += nose_shift + 0.02 * unit * face["chin"]
    return p


def identity_face(base_image: np.ndarray, base_landmarks: np.ndarray, face: dict) -> np.ndarray:
    """Warp the base face to a speaker's geometry and skin tone: uint8 ``(S, S, 3)``."""
    import torch

    from speech2face.warp import dense_image_warp, sparse_image_warp

    dest = face_landmarks(base_landmarks, face)
    image = torch.from_numpy(np.array(base_image)).permute(2, 0, 1)[None].float() / 255.0
    # The thin-plate flow is smooth: fit and evaluate it at half resolution (4x fewer
    # kernel evaluations), upsample it, and warp the full-resolution image with it.
    half = torch.nn.functional.interpolate(image, scale_factor=0.5, mode="area")
    # The warp takes (row, col) = (y, x) points; pixel centres map as (p + 0.5) / 2 - 0.5.
    src = torch.from_numpy((base_landmarks[:, ::-1] + 0.5) / 2 - 0.5).float()[None]
    dst = torch.from_numpy((dest[:, ::-1] + 0.5) / 2 - 0.5).float()[None]
    with torch.no_grad():
        _, flow = sparse_image_warp(
            half, src, dst, interpolation_order=2, regularization_weight=0.01, num_boundary_points=2
        )
        flow = torch.nn.functional.interpolate(
            flow.permute(0, 3, 1, 2), size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        warped = dense_image_warp(image, 2.0 * flow.permute(0, 2, 3, 1))
    rgb = warped[0].permute(1, 2, 0).numpy()
    # Skin tone and warmth as channel gains (darker / lighter, redder / bluer).
    darkness = 1.0 - 0.12 * face["tone"]
    gains = darkness * np.array([1 + 0.06 * face["warmth"], 1.0, 1 - 0.08 * face["warmth"]])
    return np.clip(rgb * gains * 255.0 + 0.5, 0, 255).astype(np.uint8)


def jitter_frame(
    image: np.ndarray, rng: np.random.Generator, pose: float, light: float
) -> np.ndarray:
    """Small random similarity transform (pose) and gain/gamma change (lighting).

    pose, light: jitter strengths (1 = a video's, smaller for frames within a video).
    """
    from PIL import Image

    size = image.shape[0]
    angle = np.deg2rad(rng.normal(0.0, 3.0 * pose))
    zoom = 1.0 + abs(rng.normal(0.0, 0.03 * pose)) + 0.04 * pose  # >= 1: no empty corners
    shift = rng.normal(0.0, 0.012 * size * pose, 2)
    # Output pixel -> input pixel: rotate and scale about the centre, then shift.
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    c = (size - 1) / 2
    a, b = cos, -sin
    d, e = sin, cos
    cx = c - a * c - b * c + shift[0]
    cy = c - d * c - e * c + shift[1]
    out = Image.fromarray(image).transform(
        (size, size),
        Image.Transform.AFFINE,
        (a, b, cx + 0.5 - 0.5 * (a + b), d, e, cy + 0.5 - 0.5 * (d + e)),
        Image.Resampling.BICUBIC,
    )
    rgb = np.asarray(out, dtype=np.float64) / 255.0
    gain = np.exp(rng.normal(0.0, 0.08 * light))
    gamma = np.exp(rng.normal(0.0, 0.08 * light))
    tint = 1.0 + rng.normal(0.0, 0.025 * light, 3)
    rgb = np.clip(rgb, 0, 1) ** gamma * gain * tint
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ corpus


def _video_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(_VIDEO_ID_ALPHABET, 11))


def make_demo_data(
    out: str | os.PathLike,
    speakers: int = 40,
    seed: int = 0,
    *,
    videos: tuple[int, int] = VIDEOS_PER_SPEAKER,
    clips: tuple[int, int] = CLIPS_PER_VIDEO,
    frames: int = FRAMES_PER_VIDEO,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write the demo corpus (VoxCeleb1 layout, module docstring) to ``out``.

    speakers: number of identities. seed: everything is a deterministic function of it.
    videos, clips: inclusive ranges of videos per speaker and clips per video.
    frames: face frames per video. workers: threads writing speakers in parallel (the
    corpus does not depend on it). The corpus is built in a temporary folder beside
    ``out`` and renamed into place, so a crash leaves no partial corpus.

    Returns ``out`` as a Path. Raises DataError if ``out`` exists and is not empty.
    """
    import torch
    from tqdm import tqdm

    out = Path(out)
    if speakers < 1 or frames < 1 or min(videos) < 1 or min(clips) < 1:
        raise DataError(out, "speakers, videos, clips and frames must each be at least 1")
    if out.exists() and (not out.is_dir() or output_entries(out)):
        raise DataError(out, "output folder exists and is not empty")
    tmp = temp_dir_beside(out)
    # The warps are small: one thread avoids OpenMP spin-waiting on a busy machine
    # (10-50x slower with 2 threads under load). Restored on the way out.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(seed)
        people = _make_speakers(speakers, rng)
        base = base_face()
        # Speakers are independent (each has its own generator), so threads can write
        # them in any order: numpy, PIL and the warp release the GIL for their heavy work.
        # The corpus is the same for any number of workers.
        with ThreadPoolExecutor(max(1, min(workers, speakers))) as pool:
            jobs = [
                pool.submit(_write_speaker, tmp, person, base, seed, videos, clips, frames)
                for person in people
            ]
            for job in tqdm(
                as_completed(jobs), total=len(jobs), desc="make-demo-data", unit="speaker",
                disable=not progress,
            ):
                job.result()
        _write_metadata(tmp, people, seed)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return out


def _write_speaker(tmp: Path, person: Speaker, base, seed: int, videos, clips, frames) -> None:
    """All videos of one speaker: face frames (JPEG) and speech clips (WAV)."""
    from PIL import Image

    # One generator per speaker for its recordings, seeded by (seed, identity): its clips
    # and frames do not depend on the other speakers' draws.
    srng = np.random.default_rng([seed, int(person.identity[2:])])
    face = identity_face(*base, person.face)
    for _ in range(int(srng.integers(videos[0], videos[1] + 1))):
        video = _video_id(srng)
        frame_dir = tmp / "unzippedFaces" / person.name / "1.6" / video
        frame_dir.mkdir(parents=True)
        video_look = jitter_frame(face, srng, pose=1.0, light=1.0)
        frame_no = int(srng.integers(1, 500))
        for _ in range(frames):
            picture = jitter_frame(video_look, srng, pose=0.3, light=0.3)
            Image.fromarray(picture).save(frame_dir / f"{frame_no:07d}.jpg", quality=90)
            frame_no += int(srng.integers(25, 200))
        wav_dir = tmp / "wav" / person.identity / video
        wav_dir.mkdir(parents=True)
        for k in range(int(srng.integers(clips[0], clips[1] + 1))):
            seconds = float(srng.uniform(*CLIP_SECONDS_RANGE))
            wave = synthesize_speech(person.voice, seconds, srng)
            _write_wav(wav_dir / f"{k + 1:05d}.wav", wave)


def _write_wav(path: Path, wave: np.ndarray) -> None:
    import soundfile as sf

    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")


def _write_metadata(root: Path, people: list[Speaker], seed: int) -> None:
    # VoxCeleb1's vox1_meta.csv is tab-separated with this header.
    with open(root / "vox1_meta.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"])
        for p in people:
            writer.writerow(
                [
                    p.identity,
                    p.name,
                    p.gender,
                    p.nationality,
                    "test" if p.split == "test" else "dev",
                ]
            )
    with open(root / "identity_split.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["identity", "split"])
        for p in people:
            writer.writerow([p.identity, p.split])
    attributes = {
        "seed": seed,
        "latent_dims": N_LATENTS,
        "sample_rate": SAMPLE_RATE,
        "frame_size": FRAME_SIZE,
        "speakers": [asdict(p) for p in people],
    }
    (root / "demo_attributes.json").write_text(json.dumps(attributes, indent=1) + "\n")


def load_demo_attributes(root: str | os.PathLike) -> dict[str, Speaker]:
    """The hidden attributes of a generated corpus, by identity (from demo_attributes.json)."""
    path = Path(root) / "demo_attributes.json"
    if not path.is_file():
        raise DataError(path, "not found (is this a corpus written by make-demo-data?)")
    try:
        data = json.loads(path.read_text())
        return {
            s["identity"]: Speaker(**{**s, "latent": tuple(s["latent"])}) for s in data["speakers"]
        }
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(path, f"unreadable demo attributes ({error})") from None


# --------------------------------------------------------------------------------- CLI


def add_make_demo_data_arguments(parser) -> None:
    parser.add_argument(
        "-o", "--out", required=True, help="output folder (must not exist or be empty)"
    )
    parser.add_argument(
        "--speakers", type=int, default=40, help="number of identities (default 40)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same corpus (default 0)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="threads writing speakers (default 2)"
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=FRAMES_PER_VIDEO,
        help=f"face frames per video (default {FRAMES_PER_VIDEO})",
    )


def make_demo_data_command(args) -> int:
    start = time.perf_counter()
    out = make_demo_data(
        args.out, speakers=args.speakers, seed=args.seed, frames=args.frames, workers=args.workers
    )
    n_wav = sum(1 for _ in (out / "wav").rglob("*.wav"))
    n_jpg = sum(1 for _ in (out / "unzippedFaces").rglob("*.jpg"))
    print(
        f"{out}: {args.speakers} speakers, {n_wav} clips, {n_jpg} face frames "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
