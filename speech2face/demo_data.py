"""A generated corpus in VoxCeleb1's layout whose voices and faces share hidden attributes.

Every generated speaker has a small vector of latent attributes (standard normal, plus a
gender). The same latents drive

* the **voice**, synthesised with numpy by a source-filter model: a glottal pulse train
  at the speaker's pitch (with its own amount of intonation), aspiration noise for
  breathiness, vowel formants scaled by the speaker's vocal-tract length (the upper
  formants also by body size), syllables at the speaker's speaking rate; and
* the **face**: one real public-domain photograph (``assets/face.jpg``, NASA's portrait
  of Eileen Collins, see ``assets/README.md``) made into each speaker's face in two
  steps. Its 68 landmarks are moved and the photograph warped with the project's own
  sparse image warp (:func:`speech2face.warp.sparse_image_warp`): face width (build),
  jaw, chin, eye spacing and size, brows, nose, mouth. Then traits a person sees at a
  glance are painted within masks made from the warped landmarks: **gender** (long hair
  past the shoulders, lipstick, eye shadow and blush for women; short hair, heavier brows
  and stubble to a full beard for men), **age** (grey hair, wrinkles, sallow skin),
  **skin tone** (light to dark brown) and hair colour (dark to fair).

A low, slow, breathy voice belongs to a big, older man with a wide face, a beard and
grey hair; a high, fast one to a young woman with long hair. dlib's detector, shape
predictor and face embedder work on every face because it is a real face, edited where
a face varies; the embedding tells gender, skin tone, hair colour and age apart (the
tests check it). Every picture is generated: no photograph of anyone but the one
bundled public-domain portrait is used, and every frame says so in its JPEG comment
(``GENERATED_LABEL``).

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
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from speech2face.audio import SAMPLE_RATE, seconds_samples
from speech2face.errors import DataError
from speech2face.utils import is_whole, output_entries, publishing_dir, seed_problem

FRAME_SIZE = 320  # px, side of the square face frames (moderate: generation and detection speed)
VIDEOS_PER_SPEAKER = (2, 3)  # inclusive range
CLIPS_PER_VIDEO = (2, 4)  # inclusive range
FRAMES_PER_VIDEO = 3
# Upper bounds of the command's counts: VoxCeleb2's size in identities (6,112) many times
# over, and a minute of video at 30 frames a second; a typo beyond them would fill the
# memory or the disk.
MAX_SPEAKERS = 100_000
MAX_FRAMES = 1800
CLIP_SECONDS_RANGE = (3.0, 9.0)  # utterance lengths: some shorter, some longer than 6 s
N_LATENTS = 5  # hidden attributes per speaker besides gender
ATTRIBUTES_FILE = "demo_attributes.json"  # written last: a finished corpus has it
GENERATED_LABEL = (
    "Generated face (speech2face make-demo-data): an edit of NASA's public-domain portrait "
    "of Eileen Collins (S94-42431), not a photograph of a person."
)
FACE_LIMIT = 1.2  # face-shape parameters saturate softly at this many units
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
# Opacity of the women's make-up. The gender classifier of the evaluation must read a
# woman's face as a woman's also when the decoder renders it blurred and drawn toward
# the average face: with half-opaque lipstick and faint blush and shadow, the average
# woman's face of the corpus read as a man's (docs/results.md).
_LIPSTICK, _EYE_SHADOW, _BLUSH = 1.0, 0.9, 0.7


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
    """Map a speaker's latents to voice parameters and face parameters.

    latent: ``(N_LATENTS,)`` standard normal. The latents play the parts of body size
    (``a[0]``), expressiveness (``a[1]``), vocal-tract length (``a[2]``), youth (``a[3]``,
    fast speech) and age (``a[4]``, breathy voice); every face parameter depends on
    latents that also change the voice, with large effects on both sides, so a voice
    encoder can infer the face: a low, slow, breathy voice belongs to a big, older man.
    Body size sets the upper formants as well as the pitch: a pitch difference within a
    gender hardly shows in the paper's spectrogram (its 25-ms window does not resolve the
    harmonics of a low voice), and a small voice encoder trained for minutes on a CPU
    learns the spectral envelope first (on the demo's data, body size was recovered from
    its predictions at r = 0.2 when it set only the pitch; docs/results.md).
    Returns ``(voice, face)`` dicts of floats.
    """
    a = np.asarray(latent, dtype=np.float64)
    g = 1.0 if gender == "m" else -1.0
    voice = {
        # Male and female pitch ranges around 115 / 210 Hz; a[0] is "body size".
        "pitch_hz": (115.0 if g > 0 else 210.0) * float(np.exp(-0.16 * a[0])),
        # Semitones of intonation (std of the pitch contour).
        "pitch_variation": float(1.0 + 2.5 / (1.0 + np.exp(-1.5 * a[1]))),
        # Longer vocal tract -> lower formants; women's 25 % higher (real voices: about
        # 15-20 %; a wider gap lets a small voice encoder read gender from the envelope).
        "formant_scale": (1.0 if g > 0 else 1.25) * float(np.exp(-0.08 * a[2])),
        # A bigger head and throat -> lower upper formants (F4, F5) besides that.
        "high_formant_scale": float(np.exp(-0.10 * a[0])),
        "syllables_per_second": float(4.0 * np.exp(0.25 * a[3])),
        "breathiness": float(0.05 + 0.55 / (1.0 + np.exp(-1.5 * a[4]))),
    }
    # Soft limit: extreme warps (beyond about two standard deviations) stop looking like
    # a face to dlib's HOG detector.
    clip = lambda v: float(FACE_LIMIT * np.tanh(v / FACE_LIMIT))  # noqa: E731
    unit = lambda v: float(1.0 / (1.0 + np.exp(-v)))  # noqa: E731  (0..1)
    age = (a[4] - a[3]) / np.sqrt(2.0)  # slow, breathy speech: older
    build = (a[0] + a[2]) / np.sqrt(2.0)  # low pitch and formants: a bigger person
    face = {
        # Geometry (landmark warp).
        "width": clip(0.3 * g + 0.8 * build),
        "jaw": clip(0.5 * g + 0.6 * a[0]),
        "chin": clip(0.8 * a[2] - 0.3 * g),
        "eye_spacing": clip(0.6 * a[1]),
        "eye_size": clip(-0.3 * g + 0.6 * a[1] - 0.3 * age),
        "brows": clip(-0.4 * g + 0.5 * a[1]),
        "nose_length": clip(0.4 * g + 0.6 * a[0] + 0.3 * age),
        "nose_width": clip(0.4 * g + 0.6 * build),
        "mouth_width": clip(0.8 * a[3]),
        "mouth_height": clip(0.7 * a[3] - 0.3 * a[1] - 0.3 * g),
        # Age: grey hair, wrinkles, sallow skin (0 young .. 1 old).
        "age": unit(1.8 * age),
        # Skin tone (light .. dark) and warmth; hair colour (dark .. fair).
        "tone": clip(1.1 * a[1] - 0.4 * a[2]),
        "warmth": clip(0.7 * a[3] + 0.3 * g),
        "hair_light": unit(1.2 * a[2] - 1.0 * a[1]),
        # Gender: long hair below the shoulders for women, short hair, heavy brows and
        # a beard (from stubble to full) for men.
        "hair_length": unit(1.5 * a[1] + 1.0) if g < 0 else 0.0,
        "beard": 0.25 + 0.75 * unit(1.5 * (a[0] + age)) if g > 0 else 0.0,
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
    filtered by five formants scaled by the speaker's vocal-tract length (the upper two
    also by body size).
    """
    n = seconds_samples(seconds)
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
    high = _HIGH_FORMANTS * voice["high_formant_scale"]
    all_formants = np.concatenate([formants, np.broadcast_to(high, (n_frames, 2))], 1)
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


