"""Speech in, face out: ``reconstruct(audio) -> uint8 (224, 224, 3)`` and its CLI.

The pipeline is the paper's test-time path (Oh et al. 2019, Fig. 2): the first 6 s of
speech (repeated when shorter), the compressed complex spectrogram, the voice encoder's
face feature, and the face decoder's canonical face. Any audio or video file that
:func:`speech2face.audio.load_audio` reads works.

Without a model argument the model trained by ``speech2face demo`` is used, from the
user cache (``speech2face.utils.cache_dir() / "models" / "demo"``), where
``load_model("demo")`` finds it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from speech2face.errors import AudioError, WeightsError
from speech2face.utils import IMAGE_SUFFIXES, cache_dir, find_inputs, png_bytes, staged_writes

OUTPUT_SIZE = 224  # side of the returned face, the paper's crop size (section 3)
DEMO_MODEL_NAME = "demo"  # cache_dir() / "models" / DEMO_MODEL_NAME holds the demo's bundle
BATCH_SIZE = 8  # clips per forward pass in the CLI


def default_model_path() -> Path:
    """Where ``speech2face demo`` leaves its trained bundle for ``reconstruct``."""
    return cache_dir() / "models" / DEMO_MODEL_NAME  # where load_model looks up names


@dataclass
class Reconstruction:
    """One face reconstructed from speech.

    ``image``: uint8 ``(224, 224, 3)``; ``landmarks``: float32 ``(68, 2)`` (x, y) pixels
    in the 224 frame; ``feature``: float32 ``(D,)``, the voice encoder's face feature.
    """

    image: np.ndarray
    landmarks: np.ndarray
    feature: np.ndarray


@lru_cache(maxsize=2)
def _load_cached(folder: str, stamp: int):
    from speech2face.model import load_model

    return load_model(folder)


def resolve_model(model=None):
    """A loaded :class:`speech2face.model.Speech2Face` from a bundle path, a model or ``None``.

    ``None`` means the demo's model in the user cache. Loaded bundles are kept (two at
    most, keyed by path and weights' modification time) so repeated calls are cheap.

    Raises:
        WeightsError: no model given and no demo model cached, or a bad bundle.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        from speech2face.model import Speech2Face

        if not isinstance(model, Speech2Face):
            raise WeightsError(None, f"model must be a Speech2Face model or a bundle path, "
                                     f"got {type(model).__name__}")
        if getattr(model, "voice_encoder", None) is None:
            raise WeightsError(None, "this model has no voice encoder (a stage-1, decoder-only "
                                     "bundle); pass a bundle trained with `speech2face train`")
        return model
    if model is None:
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise WeightsError(path, "no model given and no demo model here; run `speech2face "
                                     "demo` to train one, or pass --model BUNDLE")
    else:
        if os.fspath(model) in ("", b""):  # Path("") would be the current folder
            raise WeightsError(None, "model is an empty path")
        path = Path(model)
    from speech2face.model import WEIGHTS_NAME, find_bundle

    folder = find_bundle(path)
    weights = folder / WEIGHTS_NAME
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    loaded = _load_cached(str(folder.resolve()), stamp)
    if loaded.voice_encoder is None:
        raise WeightsError(folder, "this bundle has no voice encoder (a stage-1, decoder-only "
                                   "bundle); pass a bundle trained with `speech2face train`")
    return loaded


