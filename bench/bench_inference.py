"""Inference latency and evaluation throughput on the CPU.

- ``reconstruct`` of a 6-s clip with the paper-size model (Table 1 voice encoder, Cole
  et al. decoder at 224 px, 4096-D features; random weights in a temporary bundle):
  in-process with the model already loaded, against the bare forward pass of the same
  model on a precomputed spectrogram (the ratio is the pipeline's overhead: decoding,
  STFT, warp, conversion); and as a fresh process (``python -m speech2face reconstruct``,
  including interpreter start, imports and loading the bundle) against the in-process
  call.
- ``evaluate`` throughput in test samples per second for the tiny preset (the demo's
  model), with and without the attribute classifiers, against the voice encoder's own
  forward throughput.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RATE = 16_000
CLIP_SECONDS = 6.0


def _mean_landmarks() -> torch.Tensor:
    angles = torch.linspace(0, 2 * math.pi, 69)[:-1]
    return torch.stack([112 + 60 * torch.cos(angles), 112 + 70 * torch.sin(angles)], dim=1)


def _model(preset: str, feature_dim: int):
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    decoder_config = getattr(FaceDecoderConfig, preset)(feature_dim)
    voice_config = getattr(VoiceEncoderConfig, preset)(feature_dim)
    return Speech2Face(FaceDecoder(decoder_config, _mean_landmarks()), VoiceEncoder(voice_config),
                       None, "vggface" if feature_dim == 4096 else "dlib").eval()


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 3 * t)) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (0.3 * wave / np.abs(wave).max() + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _reconstruct_rows(quick: bool, folder: Path) -> tuple[list[dict], dict]:
    import soundfile as sf

    from speech2face.audio import spectrogram
    from speech2face.inference import reconstruct, resolve_model
    from speech2face.model import save_model

    model = _model("paper", 4096)
    params = sum(p.numel() for p in model.parameters())
    bundle = save_model(model, folder / "paper-bundle")
    del model
    clip = folder / "clip.wav"
    sf.write(clip, _speech(CLIP_SECONDS), RATE)

    start = time.perf_counter()
    loaded = resolve_model(bundle)
    load_s = time.perf_counter() - start
    repeats = 2 if quick else 5
    reconstruct(clip, loaded)  # warm-up: first-call allocations
    in_process = _timed(lambda: reconstruct(clip, loaded), repeats)

    spec = spectrogram(torch.from_numpy(_speech(CLIP_SECONDS))[None])  # as reconstruct makes it
    with torch.inference_mode():
        forward = _timed(lambda: loaded.decode(loaded.predict_features(spec)), repeats)

    command = [sys.executable, "-m", "speech2face", "reconstruct", str(clip), "-o",
               str(folder / "face.png"), "--model", str(bundle)]
    fresh = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        fresh.append(time.perf_counter() - start)

    med = statistics.median
    rows = [
        {"benchmark": "reconstruct 6 s, paper model, CPU, in-process (s)",
         "result": round(med(in_process), 2), "reference": round(med(forward), 2),
         "ratio": round(med(in_process) / med(forward), 2),
         "target": "reference = bare forward; ratio ~1 (overhead small)"},
        {"benchmark": "reconstruct 6 s, paper model, CPU, fresh process (s)",
         "result": round(med(fresh), 2), "reference": round(med(in_process), 2),
         "ratio": round(med(fresh) / med(in_process), 2),
         "target": "reference = in-process call; result < 30 s"},
    ]
    details = {"paper_model_parameters": params, "bundle_load_s": round(load_s, 2),
               "in_process_s": [round(t, 3) for t in in_process],
               "forward_only_s": [round(t, 3) for t in forward],
               "fresh_process_s": [round(t, 3) for t in fresh],
               "torch_threads": torch.get_num_threads()}
    return rows, details


def _batches(n: int, batch: int, feature_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        yield {
            "wave": torch.from_numpy(np.stack([_speech(CLIP_SECONDS, seed + start + i)
                                               for i in range(b)])),
            "feature": torch.from_numpy(rng.normal(size=(b, feature_dim)).astype(np.float32)),
            "face": torch.from_numpy(rng.random((b, 3, 224, 224), dtype=np.float32)),
            "identity_index": torch.arange(start, start + b) % max(n // 2, 2),
        }


def _evaluate_rows(quick: bool) -> tuple[list[dict], dict]:
    from speech2face.audio import spectrogram
    from speech2face.evaluate import collect, compute_metrics

    model = _model("tiny", 128)
    n, batch = (32, 16) if quick else (128, 16)
    rates = {}
    for attributes in (False, True):
        data = list(_batches(n, batch, 128))
        start = time.perf_counter()
        collected = collect(model, data, attributes=attributes, progress=False)
        compute_metrics(collected, gallery_size=100, draws=50)
        rates[attributes] = n / (time.perf_counter() - start)
    spec = spectrogram(next(_batches(batch, batch, 128))["wave"])
    with torch.inference_mode():
        forward = statistics.median(_timed(lambda: model.predict_features(spec), 3))
    encoder_rate = batch / forward
    rows = [
        {"benchmark": "evaluate, tiny model, CPU (samples/s)", "result": round(rates[False], 1),
         "reference": round(encoder_rate, 1), "ratio": round(rates[False] / encoder_rate, 2),
         "target": "reference = voice encoder forward alone"},
        {"benchmark": "evaluate with attributes, tiny model, CPU (samples/s)",
         "result": round(rates[True], 1), "reference": round(rates[False], 1),
         "ratio": round(rates[True] / rates[False], 2),
         "target": "reference = evaluate without attributes"},
    ]
    return rows, {"evaluate_samples": n, "batch_size": batch}


def run(quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="s2f-bench-") as tmp:
        rows, details = _reconstruct_rows(quick, Path(tmp))
    eval_rows, eval_details = _evaluate_rows(quick)
    return {"rows": rows + eval_rows, "details": {**details, **eval_details}}