@functools.lru_cache(maxsize=1)
def base_face() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled photograph resized to ``FRAME_SIZE``, its landmarks and hair mask.

    Returns ``(image uint8 (S, S, 3), landmarks float64 (68, 2) (x, y), hair float32
    (S, S) in [0, 1])``, S = FRAME_SIZE. Cached: every speaker starts from it.
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
    image = np.asarray(image.resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BICUBIC))
    # Pixel centres: x_new + 0.5 = (x_old + 0.5) * scale.
    landmarks = (landmarks + 0.5) * scale - 0.5
    image.flags.writeable = False
    return image, landmarks, _hair_mask(image, landmarks)


def _hair_mask(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Where the photograph shows hair: float32 (S, S) in [0, 1].

    The backdrop is a light neutral grey and the hair a golden brown, so outside the face
    (the jaw line closed over the brows) and above the collar, hair is what is yellow
    enough: blue well below red and green.
    """
    rgb = image.astype(np.float32)
    yellowness = 1.0 - rgb[..., 2] / (0.5 * (rgb[..., 0] + rgb[..., 1]) + 1.0)
    hair = np.clip((yellowness - 0.15) / 0.1, 0.0, 1.0)
    size = image.shape[0]
    face = _polygon_mask(size, _face_outline(landmarks, brow_lift=0.0), blur=2.0)
    rows = np.arange(size, dtype=np.float32)[:, None]
    collar = landmarks[_JAW[3], 1]  # below this, the suit and the neck
    hair = hair * (1.0 - face) * np.clip((collar - rows) / 6.0, 0.0, 1.0)
    # A little wider than the hair: its anti-aliased edge must not outline a cut.
    return np.clip(1.5 * _blur(hair, 1.5), 0.0, 1.0)


def _face_outline(p: np.ndarray, brow_lift: float) -> np.ndarray:
    """The face's outline (x, y): jaw line, closed over the brows lifted by ``brow_lift``
    times the face height."""
    height = p[_JAW, 1].max() - p[_BROWS, 1].min()
    top = p[_BROWS[::-1]] - [0.0, brow_lift * height]
    return np.concatenate([p[_JAW], top])


def _face_width(p: np.ndarray) -> float:
    """Width in px of the jaw line of landmarks ``p`` (68, 2): the unit of the painted traits."""
    return p[_JAW, 0].max() - p[_JAW, 0].min()


def _paint(rgb: np.ndarray, colour, opacity: np.ndarray) -> np.ndarray:
    """``colour`` (RGB, or an image like ``rgb``) laid over ``rgb`` (S, S, 3) with
    ``opacity`` (S, S) in [0, 1]."""
    return rgb + (colour - rgb) * opacity[..., None]


def _polygon_mask(size: int, points: np.ndarray, blur: float = 0.0) -> np.ndarray:
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([tuple(map(float, q)) for q in points], fill=255)
    out = np.asarray(mask, dtype=np.float32) / 255.0
    return _blur(out, blur) if blur > 0 else out


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float (H, W) array (separable, edges repeated)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(mask, dtype=np.float32)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], "edge")
        n = out.shape[axis]
        out = sum(
            w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(kernel)
        ).astype(np.float32)
    return out


def _streaks(shape: tuple[int, int], rng: np.random.Generator, stretch: int) -> np.ndarray:
    """Hair texture: noise stretched ``stretch`` times along y (strands), ~[0, 1]."""
    from PIL import Image

    h, w = shape
    small = rng.standard_normal((max(2, h // stretch), w)).astype(np.float32)
    big = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(0.5 + 0.25 * big, 0.0, 1.0)


def _hair_colour(face: dict) -> np.ndarray:
    """RGB in [0, 1] of a speaker's hair: dark brown to fair, greying with age."""
    dark, fair = np.array([0.16, 0.10, 0.06]), np.array([0.62, 0.48, 0.28])
    colour = dark + (fair - dark) * face["hair_light"]
    grey = np.clip((face["age"] - 0.55) / 0.4, 0.0, 1.0)
    return colour + (np.array([0.72, 0.72, 0.70]) - colour) * grey


def identity_face(
    base: tuple[np.ndarray, np.ndarray, np.ndarray], face: dict, rng: np.random.Generator
) -> np.ndarray:
    """A speaker's face from the base photograph: uint8 ``(S, S, 3)``.

    base: as :func:`base_face` returns it. face: as :func:`speaker_attributes` returns it.
    rng: draws the textures (hair strands, beard), so a speaker's face is fixed by it.
    The landmark warp sets the face's shape; then skin tone and age (sallow skin,
    wrinkles), hair colour and length, brows and beard are painted on, each within a
    mask made from the warped landmarks.
    """
    base_image, base_landmarks, base_hair = base
    dest = face_landmarks(base_landmarks, face)
    warped = _warp(np.dstack([base_image / 255.0, base_hair]), base_landmarks, dest)
    rgb, hair = warped[..., :3], np.clip(warped[..., 3], 0.0, 1.0)
    size = rgb.shape[0]
    background = _backdrop(base_image)
    lum = rgb.mean(-1, keepdims=True)

    # Skin: everything that is not hair or backdrop near the face and the neck.
    face_mask = _polygon_mask(size, _face_outline(dest, brow_lift=0.12), blur=3.0)
    # The skin mask reaches over the forehead and ears (hair is taken out of it) and is
    # soft, so that no edge of it shows.
    skin = _blur(_polygon_mask(size, _face_outline(dest, brow_lift=0.4)), 6.0) * (1.0 - hair)
    sallow = 0.25 * face["age"]
    skin_rgb = rgb * (1.0 - sallow) + lum * sallow * np.array([1.05, 1.0, 0.85])
    darkness = float(np.interp(face["tone"], [-FACE_LIMIT, FACE_LIMIT], [1.06, 0.42]))
    warmth = np.array([1 + 0.06 * face["warmth"], 1.0, 1 - 0.08 * face["warmth"]])
    # Darker skin is browner (blue falls faster than red) and keeps its highlights less
    # (a gamma above 1 as well as a gain).
    gains = darkness ** np.array([0.8, 1.0, 1.25]) * warmth
    skin_rgb = np.clip(skin_rgb, 0, 1) ** (1.0 + 0.5 * (1.0 - darkness)) * gains
    neck = _neck_mask(size, dest)
    rgb = _paint(rgb, skin_rgb, np.clip(skin + neck * (1.0 - hair), 0.0, 1.0))
    rgb = _wrinkles(rgb, dest, face["age"], darkness)

    # Hair: recolour the photograph's hair by its own shading, then length.
    colour = _hair_colour(face)
    shade = np.clip(lum / 0.45, 0.0, 1.6)
    if face["hair_length"] > 0:
        rgb = _long_hair(rgb, dest, colour, face["hair_length"], face_mask, rng)
    else:  # short: the sides below the temples are cut back to the backdrop
        temples = dest[_BROWS, 1].mean() + 0.15 * (dest[_JAW, 1].max() - dest[_BROWS, 1].min())
        rows = np.arange(size, dtype=np.float32)[:, None]
        cut = hair * np.clip((rows - temples) / 8.0, 0.0, 1.0)
        rgb = _paint(rgb, background, cut)
        hair = hair * (1.0 - cut)
    rgb = _paint(rgb, np.clip(shade * colour, 0, 1), hair)

    # Brows: heavier and darker for men, in the hair's colour.
    brows = _brow_mask(size, dest, face["beard"])
    brow_colour = colour * 0.6
    rgb = _paint(rgb, brow_colour, brows * (0.35 + 0.45 * (face["beard"] > 0)))
    if face["beard"] > 0:
        rgb = _beard(rgb, dest, colour, face["beard"], rng)
    else:
        rgb = _make_up(rgb, dest, shade)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _warp(image: np.ndarray, src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Thin-plate warp of a float (S, S, C) image moving ``src_points`` to ``dst_points``."""
    import torch

    from speech2face.warp import dense_image_warp, sparse_image_warp

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.permute(2, 0, 1)[None]
    # The thin-plate flow is smooth: fit and evaluate it at half resolution (4x fewer
    # kernel evaluations), upsample it, and warp the full-resolution image with it.
    half = torch.nn.functional.interpolate(tensor, scale_factor=0.5, mode="area")
    # The warp takes (row, col) = (y, x) points; pixel centres map as (p + 0.5) / 2 - 0.5.
    src = torch.from_numpy((src_points[:, ::-1] + 0.5) / 2 - 0.5).float()[None]
    dst = torch.from_numpy((dst_points[:, ::-1] + 0.5) / 2 - 0.5).float()[None]
    with torch.no_grad():
        _, flow = sparse_image_warp(
            half, src, dst, interpolation_order=2, regularization_weight=0.01, num_boundary_points=2
        )
        flow = torch.nn.functional.interpolate(
            flow.permute(0, 3, 1, 2), size=tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        warped = dense_image_warp(tensor, 2.0 * flow.permute(0, 2, 3, 1))
    return warped[0].permute(1, 2, 0).numpy().astype(np.float64)


def _backdrop(image: np.ndarray) -> np.ndarray:
    """The grey backdrop behind the head: each row's colour interpolated between the
    photograph's left and right edges (float (S, S, 3) in [0, 1])."""
    rgb = image.astype(np.float64) / 255.0
    left, right = rgb[:, :6].mean(1), rgb[:, -6:].mean(1)  # (S, 3)
    t = np.linspace(0.0, 1.0, rgb.shape[1])[None, :, None]
    return left[:, None] * (1 - t) + right[:, None] * t


def _neck_mask(size: int, p: np.ndarray) -> np.ndarray:
    """Below the jaw, between its sides, down to the collar."""
    left, right = p[_JAW[4]], p[_JAW[12]]
    bottom = p[_JAW[8], 1] + 0.35 * (right[0] - left[0])
    points = np.array([left, right, [right[0] - 4, bottom], [left[0] + 4, bottom]])
    return _polygon_mask(size, points, blur=4.0)


def _brow_mask(size: int, p: np.ndarray, weight: float) -> np.ndarray:
    """The brows as bands along their landmarks, thicker for a higher ``weight``."""
    from PIL import Image, ImageDraw

    unit = _face_width(p)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = max(2, int(round(unit * (0.03 + 0.02 * weight))))
    for brow in (_BROWS[:5], _BROWS[5:]):
        points = [tuple(map(float, q + [0.0, 0.01 * unit])) for q in p[brow]]
        draw.line(points, fill=255, width=width, joint="curve")
    return _blur(np.asarray(mask, dtype=np.float32) / 255.0, 1.5)


def _wrinkles(rgb: np.ndarray, p: np.ndarray, age: float, darkness: float) -> np.ndarray:
    """Lines of age: nasolabial folds, crow's feet, bags under the eyes, forehead lines."""
    from PIL import Image, ImageDraw

    strength = np.clip((age - 0.3) / 0.6, 0.0, 1.0)
    if strength <= 0:
        return rgb
    size = rgb.shape[0]
    unit = _face_width(p)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)

    def line(points, width=2):
        draw.line([tuple(map(float, q)) for q in points], fill=255, width=width, joint="curve")

    for wing, corner, side in ((31, 48, -1.0), (35, 54, 1.0)):  # nose wing to mouth corner
        a, b = p[wing] + [side * 0.04 * unit, -0.01 * unit], p[corner] + [side * 0.03 * unit, 0]
        mid = (a + b) / 2 + [side * 0.035 * unit, 0]
        line([a, mid, b])
    for corner, side in ((36, -1.0), (45, 1.0)):  # crow's feet
        for dy in (-0.03, 0.0, 0.03):
            start = p[corner] + [side * 0.03 * unit, 0]
            line([start, start + [side * 0.06 * unit, (dy * 1.5) * unit]], width=1)
    for eye in (_RIGHT_EYE, _LEFT_EYE):  # bags: an arc under each eye
        line(p[eye[[3, 4, 5, 0]]] + [0, 0.045 * unit])
    top = p[_BROWS, 1].min()
    for k in (1, 2):  # forehead lines (where the fringe leaves skin)
        y = top - 0.05 * k * unit
        line([[p[_BROWS[1], 0], y + 2], [p[27, 0], y], [p[_BROWS[8], 0], y + 2]], width=1)
    lines = _blur(np.asarray(mask, dtype=np.float32) / 255.0, 1.2)[..., None]
    return rgb * (1.0 - 0.45 * strength * lines)


def _long_hair(rgb, p, colour, length, face_mask, rng) -> np.ndarray:
    """Hair from the temples down past the jaw to the shoulders, behind the face."""
    size = rgb.shape[0]
    unit = _face_width(p)
    top = p[_BROWS, 1].min() - 0.05 * unit
    bottom = min(size + 10.0, p[_JAW[8], 1] + (0.25 + 0.75 * length) * unit)
    spread = (0.12 + 0.1 * length) * unit
    outline = []
    for side, jaw in ((-1.0, _JAW[:9]), (1.0, _JAW[8:][::-1])):
        edge = p[jaw[0]]
        outer = [
            [edge[0] + side * 0.02 * unit, top],
            [edge[0] + side * spread * 0.8, edge[1]],
            [edge[0] + side * spread, bottom],
            [p[_JAW[8], 0] + side * 0.18 * unit, bottom],
            [p[jaw[5], 0] + side * 0.08 * unit, p[jaw[5], 1] + 0.15 * unit],
        ]
        outline.append(np.array(outer))
    mask = np.maximum(
        _polygon_mask(size, outline[0], blur=3.0), _polygon_mask(size, outline[1], blur=3.0)
    )
    mask *= 1.0 - np.clip(face_mask * 1.5, 0.0, 1.0)  # behind the face, not over it
    strands = _streaks(rgb.shape[:2], rng, stretch=24)
    texture = colour * (0.55 + 0.9 * strands[..., None])
    return _paint(rgb, np.clip(texture, 0, 1), mask)


def _make_up(rgb, p, shade) -> np.ndarray:
    """The women's lipstick (shaded by ``shade``, the photograph's own lighting), eye
    shadow on the upper lids and blush on the cheeks: cues that the gender classifier of
    the evaluation reads in its 32-px chip, where the long hair lies outside it
    (docs/results.md: with half-opaque lipstick only, it read 77-84 % of the held-out true
    faces of seeds 0-2 as labelled; with faint shadow and blush besides, 89-94 %; at
    ``_LIPSTICK``, ``_EYE_SHADOW`` and ``_BLUSH``, 97-100 %)."""
    size = rgb.shape[0]
    unit = _face_width(p)
    # Lipstick: the outer lip line minus the open mouth.
    lips = _polygon_mask(size, p[_MOUTH[:12]], 1.0) - _polygon_mask(size, p[_MOUTH[12:]])
    lip_colour = np.array([0.78, 0.18, 0.25]) * np.clip(shade * 0.9, 0.4, 1.2)
    rgb = _paint(rgb, lip_colour, _LIPSTICK * np.clip(lips, 0, 1))
    shadow = np.zeros((size, size), np.float32)
    for lid, brow in ((p[_RIGHT_EYE[:4]], p[_BROWS[:5]]), (p[_LEFT_EYE[:4]], p[_BROWS[5:]])):
        upper = lid[::-1] + (brow.mean(0) - lid.mean(0)) * 0.55
        shadow = np.maximum(shadow, _polygon_mask(size, np.concatenate([lid, upper]), blur=2.0))
    rgb = _paint(rgb, np.array([0.35, 0.22, 0.40]), _EYE_SHADOW * shadow)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    blush = np.zeros((size, size), np.float32)
    for eye, mouth in ((p[_RIGHT_EYE[0]], p[_MOUTH[0]]), (p[_LEFT_EYE[3]], p[_MOUTH[6]])):
        centre = 0.45 * eye + 0.55 * mouth + [np.sign(eye[0] - mouth[0]) * 0.06 * unit, 0.0]
        blush += np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * (0.07 * unit) ** 2))
    return _paint(rgb, np.array([0.85, 0.35, 0.40]), _BLUSH * np.clip(blush, 0, 1))