def prepare_audio(audio, seconds: float | None = None) -> np.ndarray:
    """A path or a float waveform at 16 kHz -> float32 ``(CLIP_SAMPLES,)`` (6 s; shorter
    audio repeated end to end).

    Raises:
        AudioError: an unreadable file, or an array that is empty, not 1-D or not finite.
    """
    from speech2face.audio import (
        CLIP_SECONDS,
        MIN_SECONDS,
        SAMPLE_RATE,
        check_signal,
        fit_duration,
        load_audio,
        seconds_samples,
    )

    seconds = CLIP_SECONDS if seconds is None else seconds
    if isinstance(audio, (str, os.PathLike)):
        wave = load_audio(audio, max_seconds=seconds)
    elif not isinstance(audio, (np.ndarray, torch.Tensor, list, tuple)):
        raise AudioError(None, f"audio must be a file path or a float waveform array, not "
                               f"{type(audio).__name__} (decode bytes or a file object "
                               f"first, or save it to a file)")
    else:
        wave = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio)
        if wave.ndim != 1:
            raise AudioError(None, f"audio array must be mono (N,), got shape {wave.shape}")
        if wave.size == 0:
            raise AudioError(None, "audio array is empty")
        if not np.issubdtype(wave.dtype, np.floating):
            raise AudioError(None, f"audio array must be float in [-1, 1], got {wave.dtype}")
        with np.errstate(over="ignore"):  # checked after the cast: 1e39 overflows to inf
            wave = wave.astype(np.float32)
        if not np.isfinite(wave).all():
            raise AudioError(None, "audio array contains NaN or infinite samples "
                                   "(or values beyond float32's range)")
        check_signal(wave, "audio array")
        if wave.size < seconds_samples(MIN_SECONDS, SAMPLE_RATE):
            raise AudioError("audio array", f"too short: {wave.size} samples at 16 kHz, at "
                                            f"least {MIN_SECONDS} s is needed")
    return np.ascontiguousarray(fit_duration(wave, seconds=seconds))


def to_uint8_images(images: torch.Tensor, size: int = OUTPUT_SIZE) -> np.ndarray:
    """``(B, 3, S, S)`` floats in [0, 1] -> uint8 ``(B, size, size, 3)``.

    A decoder that renders smaller than ``size`` (the tiny preset renders 64 px) is
    upsampled bilinearly.
    """
    images = images.detach().float()
    if images.shape[-1] != size or images.shape[-2] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False)
    array = (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)  # to nearest, ties up
    return array.permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def reconstruct_waves(waves: np.ndarray, model) -> list[Reconstruction]:
    """Faces for a batch of 16-kHz clips ``(B, N)`` with a loaded model."""
    from speech2face.audio import spectrogram
    from speech2face.model import borrowed

    weight = next(model.parameters())
    with borrowed(model, weight.device):  # in eval mode; the caller's mode restored after
        spec = spectrogram(torch.as_tensor(waves, device=weight.device))  # (B, 2, T, 257)
        features = model.predict_features(spec.to(weight.dtype))  # (B, D)
        decoded = model.decode(features)
    images = to_uint8_images(decoded.image)
    landmarks = decoded.landmarks.float().cpu().numpy()
    features = features.float().cpu().numpy()
    return [Reconstruction(images[i], landmarks[i], features[i]) for i in range(len(images))]


def reconstruct_face(audio, model=None) -> Reconstruction:
    """Like :func:`reconstruct`, with the landmarks and the face feature as well."""
    loaded = resolve_model(model)
    return reconstruct_waves(prepare_audio(audio)[None], loaded)[0]


