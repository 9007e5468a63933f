"""The Resemblyzer baseline voice encoder against Resemblyzer's own pipeline and librosa."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from speech2face import resemblyzer_encoder as rz
from speech2face.audio import SAMPLE_RATE, spectrogram

# Resemblyzer's wheel holds the weights and the reference pipeline. Only looked up here:
# importing it loads librosa, which only the tests comparing with it need.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("resemblyzer") is None,
                                reason="resemblyzer is not installed (make installs it)")


def _voice(seconds: float = 6.0, f0: float = 120.0, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: a gliding harmonic series through two formants,
    syllable-rate amplitude changes and a little noise, at a quiet level."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    wave = np.zeros_like(t)
    for h in range(1, 30):
        f = h * pitch
        gain = np.exp(-((f - 500) / 300) ** 2) + 0.6 * np.exp(-((f - 1500) / 400) ** 2) + 0.02
        wave += gain * np.sin(h * phase) / h
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    wave += 0.01 * rng.normal(size=t.size)
    return (0.05 * wave / np.abs(wave).max()).astype(np.float32)


def test_mel_filterbank_equals_librosa():
    librosa = pytest.importorskip("librosa")
    reference = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=40)
    np.testing.assert_allclose(rz.mel_filterbank().numpy(), reference, rtol=1e-5, atol=1e-7)


def test_partials_match_resemblyzer():
    from resemblyzer import VoiceEncoder

    for n_frames in (1, 100, 160, 200, 237, 598, 1000, 1234):
        n_samples = (n_frames - 1) * 160 + 400
        _, mel_slices = VoiceEncoder.compute_partial_slices(n_samples, rz.PARTIAL_RATE,
                                                            rz.MIN_COVERAGE)
        assert rz.partial_starts(n_frames) == [s.start for s in mel_slices], n_frames


def test_mels_equal_a_numpy_stft_of_the_volume_normalised_wave():
    librosa = pytest.importorskip("librosa")
    from resemblyzer.audio import normalize_volume

    wave = _voice(2.0)
    encoder = rz.ResemblyzerEncoder(pretrained=False)
    ours = encoder.mels(spectrogram(wave)[None])[0].double().numpy()  # (T, 40)
    # Reference: float64 numpy frames (center=False, as ours) of the wave Resemblyzer's
    # preprocessing would make (-30 dBFS, louder never), with librosa's mel filters.
    loud = normalize_volume(wave.astype(np.float64), rz.TARGET_DBFS, increase_only=True)
    window = np.hanning(401)[:400]  # periodic Hann
    starts = range(0, len(loud) - 400 + 1, 160)
    power = np.array([np.abs(np.fft.rfft(loud[s:s + 400] * window)) ** 2 for s in starts])
    reference = power @ librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=40).T
    assert ours.shape == reference.shape
    # The loudness is measured from the frames, not the samples: equal within a few %.
    ratio = ours.sum() / reference.sum()
    assert 0.9 < ratio < 1.1
    np.testing.assert_allclose(ours / ratio, reference, rtol=1e-3, atol=1e-6 * reference.max())


def test_embedding_matches_resemblyzer_embed_utterance():
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import normalize_volume

    reference = VoiceEncoder(device="cpu", verbose=False)
    encoder = rz.ResemblyzerEncoder().eval()
    waves = [_voice(6.0, f0=110, seed=1), _voice(6.0, f0=220, seed=2)]
    ours = encoder.embed(spectrogram(np.stack(waves))).numpy()
    theirs = np.stack([reference.embed_utterance(
        normalize_volume(w, rz.TARGET_DBFS, increase_only=True)) for w in waves])
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    cosine = (ours * theirs).sum(1) / norms
    # Frames start 2.5 ms apart (center=False): the same voice, nearly the same vector.
    assert np.all(cosine > 0.99), cosine
    # ...and distinctly different voices stay apart as Resemblyzer keeps them.
    assert (ours[0] @ ours[1]) == pytest.approx(theirs[0] @ theirs[1], abs=0.02)


def test_only_the_mlp_trains_and_the_output_has_the_feature_size():
    torch.manual_seed(0)
    encoder = rz.ResemblyzerEncoder(rz.ResemblyzerEncoderConfig(output_dim=16)).train()
    assert not encoder.speaker.training
    spec = spectrogram(torch.from_numpy(np.stack([_voice(2.0), _voice(2.0, 200)])))
    out = encoder(spec)
    assert out.shape == (2, 16)
    out.square().sum().backward()
    assert all(p.grad is None for p in encoder.speaker.parameters())
    assert all(p.grad is not None for p in encoder.mlp.parameters())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == 256 * 512 + 512 + 512 * 16 + 16


def test_weights_are_checked(tmp_path):
    from speech2face.errors import WeightsError

    bad = tmp_path / "pretrained.pt"
    bad.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="SHA-256"):
        rz.load_speaker_weights(bad)
    with pytest.raises(WeightsError, match="cannot read"):
        rz.load_speaker_weights(tmp_path / "missing.pt")


def test_config_round_trip():
    config = rz.ResemblyzerEncoderConfig(output_dim=64, hidden_dims=(128, 64))
    assert rz.ResemblyzerEncoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        rz.ResemblyzerEncoderConfig.from_dict({"kind": "paper"})


def test_bundle_round_trip_needs_no_resemblyzer_file(tmp_path, monkeypatch):
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face, load_model, save_model

    torch.manual_seed(0)
    angles = torch.linspace(0, 2 * np.pi, 69)[:-1]
    mean = torch.stack([112 + 60 * torch.cos(angles), 112 + 70 * torch.sin(angles)], dim=1)
    model = Speech2Face(FaceDecoder(FaceDecoderConfig.tiny(16), mean),
                        rz.ResemblyzerEncoder(rz.ResemblyzerEncoderConfig(output_dim=16)),
                        None, "dlib").eval()
    path = save_model(model, tmp_path / "baseline")
    # Loading rebuilds the layout only: the pretrained weights come from the bundle.
    monkeypatch.setattr(rz, "load_speaker_weights", lambda *a: pytest.fail("read pretrained.pt"))
    loaded = load_model(path)
    assert isinstance(loaded.voice_encoder, rz.ResemblyzerEncoder)
    spec = spectrogram(_voice(2.0))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_features(spec), model.predict_features(spec))


def test_selected_in_training_as_encoder_resemblyzer():
    from speech2face.config import load_config
    from speech2face.errors import ConfigError
    from speech2face.model import build_voice_encoder

    config = load_config(overrides=["preset=tiny", "encoder=resemblyzer"], stage="voice")
    assert config.encoder == "resemblyzer"
    encoder = build_voice_encoder(config, 16)
    assert isinstance(encoder, rz.ResemblyzerEncoder) and encoder.config.output_dim == 16
    for stage in ("voice", "decoder"):  # train-decoder stored encoder=nope unchecked
        with pytest.raises(ConfigError, match=r"encoder must be one of \['paper', "
                                              r"'resemblyzer'\], got 'nope'"):
            load_config(overrides=["encoder=nope"], stage=stage)