def _beard(rgb, p, colour, amount, rng) -> np.ndarray:
    """Stubble (small ``amount``) to a full beard and moustache, leaving the lips bare."""
    size = rgb.shape[0]
    unit = _face_width(p)
    nose_base = p[33, 1]
    jaw = p[_JAW[2:15]] + np.array([0.0, 0.02 * unit]) * np.sin(np.linspace(0, np.pi, 13))[:, None]
    upper = np.array([
        [p[_JAW[14], 0] - 0.02 * unit, nose_base], p[35] + [0, 0.02 * unit],
        p[31] + [0, 0.02 * unit], [p[_JAW[2], 0] + 0.02 * unit, nose_base],
    ])
    region = _polygon_mask(size, np.concatenate([jaw, upper]), blur=4.0)
    lips = _polygon_mask(size, p[_MOUTH[:12]], blur=1.0)
    region *= 1.0 - lips
    # Short dark strands over a shadow: denser and darker for a fuller beard.
    strands = _streaks(rgb.shape[:2], rng, stretch=3)
    alpha = region * (0.15 + 0.35 * amount) * (0.55 + 0.6 * strands)
    beard_colour = colour * 0.5
    return _paint(rgb, beard_colour, alpha)


def face_landmarks(base: np.ndarray, face: dict) -> np.ndarray:
    """Move the base landmarks ``(68, 2)`` (x, y) by a speaker's face parameters."""
    p = np.array(base, dtype=np.float64)
    unit = _face_width(p)
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
        1 + 0.12 * face["width"] * (1.2 - 0.6 * lowness)
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
    from speech2face.runtime import torch_threads
    from speech2face.utils import progress as tqdm

    out = Path(out)
    for name, value in (("speakers", speakers), ("frames", frames)):
        if not is_whole(value, 1):
            raise DataError(None, f"{name} must be a whole number of at least 1, got {value!r}")
    for name, span in (("videos", videos), ("clips", clips)):
        if not (isinstance(span, (tuple, list)) and len(span) == 2
                and all(is_whole(v, 1) for v in span) and span[0] <= span[1]):
            raise DataError(None, f"{name} must be a range (low, high) of whole numbers, "
                                  f"1 <= low <= high, got {span!r}")
    if problem := seed_problem(seed):
        raise DataError(None, problem)
    settings = {"speakers": speakers, "seed": seed, "videos": list(videos),
                "clips": list(clips), "frames": frames}
    if out.exists() and (not out.is_dir() or output_entries(out)):
        made = _corpus_settings(out)
        if made == settings:  # a finished corpus of these settings: a rerun is a no-op
            return out
        if made is not None:
            raise DataError(out, f"holds a demo corpus made with other settings ({made}); "
                                 "use a new --out")
        raise DataError(out, "output folder exists and is not empty")
    # The warps are small: one thread avoids OpenMP spin-waiting on a busy machine
    # (10-50x slower with 2 threads under load). Restored on the way out.
    with torch_threads(1), publishing_dir(out) as tmp:
        rng = np.random.default_rng(seed)
        people = _make_speakers(speakers, rng)
        base = base_face()
        # Speakers are independent (each has its own generator), so threads can write
        # them in any order: numpy, PIL and the warp release the GIL for their heavy
        # work. The corpus is the same for any number of workers.
        with ThreadPoolExecutor(max(1, min(workers, speakers))) as pool:
            jobs = [
                pool.submit(_write_speaker, tmp, person, base, seed, videos, clips, frames)
                for person in people
            ]
            try:
                for job in tqdm(
                    as_completed(jobs), total=len(jobs), desc="make-demo-data", unit="speaker",
                    disable=not progress,
                ):
                    job.result()
            except BaseException:  # Ctrl-C, SIGTERM, a failure: stop after the running ones
                pool.shutdown(cancel_futures=True)  # (else the pool wrote every speaker first)
                raise
        _write_metadata(tmp, people, seed, settings)
    return out


