"""Spectrogram throughput, decode and resample included, against the common librosa path.

Both paths read the same 48 kHz stereo WAV files on one thread, in alternating rounds
so that load from other processes hits both alike. Ours: ``load_audio(max_seconds=6)``
(libsndfile partial read + soxr) -> ``fit_duration`` -> ``spectrogram`` (torch.stft).
librosa: ``librosa.load(sr=16000)`` (whole file, soxr_hq) -> cut to 6 s ->
``librosa.stft(n_fft=512, hop_length=160, win_length=400)`` -> power law.

A third row splits our 8-s path into its stages, each timed alone on the same clips, to
show where the time goes and the ceiling any path with soxr-HQ resampling has: the
resampler and the FFT alone, with decoding and the power law free, would be
``librosa / (resample + FFT)`` times faster than librosa.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speech2face.audio import N_FFT, WIN_LENGTH, fit_duration, load_audio, spectrogram


def librosa_path(path: Path) -> np.ndarray:
    import librosa

    wave, _ = librosa.load(path, sr=16000)
    wave = fit_duration(wave, 6.0)
    spec = librosa.stft(wave, n_fft=512, hop_length=160, win_length=400)
    return np.stack([np.sign(p) * np.abs(p) ** 0.3 for p in (spec.real, spec.imag)])


def our_path(path: Path) -> torch.Tensor:
    return spectrogram(fit_duration(load_audio(path, max_seconds=6.0), 6.0))


def write_clips(
    folder: Path, n: int, seconds: float, rate: int = 48000, channels: int = 2
) -> list[Path]:
    """``n`` 16-bit WAVs of a modulated tone with a little noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        t = np.arange(int(rate * seconds)) / rate
        voice = np.sin(2 * np.pi * (110 + 10 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        gains = [1.0, 0.8][:channels]
        wave = 0.2 * np.stack([g * voice for g in gains], axis=1)
        wave += 0.01 * rng.standard_normal((len(t), channels))
        paths.append(folder / f"clip{i}.wav")
        sf.write(paths[-1], wave.astype(np.float32), rate, subtype="PCM_16")
    return paths


def clips_per_second(fn, paths) -> float:
    start = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - start)


def stage_times_ms(paths, rounds: int) -> dict[str, float]:
    """Median per-clip milliseconds of each stage of ``our_path``, timed separately."""
    import soxr

    native = [load_audio(p, sample_rate=48000, max_seconds=6.05) for p in paths]
    waves = [fit_duration(soxr.resample(w, 48000, 16000, quality="HQ"), 6.0) for w in native]
    padded = [torch.nn.functional.pad(torch.from_numpy(w), (0, N_FFT - WIN_LENGTH)) for w in waves]
    window = torch.hann_window(N_FFT)  # the shape and cost of ours, not its values
    stages = {
        "decode + downmix (48 kHz)": lambda i: load_audio(paths[i], 48000, max_seconds=6.05),
        "resample (soxr HQ)": lambda i: soxr.resample(native[i], 48000, 16000, quality="HQ"),
        "spectrogram (STFT + power law)": lambda i: spectrogram(waves[i]),
        "of which torch.stft": lambda i: torch.stft(
            padded[i], N_FFT, 160, window=window, center=False, return_complex=True
        ),
    }
    times = {}
    for name, stage in stages.items():
        stage(0)
        runs = []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(len(paths)):
                stage(i)
            runs.append((time.perf_counter() - start) / len(paths) * 1e3)
        times[name] = statistics.median(runs)
    return times


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    rounds = 3 if quick else 9
    rows, details = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        # (rate, channels, seconds, target): the issue's 48 kHz files, and VoxCeleb1's own
        # format (16 kHz mono, nothing to resample) for information.
        cases = [(48000, 2, 8.0, ">= 10x"), (48000, 2, 30.0, ">= 10x"),
                 (16000, 1, 8.0, "(VoxCeleb1's format, no resampling)")]
        for rate, channels, seconds, target in cases:
            name = f"{rate // 1000}k{channels}ch{seconds:g}s"
            paths = write_clips(Path(tmp) / name, 4 if quick else 12, seconds, rate, channels)
            ours, ref = [], []
            for fn in (our_path, librosa_path):  # warm-up: imports, FFT plans
                fn(paths[0])
            for _ in range(rounds):
                ours.append(clips_per_second(our_path, paths))
                ref.append(clips_per_second(librosa_path, paths))
            ours_m, ref_m = statistics.median(ours), statistics.median(ref)
            details[name] = {"ours_clips_per_s": ours, "librosa_clips_per_s": ref}
            layout = "stereo" if channels == 2 else "mono"
            rows.append(
                {
                    "benchmark": f"spectrogram, {rate // 1000} kHz {layout} {seconds:g}-s WAV, "
                    "1 thread",
                    "result": f"{ours_m:.0f} clips/s",
                    "reference": f"librosa {ref_m:.0f} clips/s",
                    "ratio": f"{ours_m / ref_m:.1f}x",
                    "target": target,
                }
            )
            if (rate, seconds) == (48000, 8.0):
                stages = stage_times_ms(paths, rounds)
                details["8s_stages_ms"] = stages
                floor = stages["resample (soxr HQ)"] + stages["of which torch.stft"]
                librosa_ms = 1e3 / ref_m
                rows.append(
                    {
                        "benchmark": "8-s path by stage, ms/clip: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()),
                        "result": f"resample + FFT alone {floor:.2f} ms",
                        "reference": f"librosa {librosa_ms:.2f} ms",
                        "ratio": f"ceiling {librosa_ms / floor:.1f}x",
                        "target": "(explains the row above)",
                    }
                )
    return {"rows": rows, "details": details}
