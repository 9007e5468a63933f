"""reconstruct(): audio files of several formats and arrays in, 224x224 faces out; its CLI."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from speech2face import inference
from speech2face.cli import main
from speech2face.errors import AudioError, WeightsError
from speech2face.utils import output_entries

RATE = 16_000
FEATURE_DIM = 16


def _mean_landmarks() -> torch.Tensor:
    angles = torch.linspace(0, 2 * math.pi, 69)[:-1]
    return torch.stack([112 + 60 * torch.cos(angles), 112 + 70 * torch.sin(angles)], dim=1)


def _tiny_model(voice: bool = True):
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    torch.manual_seed(0)
    decoder = FaceDecoder(FaceDecoderConfig.tiny(FEATURE_DIM), _mean_landmarks())
    encoder = VoiceEncoder(VoiceEncoderConfig.tiny(FEATURE_DIM)) if voice else None
    return Speech2Face(decoder, encoder, None, "dlib").eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from speech2face.model import save_model

    return save_model(_tiny_model(), tmp_path_factory.mktemp("model") / "bundle")


def _speech(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A voiced, vowel-like signal: harmonics of a wobbling pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.normal(size=t.size)
    return wave.astype(np.float32)


def _write_av(path, wave: np.ndarray, codec: str, fmt: str | None = None) -> None:
    """Encode mono float audio with FFmpeg (PyAV): mp3, or an AAC track in mp4."""
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=RATE, layout="mono")
        frame_size = 1152 if codec == "mp3" else 1024
        pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
        for start in range(0, pcm.size, frame_size):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + frame_size], format="s16",
                                               layout="mono")
            frame.sample_rate = RATE
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    wave = _speech()
    files = {}
    for ext, subtype in (("wav", "FLOAT"), ("flac", "PCM_16"), ("ogg", "VORBIS")):
        files[ext] = folder / f"speech.{ext}"
        sf.write(files[ext], wave, RATE, subtype=subtype)
    files["mp3"] = folder / "speech.mp3"
    _write_av(files["mp3"], wave, "mp3")
    files["mp4"] = folder / "speech.mp4"
    _write_av(files["mp4"], wave, "aac", fmt="mp4")
    return wave, files


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "mp4"])
def test_reconstruct_reads_every_format(ext, audio_files, bundle):
    _, files = audio_files
    image = inference.reconstruct(files[ext], model=bundle)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    assert image.std() > 0  # a rendered face, not a blank frame


def test_array_path_and_loaded_model_agree(audio_files, bundle):
    from speech2face.model import load_model

    wave, files = audio_files
    from_file = inference.reconstruct(files["wav"], model=bundle)  # float WAV: lossless
    from_array = inference.reconstruct(wave, model=load_model(bundle))
    np.testing.assert_array_equal(from_file, from_array)
    # 2 s of speech is repeated to 6 s: the same as passing the repeats.
    np.testing.assert_array_equal(from_array, inference.reconstruct(np.tile(wave, 3), bundle))
    # Lossy codecs change the samples a little, the face only slightly.
    lossy = inference.reconstruct(files["mp3"], model=bundle).astype(int)
    assert np.abs(lossy - from_file).mean() < 8


def test_reconstruct_face_landmarks_in_224_frame(audio_files, bundle):
    result = inference.reconstruct_face(audio_files[1]["flac"], model=bundle)
    assert result.landmarks.shape == (68, 2)
    assert result.feature.shape == (FEATURE_DIM,)
    # Random weights move landmarks by at most a few offsets around the mean face.
    assert np.all((result.landmarks > -50) & (result.landmarks < 274))


def test_to_uint8_images_rounds_and_upsamples():
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # Scaled in float32, then to nearest with ties up: 255 x here lands on 226.5 in
    # float32 (numpy's round would take it to even, 226; an unseeded draw hit such a tie
    # now and then), and one float32 step lower on 226.49998.
    x[0, 0, 0, :2] = torch.tensor([np.float32(226.5 / 255),
                                   np.nextafter(np.float32(226.5 / 255), np.float32(0))])
    scaled = x.permute(0, 2, 3, 1).numpy() * np.float32(255)
    assert scaled[0, 0, 0, 0] == 226.5 and scaled[0, 0, 1, 0] < 226.5
    whole = np.floor(scaled)
    expected = (whole + (scaled - whole >= 0.5)).astype(np.uint8)
    assert expected[0, 0, 0, 0] == 227 and expected[0, 0, 1, 0] == 226
    np.testing.assert_array_equal(inference.to_uint8_images(x), expected)
    # Upsampled bilinearly: a flat image stays flat (0.6 x 255 = 153, away from a tie;
    # the interpolation's float32 weights move a flat 0.5 to either side of 127.5).
    small = torch.full((1, 3, 64, 64), 0.6)
    up = inference.to_uint8_images(small)
    assert up.shape == (1, 224, 224, 3) and np.all(up == 153)


def test_bad_arrays_are_audio_errors(bundle):
    with pytest.raises(AudioError, match="mono"):
        inference.reconstruct(np.zeros((2, 100), np.float32), bundle)
    with pytest.raises(AudioError, match="NaN"):
        inference.reconstruct(np.full(1000, np.nan, np.float32), bundle)
    with pytest.raises(AudioError, match="empty"):
        inference.reconstruct(np.zeros(0, np.float32), bundle)
    # float64 beyond float32's range would become inf (a black face) after the cast
    with pytest.raises(AudioError, match="infinite"):
        inference.reconstruct(np.full(1000, 1e39), bundle)
    # what the command line refuses in a file, the API refuses in an array
    with pytest.raises(AudioError, match="audio array: signal is silent .all samples are zero"):
        inference.reconstruct(np.zeros(96000, np.float32), bundle)
    with pytest.raises(AudioError, match="silent .its loudest sample is -90 dBFS"):
        inference.reconstruct(np.r_[np.zeros(9999), 1 / 32768].astype(np.float32), bundle)
    with pytest.raises(AudioError, match="audio array: too short: 1 samples"):
        inference.reconstruct(np.array([0.5], np.float32), bundle)
    with pytest.raises(AudioError, match="reach 3.28e\\+04, far outside .* integers stored"):
        inference.reconstruct(np.sin(np.arange(16000) / 5.0) * 32767, bundle)
    for given, kind in ((b"RIFF....WAVE", "bytes"), (io.BytesIO(b""), "BytesIO")):
        with pytest.raises(AudioError, match=f"a file path or a float waveform array, not {kind}"):
            inference.reconstruct(given, bundle)


def test_reconstruct_leaves_the_callers_model_as_it_was(audio_files, bundle):
    """Its training mode restored; a bfloat16 model gets spectrograms of its own dtype;
    and a spectrogram made under inference mode first leaves later ones differentiable."""
    from speech2face import audio
    from speech2face.audio import spectrogram
    from speech2face.model import load_model

    wave = audio_files[0]
    model = load_model(bundle).train()
    audio._padded_window.cache_clear()  # made anew, under reconstruct's inference mode
    face = inference.reconstruct(wave, model=model)
    assert model.training
    face16 = inference.reconstruct(wave, model=model.to(torch.bfloat16))
    assert face16.shape == face.shape and np.abs(face16.astype(int) - face).mean() < 8
    clip = torch.randn(1, 16000, requires_grad=True)
    spectrogram(clip).sum().backward()  # the window was first made under inference mode
    assert torch.isfinite(clip.grad).all()


def test_a_model_argument_that_is_no_model_is_named(audio_files):
    with pytest.raises(WeightsError, match="model must be a Speech2Face model or a bundle "
                                           "path, got int"):
        inference.reconstruct(audio_files[1]["wav"], model=123)
    with pytest.raises(WeightsError, match="got Linear"):  # not "a decoder-only bundle"
        inference.reconstruct(audio_files[1]["wav"], model=torch.nn.Linear(2, 2))


def test_no_model_says_how_to_get_one(tmp_path, monkeypatch, audio_files, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="speech2face demo"):
        inference.reconstruct(audio_files[1]["wav"])
    out = tmp_path / "faces"
    assert main(["reconstruct", str(audio_files[1]["wav"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speech2face demo" in err
    assert not out.exists()


def test_default_model_comes_from_the_cache(tmp_path, monkeypatch, audio_files, bundle):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(bundle, inference.default_model_path())
    np.testing.assert_array_equal(inference.reconstruct(audio_files[1]["wav"]),
                                  inference.reconstruct(audio_files[1]["wav"], bundle))
    # The demo's bundle is also a named model for load_model.
    from speech2face.model import find_bundle

    assert find_bundle("demo") == inference.default_model_path()


def test_decoder_only_bundle_is_refused(tmp_path, audio_files):
    from speech2face.model import save_model

    path = save_model(_tiny_model(voice=False), tmp_path / "stage1")
    with pytest.raises(WeightsError, match="no voice encoder"):
        inference.reconstruct(audio_files[1]["wav"], model=path)


def test_cli_writes_faces_and_landmarks(tmp_path, audio_files, bundle, capsys):
    _, files = audio_files
    out = tmp_path / "faces"
    code = main(["reconstruct", str(files["ogg"]), str(files["mp4"]), "-o", str(out),
                 "--model", str(bundle), "--landmarks"])
    assert code == 0
    # Two inputs named "speech": their suffixes keep them apart rather than overwriting.
    names = sorted(p.name for p in output_entries(out))  # all but the run's lock file
    assert names == ["speech_mp4.landmarks.json", "speech_mp4.landmarks.png", "speech_mp4.png",
                     "speech_ogg.landmarks.json", "speech_ogg.landmarks.png", "speech_ogg.png"]
    with Image.open(out / "speech_ogg.png") as image:
        assert image.size == (224, 224) and image.mode == "RGB"
    points = json.loads((out / "speech_ogg.landmarks.json").read_text())["landmarks"]
    assert np.asarray(points).shape == (68, 2)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "speech_ogg.png")),
                                  inference.reconstruct(files["ogg"], bundle))
    # A folder: every audio or video file in it, one face each.
    assert main(["reconstruct", str(files["ogg"].parent), "-o", str(tmp_path / "all"),
                 "--model", str(bundle)]) == 0
    assert len(list((tmp_path / "all").glob("*.png"))) == len(files)
    single = tmp_path / "one.png"
    assert main(["reconstruct", str(files["flac"]), "-o", str(single), "--model",
                 str(bundle)]) == 0
    assert single.is_file()


def test_cli_bad_file_exits_2_without_output(tmp_path, audio_files, bundle, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF this is not audio")
    out = tmp_path / "faces"
    code = main(["reconstruct", str(audio_files[1]["wav"]), str(bad), "-o", str(out),
                 "--model", str(bundle)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.wav" in err
    assert not out.exists()
    assert main(["reconstruct", str(tmp_path / "missing.flac"), "-o", str(out),
                 "--model", str(bundle)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("name, count, problem", [("face.jpg", 1, "PNG"),
                                                  ("face.png", 2, "2 inputs")])
def test_cli_refuses_an_image_name_it_would_make_a_folder_of(tmp_path, audio_files, bundle,
                                                             capsys, name, count, problem):
    """-o naming another image type, or one .png for several inputs, is a usage error
    (it used to become a folder of that name); a folder so named is still a folder."""
    inputs = [str(audio_files[1][kind]) for kind in ("wav", "flac")[:count]]
    out = tmp_path / name
    assert main(["reconstruct", *inputs, "-o", str(out), "--model", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and problem in err
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    assert main(["reconstruct", *inputs, "-o", str(out), "--model", str(bundle)]) == 0
    assert len(list(out.glob("*.png"))) == count


def test_a_stopped_reconstruct_run_continues_where_it_stopped(tmp_path, audio_files, bundle,
                                                              monkeypatch):
    """Ctrl-C in the second batch of faces: the first batch's are kept out of sight; the
    rerun computes only the second batch and ends with an unbroken run's files."""
    wave = audio_files[0]
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(inference.BATCH_SIZE + 2):
        sf.write(clips / f"s{i:02d}.wav", np.roll(wave, 800 * i), RATE, subtype="FLOAT")
    common = ["--model", str(bundle), "--landmarks"]
    assert main(["reconstruct", str(clips), "-o", str(tmp_path / "straight"), *common]) == 0
    from conftest import interrupt_at

    calls, stopping = interrupt_at(monkeypatch, inference, "reconstruct_waves", 2,
                                   record=lambda waves, model: len(waves))
    out = tmp_path / "out"
    assert main(["reconstruct", str(clips), "-o", str(out), *common]) == 130
    assert [p.name for p in output_entries(out)] == [".speech2face.partial"]
    calls.clear()
    stopping.armed = False
    assert main(["reconstruct", str(clips), "-o", str(out), *common]) == 0
    assert calls == [2]  # the second batch only
    straight = sorted(p.name for p in output_entries(tmp_path / "straight"))
    assert sorted(p.name for p in output_entries(out)) == straight
    assert len(straight) == 3 * (inference.BATCH_SIZE + 2)
    for name in straight:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