def _corpus_settings(root: Path) -> dict | None:
    """The settings a finished demo corpus was made with, or None (not one)."""
    try:
        made = json.loads((root / ATTRIBUTES_FILE).read_text()).get("settings")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return made if isinstance(made, dict) else None


def _write_speaker(tmp: Path, person: Speaker, base, seed: int, videos, clips, frames) -> None:
    """All videos of one speaker: face frames (JPEG) and speech clips (WAV)."""
    from PIL import Image

    # One generator per speaker for its recordings, seeded by (seed, identity): its clips
    # and frames do not depend on the other speakers' draws.
    number = int(person.identity[2:])
    srng = np.random.default_rng([seed, number])
    # The face's textures (hair strands, beard) from a generator of their own.
    face = identity_face(base, person.face, np.random.default_rng([seed, number, 1]))
    for _ in range(int(srng.integers(videos[0], videos[1] + 1))):
        video = _video_id(srng)
        frame_dir = tmp / "unzippedFaces" / person.name / "1.6" / video
        frame_dir.mkdir(parents=True)
        video_look = jitter_frame(face, srng, pose=1.0, light=1.0)
        frame_no = int(srng.integers(1, 500))
        for _ in range(frames):
            picture = jitter_frame(video_look, srng, pose=0.3, light=0.3)
            Image.fromarray(picture).save(
                frame_dir / f"{frame_no:07d}.jpg", quality=90, comment=GENERATED_LABEL
            )
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