def reconstruct(audio, model=None) -> np.ndarray:
    """Reconstruct the canonical face of the speaker of ``audio``.

    Args:
        audio: an audio or video file path, or a float waveform ``(N,)`` in [-1, 1] at
            16 kHz. The first 6 s are used; shorter speech is repeated to 6 s.
        model: a bundle path (or training run), a loaded
            :class:`speech2face.model.Speech2Face`, or ``None`` for the model trained by
            ``speech2face demo``.

    Returns:
        uint8 ``(224, 224, 3)`` RGB image.
    """
    return reconstruct_face(audio, model).image


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """A copy of a uint8 ``(H, W, 3)`` image with ``(68, 2)`` (x, y) points drawn on it."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for x, y in landmarks:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 255, 0))
    return np.asarray(canvas)


def _output_paths(inputs: list[tuple[Path, Path]], out: Path) -> list[Path]:
    """One PNG per ``(input, stem)``: ``OUT`` itself for a single input when it is named
    ``*.png``, else ``OUT/<stem>.png`` (stems from ``utils.find_inputs``).

    Refuses (ConfigError) an ``OUT`` named like an image file where it would become a
    folder: another image type (the faces are written as PNG), or several inputs."""
    from speech2face.errors import ConfigError

    suffix = out.suffix.lower()
    if suffix in IMAGE_SUFFIXES and not out.is_dir():
        if suffix != ".png":
            raise ConfigError(out, "reconstruct writes PNG images; name a .png file or a folder")
        if len(inputs) > 1:
            raise ConfigError(out, f"names one image, but {len(inputs)} inputs were given; "
                                   "name a folder for them")
        return [out]
    return [out / f"{stem}.png" for _, stem in inputs]


# --------------------------------------------------------------------------- CLI


def add_reconstruct_arguments(parser) -> None:
    parser.add_argument("audio", nargs="+", type=Path, metavar="AUDIO",
                        help="audio or video files (wav, flac, mp3, ogg, m4a, mp4, webm, ...) "
                             "or folders of them")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output folder (one PNG per input), or a .png file for one input")
    parser.add_argument("--model", default=None,
                        help="model bundle or training run (default: the model trained by "
                             "`speech2face demo`, in the user cache)")
    parser.add_argument("--landmarks", action="store_true",
                        help="also write the predicted 68 landmarks: <name>.landmarks.json "
                             "((x, y) in the 224 frame) and <name>.landmarks.png")
    from speech2face.cli import device

    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device: cpu (default), cuda, cuda:N or mps")


LANDMARK_OUTPUTS = (".landmarks.json", ".landmarks.png")  # beside NAME.png, with --landmarks


def _result_files(png: Path, result: Reconstruction, landmarks: bool) -> dict[Path, bytes]:
    """The face ``png`` and, with ``landmarks``, its landmarks beside it, as bytes."""
    files = {png: png_bytes(result.image)}
    if landmarks:
        base = png.with_suffix("")
        points = np.round(result.landmarks.astype(float), 3).tolist()
        as_json, drawn = LANDMARK_OUTPUTS
        files[Path(f"{base}{as_json}")] = (json.dumps(
            {"format": "(x, y) pixels in the 224x224 face, iBUG 68-point order",
             "landmarks": points}) + "\n").encode()
        files[Path(f"{base}{drawn}")] = png_bytes(
            draw_landmarks(result.image, result.landmarks))
    return files


def reconstruct_command(args) -> int:
    from speech2face.audio import MEDIA_SUFFIXES
    from speech2face.model import weights_digest
    from speech2face.utils import progress as tqdm
    from speech2face.utils import resumable_writes

    # All or nothing: every output is staged and renamed into place when all inputs are
    # done, so a bad file stops the command with no partial output; inputs are decoded a
    # batch at a time, so memory does not grow with them. A killed run's faces are kept
    # for its rerun (utils.resumable_writes), batch by batch so that a resumed run's
    # batches, and so its faces, are those of an unbroken run.
    outputs = (".png", *LANDMARK_OUTPUTS) if args.landmarks else (".png",)
    inputs = find_inputs(args.audio, MEDIA_SUFFIXES, AudioError, outputs=outputs, out=args.out)
    if not inputs:
        raise AudioError(args.audio[0], "no audio or video files found")
    pngs = _output_paths(inputs, args.out)
    model = resolve_model(args.model).to(args.device)
    if pngs == [args.out]:  # one face, to the file named: written whole or not at all
        with staged_writes() as stage:
            result = reconstruct_waves(prepare_audio(inputs[0][0])[None], model)[0]
            for path, data in _result_files(args.out, result, args.landmarks).items():
                with stage(path) as f:
                    f.write(data)
        print(args.out)
        return 0
    run = {"command": "reconstruct", "model": weights_digest(model),
           "landmarks": args.landmarks}

    def names(png: Path) -> list[str]:
        return [str(png.relative_to(args.out))[:-len(".png")] + suffix for suffix in outputs]

    # The bar closes (erasing itself) before an error leaves: the error is the last line.
    with resumable_writes(args.out, run) as saved, \
            tqdm(total=len(inputs), desc="faces", unit="file", disable=len(inputs) < 4) as bar:
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = list(zip(inputs[start:start + BATCH_SIZE], pngs[start:start + BATCH_SIZE],
                             strict=True))
            if all(saved.done(name, path) for (path, _), png in batch for name in names(png)):
                bar.update(len(batch))
                continue
            waves = np.stack([prepare_audio(path) for (path, _), _ in batch])
            for ((path, _), png), result in zip(batch, reconstruct_waves(waves, model),
                                                strict=True):
                files = _result_files(png, result, args.landmarks)
                saved.write({str(p.relative_to(args.out)): data for p, data in files.items()},
                            path)
            bar.update(len(batch))
    for png in pngs:
        print(png)
    return 0