def _write_metadata(root: Path, people: list[Speaker], seed: int, settings: dict) -> None:
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
        "settings": settings,  # make_demo_data's arguments: a rerun of them does nothing
        "latent_dims": N_LATENTS,
        "sample_rate": SAMPLE_RATE,
        "frame_size": FRAME_SIZE,
        "speakers": [asdict(p) for p in people],
    }
    (root / ATTRIBUTES_FILE).write_text(json.dumps(attributes, indent=1) + "\n")


def load_demo_attributes(root: str | os.PathLike) -> dict[str, Speaker]:
    """The hidden attributes of a generated corpus, by identity (from demo_attributes.json)."""
    path = Path(root) / ATTRIBUTES_FILE
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
    from speech2face.cli import bounded, seed

    count = bounded(int, 1, None, "count")

    parser.add_argument(
        "-o", "--out", required=True,
        help="output folder (must not exist or be empty; a corpus of the same settings "
             "there is kept: the rerun does nothing)"
    )
    parser.add_argument(
        "--speakers", type=bounded(int, 1, MAX_SPEAKERS, "count"), default=40,
        help="number of identities (default 40)"
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="random seed; same seed, same corpus (default 0)"
    )
    parser.add_argument(
        "--workers", type=count, default=2, help="threads writing speakers (default 2)"
    )
    parser.add_argument(
        "--frames",
        type=bounded(int, 1, MAX_FRAMES, "count"),
        default=FRAMES_PER_VIDEO,
        help=f"face frames per video (default {FRAMES_PER_VIDEO})",
    )


def make_demo_data_command(args) -> int:
    start = time.perf_counter()
    done = Path(args.out, ATTRIBUTES_FILE).is_file()
    out = make_demo_data(
        args.out, speakers=args.speakers, seed=args.seed, frames=args.frames, workers=args.workers
    )
    n_wav = sum(1 for _ in (out / "wav").rglob("*.wav"))
    n_jpg = sum(1 for _ in (out / "unzippedFaces").rglob("*.jpg"))
    when = "already generated" if done else f"in {time.perf_counter() - start:.1f} s"
    print(f"{out}: {args.speakers} speakers, {n_wav} clips, {n_jpg} face frames {when}")
    return 0
