"""Bad input, as a careless or hostile user gives it (issue 16): every case ends with exit
status 2, exactly one line on stderr naming the file or option and the problem, no
traceback, no warning, no C-library chatter, and nothing half-written.

Commands run in-process through ``cli.main`` with ``capfd``, which captures file
descriptors 1 and 2 themselves, so a C library writing to stderr is caught as surely as
Python's ``print``; a few cases also run as a subprocess, the way a user sees them.
Every bad input is generated here.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speech2face import cli

RATE = 16_000
FEATURE_DIM = 16


# --------------------------------------------------------------------------- helpers


def run_cli(argv, capfd):
    """``speech2face ARGV`` in this process: (exit status, stdout, stderr, warnings)."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
    out, err = capfd.readouterr()
    return status, out, err, [str(w.message) for w in caught]


def assert_refused(argv, capfd, *names, absent=()):
    """The command exits 2 with one stderr line that contains every one of ``names``,
    warns nothing and leaves none of the ``absent`` paths. Returns the line."""
    status, _, err, caught = run_cli(argv, capfd)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Warning" not in err and "Note:" not in err
    for name in names:
        assert str(name) in lines[0], lines[0]
    assert not caught, caught
    for path in absent:
        assert not Path(path).exists(), f"{path} was left behind"
    return lines[0]


def speech(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A vowel-like tone: harmonics of a wobbling pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 3 * t)) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (0.3 * wave / np.abs(wave).max() + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def write_mp3(path: Path, seconds: float = 2.0) -> Path:
    """An MP3 encoded by FFmpeg's libmp3lame (PyAV), with a Xing/LAME header."""
    import av

    wave = speech(seconds)
    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good inputs shared by the cases: a WAV clip and a tiny model bundle."""
    from speech2face.face_decoder import FaceDecoder, FaceDecoderConfig
    from speech2face.model import Speech2Face, save_model
    from speech2face.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    root = tmp_path_factory.mktemp("good")
    sf.write(root / "clip.wav", speech(), RATE)
    torch.manual_seed(0)
    angles = torch.linspace(0, 2 * np.pi, 69)[:-1]
    mean = torch.stack([112 + 60 * torch.cos(angles), 112 + 70 * torch.sin(angles)], dim=1)
    model = Speech2Face(FaceDecoder(FaceDecoderConfig.tiny(FEATURE_DIM), mean),
                        VoiceEncoder(VoiceEncoderConfig.tiny(FEATURE_DIM)),
                        torch.nn.Linear(FEATURE_DIM, 5), "dlib").eval()
    save_model(model, root / "bundle")
    return {"wav": root / "clip.wav", "bundle": root / "bundle"}


# ----------------------------------------------------------------- model bundles


def _set(path: str, value):
    """An edit of the bundle's config.json: set the value at a dotted path."""

    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _edit_weights(change):
    """An edit of model.safetensors: ``change(tensors)`` in place, then written back."""

    def edit(folder: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors")

    return edit


def _nan(name):
    def change(tensors):
        tensors[name].view(-1)[3] = float("nan")
    return change


def _inf(name):
    def change(tensors):
        tensors[name].view(-1)[0] = float("inf")
    return change


def _reshape_mean(tensors):
    tensors["face_decoder.mean_landmarks"] = torch.zeros(60, 2)


def _raw(data: bytes):
    def edit(folder: Path):
        (folder / "config.json").write_bytes(data)
    return edit


def _weights_bytes(cut):
    def edit(folder: Path):
        file = folder / "model.safetensors"
        file.write_bytes(cut(file.read_bytes()))
    return edit


BAD_CONFIGS = {
    # sizes that would allocate gigabytes if trusted
    "huge-texture-channels": (_set("face_decoder.texture_base_channels", 1_000_000), "65536"),
    "huge-identities-float": (_set("num_identities", 1e9), "num_identities"),
    "huge-identities": (_set("num_identities", 1_000_000_000), "num_identities"),
    "huge-image": (_set("face_decoder.texture_base_size", 1000), "pixel"),
    "deep-texture": (_set("face_decoder.texture_channels", [8] * 20), "pixel"),
    "long-voice-layers": (_set("voice_encoder.layers", [[8, 1]] * 200), "layers"),
    # small weights, enormous feature maps
    "wide-first-conv": (_set("voice_encoder.layers", [[65536, 1], [8, 2]]), "feature map"),
    "wide-texture": (_set("face_decoder.texture_channels", [8, 8, 8, 40000]), "feature map"),
    # wrong types and signs
    "negative-size": (_set("face_decoder.code_dim", -5), "code_dim"),
    "zero-size": (_set("voice_encoder.fc_dim", 0), "fc_dim"),
    "text-size": (_set("face_decoder.code_dim", "big"), "code_dim"),
    "bool-size": (_set("feature_dim", True), "feature_dim"),
    "fractional-size": (_set("face_decoder.texture_base_channels", 64.5), "texture_base_channels"),
    "nan-regularisation": (_set("face_decoder.warp_regularization", float("nan")),
                           "warp_regularization"),
    "even-kernel": (_set("face_decoder.texture_kernel", 4), "texture_kernel"),
    "unknown-encoder": (_set("face_encoder", "resnet"), "face_encoder"),
    "decoder-not-object": (_set("face_decoder", [1, 2]), "face_decoder"),
    "unknown-field": (_set("face_decoder.colour", 3), "colour"),
    # malformed layer lists
    "layers-text": (_set("voice_encoder.layers", "M"), "layers"),
    "layer-one-number": (_set("voice_encoder.layers", [[8]]), "layers[0]"),
    "layer-text-channels": (_set("voice_encoder.layers", [["a", 1]]), "layers[0]"),
    "layer-unknown-kind": (_set("voice_encoder.layers", [[8, 1], "X", [8, 1]]), "layers[1]"),
    "layers-empty": (_set("voice_encoder.layers", []), "layers"),
    "layers-end-with-pool": (_set("voice_encoder.layers", [[8, 1], "M"]), "convolution"),
    "landmark-hidden-nested": (_set("face_decoder.landmark_hidden", [[1]]), "landmark_hidden"),
    "landmark-hidden-negative": (_set("face_decoder.landmark_hidden", [-1]), "landmark_hidden"),
    "wrong-n-freq": (_set("voice_encoder.n_freq", 300), "n_freq"),
    # in bounds, but not what the weights file holds
    "channels-mismatch": (_set("face_decoder.texture_base_channels", 65), "do not match"),
    "identities-mismatch": (_set("num_identities", 6), "do not match"),
    "no-classifier": (_set("num_identities", None), "unexpected"),
    # the file itself
    "not-utf8": (_raw(b"\xff\xfe\x00{"), "cannot read"),
    "not-json": (_raw(b"{format: 1"), "cannot read"),
    "json-list": (_raw(b"[1, 2]"), "not a speech2face-bundle"),
    "deeply-nested": (_raw(b"[" * 100_000 + b"]" * 100_000), "cannot read"),
}
BAD_WEIGHTS = {
    "nan-weight": (_edit_weights(_nan("face_decoder.texture_fc.0.weight")), "NaN"),
    "inf-weight": (_edit_weights(_inf("voice_encoder.fc.0.bias")), "NaN or infinite"),
    "mean-landmarks-shape": (_edit_weights(_reshape_mean), "face_decoder.mean_landmarks"),
    "mean-landmarks-far": (_edit_weights(lambda t: t["face_decoder.mean_landmarks"].mul_(1e6)),
                           "outside the 224-px face crop"),
    "truncated": (_weights_bytes(lambda b: b[: len(b) // 2]), "not a readable safetensors"),
    "random-bytes": (_weights_bytes(lambda b: os.urandom(len(b))), "not a readable"),
    "huge-header-length": (_weights_bytes(lambda b: struct.pack("<Q", 1 << 60) + b[8:]),
                           "not a readable"),
}


@pytest.mark.parametrize("case", [*BAD_CONFIGS, *BAD_WEIGHTS])
def test_bad_bundle_is_refused_before_anything_is_built(case, files, tmp_path, capfd):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(files["bundle"], bundle)
    edit, words = {**BAD_CONFIGS, **BAD_WEIGHTS}[case]
    edit(bundle)
    # config.json is named for what it says, model.safetensors for what it holds
    in_config = case in BAD_CONFIGS and "mismatch" not in case and case != "no-classifier"
    named = "config.json" if in_config else "model.safetensors"
    out = tmp_path / "faces"
    assert_refused(["reconstruct", files["wav"], "--model", bundle, "-o", out], capfd,
                   named, words, absent=[out])


def test_weights_too_large_to_compute_with_are_one_line(files, tmp_path, capfd):
    """Finite weights pass the bundle's checks, but 3e38 overflows in the first product:
    reconstruct wrote a black face and evaluate ended in a traceback."""
    import shutil

    from safetensors.torch import load_file

    bundle = tmp_path / "bundle"
    shutil.copytree(files["bundle"], bundle)
    name = next(k for k, v in load_file(bundle / "model.safetensors").items()
                if k.startswith("voice_encoder.fc") and k.endswith("weight"))
    _edit_weights(lambda tensors: tensors[name].fill_(3e38))(bundle)
    out = tmp_path / "faces"
    assert_refused(["reconstruct", files["wav"], "--model", bundle, "-o", out], capfd,
                   bundle, "the voice encoder gives values that are not finite", absent=[out])


def test_good_bundle_still_loads(files, tmp_path, capfd):
    status, out, err, caught = run_cli(
        ["reconstruct", files["wav"], "--model", files["bundle"], "-o", tmp_path / "f.png"], capfd)
    assert status == 0 and err == "" and not caught
    assert (tmp_path / "f.png").is_file()


# ------------------------------------------------------------------ output locks

# Every command that writes a folder, with arguments that parse (their files need not
# exist: the lock is taken before the command reads anything).
WRITERS = {
    "spectrogram": ["spectrogram", "a.wav"],
    "faces": ["faces", "a.png"],
    "make-demo-data": ["make-demo-data"],
    "prepare": ["prepare", "voxceleb1", "--root", "r"],
    "train-decoder": ["train-decoder", "--data", "d"],
    "train": ["train", "--data", "d", "--decoder", "m"],
    "evaluate": ["evaluate", "--model", "m", "--data", "d"],
    "reconstruct": ["reconstruct", "a.wav"],
    "demo": ["demo"],
    "compare": ["compare", "a=b"],  # -o names a Markdown file: locked beside it
    "download": ["download", "avspeech", "--csv", "a.csv"],
}
FILE_WRITERS = {"compare"}


def _hold_lock(out: Path, folder: bool = True) -> subprocess.Popen:
    """Another process holding the lock on ``out`` until it is killed."""
    code = ("import sys, time\nfrom speech2face.utils import output_lock\n"
            f"with output_lock({str(out)!r}, {folder}):\n    print('held', flush=True)\n"
            "    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def held(tmp_path, request):
    out = tmp_path / "out"
    holder = _hold_lock(out, folder=request.param not in FILE_WRITERS)
    yield out, holder.pid, request.param
    holder.kill()
    holder.wait()


def test_every_writing_command_has_an_out_option():
    # A new command that writes a folder joins WRITERS (and so gets the lock's test).
    writers = set()
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command").choices[name]
        if any(a.dest == "out" for a in sub._actions):
            writers.add(name)
    assert writers == set(WRITERS)


@pytest.mark.parametrize("held", WRITERS, indirect=True)
def test_second_writer_stops_at_once(held, capfd, tmp_path):
    out, pid, command = held
    before = sorted(tmp_path.rglob("*"))
    assert_refused([*WRITERS[command], "--out", out], capfd,
                   f"another run is writing {out} (pid {pid})")
    assert sorted(tmp_path.rglob("*")) == before


def test_machines_of_a_cluster_prepare_lock_only_their_part(tmp_path):
    import importlib

    from speech2face.cli import _output, build_parser

    module = importlib.import_module(cli.COMMANDS["prepare"][0])
    out = tmp_path / "shards"

    def target(*extra):
        return _output(module, build_parser("prepare").parse_args(["prepare", "-o", str(out),
                                                                   *extra]))

    part0 = target("voxceleb1", "--num-shards", "2", "--shard-index", "0")
    part1 = target("voxceleb1", "--num-shards", "2", "--shard-index", "1")
    assert part0 != part1 and part0[0].parent == part1[0].parent == out / "parts"
    assert target("--merge") == target("voxceleb1") == (out, True)


def test_stale_lock_of_a_killed_run_does_not_block(files, tmp_path, capfd):
    from speech2face.utils import lock_file_for

    out = tmp_path / "specs"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_file_for(out).exists()  # the killed run's lock file is still there
    status, _, err, _ = run_cli(["spectrogram", files["wav"], "-o", out], capfd)
    assert status == 0, err
    assert (out / "clip.npy").is_file()


def test_lock_is_reentrant_and_tidy(tmp_path):
    from speech2face.utils import LOCK_NAME, lock_file_for, output_lock

    out = tmp_path / "a" / "b" / "out"
    with output_lock(out):
        assert lock_file_for(out) == out / LOCK_NAME
        assert lock_file_for(out).read_text().strip() == str(os.getpid())
        with output_lock(out):  # library code taking the command's lock again
            pass
        assert lock_file_for(out).exists()
    assert not (tmp_path / "a").exists()  # nothing written: no folders left either
    with output_lock(out):
        (out / "result").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["result"]  # the lock file is gone
    png = tmp_path / "face.png"  # a single-file output is locked beside it
    with output_lock(png, folder=False):
        assert lock_file_for(png, folder=False).exists()
    assert list(tmp_path.glob(".face.png*")) == []


def test_a_lock_file_removed_while_waited_for_is_not_shared(tmp_path, monkeypatch):
    # Run B opens the lock file; the holder removes it and ends; run C makes and locks a
    # new file of that name; then B's flock on the old, nameless file succeeds. B must
    # see that and find C's lock, not write beside C.
    import fcntl

    from speech2face.errors import Speech2FaceError
    from speech2face.utils import _acquire, lock_file_for

    out = tmp_path / "out"
    out.mkdir()
    lock = lock_file_for(out)
    lock.write_text("1\n")
    stale = os.open(lock, os.O_RDWR)  # B's open, before the holder removed the file
    os.unlink(lock)
    newer = os.open(lock, os.O_RDWR | os.O_CREAT)  # C's file, locked
    fcntl.flock(newer, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(newer, b"4242\n", 0)
    real_open, calls = os.open, []

    def open_(*args, **kwargs):
        calls.append(args[0])
        return stale if len(calls) == 1 else real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    try:
        with pytest.raises(Speech2FaceError, match=r"another run is writing .* \(pid 4242\)"):
            _acquire(lock, out, [])
    finally:
        monkeypatch.undo()
        os.close(newer)
    assert len(calls) == 2


def test_commands_that_need_an_empty_folder_accept_their_own_lock(tmp_path, capfd):
    from speech2face.utils import LOCK_NAME

    out = tmp_path / "corpus"
    status, _, err, _ = run_cli(["make-demo-data", "-o", out, "--speakers", "2"], capfd)
    assert status == 0, err
    assert not (out / LOCK_NAME).exists() and len(list(out.iterdir())) > 1


# ------------------------------------------------------------ audio decode noise


def _mp3_cases(root: Path) -> dict[str, Path]:
    good = write_mp3(root / "good.mp3")
    data = good.read_bytes()
    cases = {
        "random.mp3": np.random.default_rng(1).bytes(20_000),
        "text.mp3": b"this is not audio\n" * 500,
        "truncated.mp3": data[: len(data) // 3],
        "zeros.mp3": bytes(5000),
    }
    for name, content in cases.items():
        (root / name).write_bytes(content)
    return {name: root / name for name in cases}


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_audio")
    files = _mp3_cases(root)
    sf.write(root / "huge.wav", np.full(RATE, 1e30, np.float32), RATE, subtype="FLOAT")
    sf.write(root / "nan.wav", np.full(RATE, np.nan, np.float32), RATE, subtype="FLOAT")
    files["huge.wav"] = root / "huge.wav"
    files["nan.wav"] = root / "nan.wav"
    return files


@pytest.mark.parametrize("name,reason", [
    ("random.mp3", "not a readable audio"),
    ("text.mp3", "not a readable audio"),
    ("truncated.mp3", "truncated"),
    ("zeros.mp3", "not a readable audio"),
    ("huge.wav", "far outside [-1, 1]"),
    ("nan.wav", "NaN or infinite"),
])
def test_bad_audio_is_one_quiet_line(name, reason, bad_audio, files, tmp_path, capfd):
    out = tmp_path / "specs"
    # a good file first: a later bad one must not leave its output, nor an empty folder
    assert_refused(["spectrogram", files["wav"], bad_audio[name], "-o", out], capfd,
                   bad_audio[name], reason, absent=[out])


def test_good_mp3_decodes(tmp_path):
    from speech2face.audio import load_audio

    wave = load_audio(write_mp3(tmp_path / "a.mp3", seconds=2.0))
    assert abs(len(wave) - 2 * RATE) < 0.05 * 2 * RATE


def test_no_library_chatter_in_a_real_process(bad_audio, tmp_path):
    # One process (importing torch takes seconds), three commands, the real fd 2.
    names = ["random.mp3", "truncated.mp3", "huge.wav"]
    code = ("import sys\nfrom speech2face.cli import main\n"
            "print([main(['spectrogram', f, '-o', sys.argv[1]]) for f in sys.argv[2:]])")
    result = subprocess.run(
        [sys.executable, "-c", code, tmp_path / "out", *(bad_audio[n] for n in names)],
        capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[2, 2, 2]", result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    for name, line in zip(names, lines, strict=True):
        assert str(bad_audio[name]) in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ option values


def _has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.parametrize("args,words", [
    (["--seconds", "0.01"], "--seconds"),
    (["--seconds", "-1"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--seconds", "1e9"], "--seconds"),
    (["--seconds", "six"], "--seconds"),
])
def test_spectrogram_seconds(args, words, files, tmp_path, capfd):
    out = tmp_path / "out"
    assert_refused(["spectrogram", files["wav"], "-o", out, *args], capfd, words, absent=[out])


@pytest.mark.parametrize("command", ["spectrogram", "faces", "evaluate"])
def test_out_naming_a_file(command, files, tmp_path, capfd):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    argv = {"spectrogram": ["spectrogram", files["wav"]], "faces": ["faces", files["wav"]],
            "evaluate": ["evaluate", "--model", files["bundle"], "--data", tmp_path]}[command]
    assert_refused([*argv, "-o", existing], capfd, existing, "not a folder")
    assert existing.read_text() == "keep me"
    inside = existing / "sub"  # a folder below a file
    assert_refused([*argv, "-o", inside], capfd, inside)


@pytest.mark.parametrize("device,words", [
    ("bogus", "not a torch device"),
    ("cuda:99", "cuda:99"),
    pytest.param("cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")),
    ("meta", "only cpu, cuda and mps"),
])
def test_device(device, words, files, tmp_path, capfd):
    out = tmp_path / "out"
    for argv in (["reconstruct", files["wav"], "--model", files["bundle"]],
                 ["evaluate", "--model", files["bundle"], "--data", tmp_path]):
        assert_refused([*argv, "-o", out, "--device", device], capfd, "--device", words,
                       absent=[out])


@pytest.mark.parametrize("args,words", [
    (["--size", "0"], "--size"),
    (["--size", "-5"], "--size"),
    (["--size", "100000"], "--size"),
    (["--weights", "vgg_face_dag.pth"], "--weights"),
    (["--encoder", "none", "--weights", "vgg_face_dag.pth"], "--weights"),
])
def test_faces_options(args, words, tmp_path, capfd):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert_refused(["faces", tmp_path / "a.png", "-o", out, *args], capfd, words, absent=[out])


def test_random_bytes_as_vgg_face_weights(tmp_path, capfd):
    import pickle

    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    cases = {
        "random.pth": np.random.default_rng(2).bytes(50_000),
        "zip.pth": b"PK\x03\x04" + bytes(100),
        "pickle.pth": pickle.dumps({"conv1_1.weight": object}, protocol=4),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / "out"
        line = assert_refused(["faces", tmp_path / "a.png", "-o", out, "--encoder", "vggface",
                               "--weights", tmp_path / name], capfd, tmp_path / name,
                              absent=[out])
        assert "weights_only" not in line and len(line) < 300


# ----------------------------------------------------- training: a shared tiny run

TRAIN = ["--no-progress", "preset=tiny", "num_workers=0", "log_every=2", "val_every=2",
         "val_batches=1", "checkpoint_every=2", "keep_last=5", "batch_size=4"]


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """The demo corpus (4 speakers), its shards and a 4-step stage-1 run (checkpoints at
    steps 2 and 4), made once through the command line for the training cases."""
    root = tmp_path_factory.mktemp("train")
    corpus, shards, run = root / "corpus", root / "shards", root / "run"
    assert cli.main(["make-demo-data", "-o", str(corpus), "--speakers", "4", "--frames", "1"]) == 0
    assert cli.main(["prepare", "voxceleb1", "--root", str(corpus), "-o", str(shards),
                     "--samples-per-shard", "16", "--frames-per-video", "1"]) == 0
    assert cli.main(["train-decoder", "--data", str(shards), "-o", str(run), *TRAIN,
                     "steps=4"]) == 0
    return {"shards": shards, "run": run}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _copy_run(decoder_run, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(decoder_run["run"], run)
    return run


def _state_edit(change):
    def edit(step: Path):
        state = json.loads((step / "state.json").read_text())
        state = change(state)
        (step / "state.json").write_text(json.dumps(state))
    return edit


def _state_bytes(data: bytes):
    def edit(step: Path):
        (step / "state.json").write_bytes(data)
    return edit


def _tensors_edit(name: str, change):
    def edit(step: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(step / name)
        change(tensors)
        save_file(tensors or {"_empty": torch.zeros(0)}, step / name)
    return edit


def _put(keys: str, value):
    def change(state):
        *parents, last = keys.split(".")
        node = state
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return state
    return change


def _first_exp_avg(tensors):
    return next(k for k in tensors if k.endswith(".exp_avg"))


BAD_CHECKPOINTS = {
    "empty-object": (_state_bytes(b"{}"), "state.json", "step"),
    "list": (_state_bytes(b"[1]"), "state.json", "JSON object"),
    "not-utf8": (_state_bytes(b"\xff\xfe{\x00"), "state.json", "cannot read"),
    "not-json": (_state_bytes(b'{"step": 4,'), "state.json", "cannot read"),
    "step-text": (_state_edit(_put("step", "4")), "state.json", "step"),
    "step-float": (_state_edit(_put("step", 4.5)), "state.json", "step"),
    "negative-epoch-step": (_state_edit(_put("epoch_step", -1)), "state.json", "epoch_step"),
    "world-size-zero": (_state_edit(_put("world_size", 0)), "state.json", "world_size"),
    "empty-param-groups": (_state_edit(_put("optimizer.param_groups", [])), "state.json",
                           "param_groups"),
    "lr-text": (_state_edit(_put("optimizer.param_groups.0.lr", "fast")), "state.json", "lr"),
    "other-params": (_state_edit(_put("optimizer.param_groups.0.params", [0])), "state.json",
                     "param_groups[0]"),
    "no-optimizer": (_state_edit(lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
                     "state.json", "optimizer"),
    "scheduler-empty": (_state_edit(_put("scheduler", {})), "state.json", "scheduler"),
    "scheduler-text": (_state_edit(_put("scheduler.last_epoch", "x")), "state.json",
                       "last_epoch"),
    "betas-above-one": (_state_edit(_put("optimizer.param_groups.0.betas", [5, 5])),
                        "state.json", "betas"),
    "negative-lr": (_state_edit(_put("optimizer.param_groups.0.lr", -5)), "state.json",
                    "param_groups[0].lr"),
    "step-size-zero": (_state_edit(_put("scheduler.step_size", 0)), "state.json",
                       "scheduler.step_size"),
    "huge-gamma": (_state_edit(_put("scheduler.gamma", 1e300)), "state.json", "gamma"),
    "negative-last-epoch": (_state_edit(_put("scheduler.last_epoch", -100)), "state.json",
                            "last_epoch"),
    "huge-step": (_state_edit(_put("step", 10**30)), "state.json", "step must be at most"),
    "scalars-text": (_state_edit(_put("optimizer.scalars", {"0.step": "x"})), "state.json",
                     "scalars"),
    "exp-avg-shape": (_tensors_edit("optimizer.safetensors", lambda t: t.update(
        {_first_exp_avg(t): torch.zeros(3)})), "optimizer.safetensors", "exp_avg"),
    "exp-avg-nan": (_tensors_edit("optimizer.safetensors", lambda t: t[_first_exp_avg(t)]
                                  .view(-1).__setitem__(0, float("nan"))),
                    "optimizer.safetensors", "finite"),
    "state-of-no-parameter": (_tensors_edit("optimizer.safetensors", lambda t: t.update(
        {"999.exp_avg": torch.zeros(1)})), "optimizer.safetensors", "999.exp_avg"),
    "missing-exp-avg-sq": (_tensors_edit("optimizer.safetensors", lambda t: t.pop(
        next(k for k in list(t) if k.endswith(".exp_avg_sq")))), "optimizer.safetensors",
                           "exp_avg_sq"),
    "rng-missing": (_tensors_edit("rng.safetensors", lambda t: t.clear()), "rng.safetensors",
                    "cpu.rank0"),
    "rng-wrong": (_tensors_edit("rng.safetensors", lambda t: t.update(
        {"cpu.rank0": torch.zeros(7)})), "rng.safetensors", "cpu.rank0"),
    "weights-nan": (_tensors_edit("model.safetensors", lambda t: t[next(iter(t))]
                                  .view(-1).__setitem__(0, float("nan"))),
                    "model.safetensors", "NaN"),
    "optimizer-truncated": (lambda step: (step / "optimizer.safetensors").write_bytes(
        (step / "optimizer.safetensors").read_bytes()[:100]), "optimizer.safetensors",
                            "not a readable"),
    # values of the right types that no run writes (each was trained on, or a traceback)
    "adam-step-negative": (_tensors_edit("optimizer.safetensors", lambda t: t.update(
        {k: torch.tensor(-5.0) for k in t if k.endswith(".step")})), "optimizer.safetensors",
                           "whole number of steps"),
    "adam-step-fraction": (_tensors_edit("optimizer.safetensors", lambda t: t.update(
        {k: torch.tensor(0.5) for k in t if k.endswith(".step")})), "optimizer.safetensors",
                           "whole number of steps"),
    "adam-step-beyond-the-run": (_tensors_edit("optimizer.safetensors", lambda t: t.update(
        {k: torch.tensor(1e30) for k in t if k.endswith(".step")})), "optimizer.safetensors",
                                 "whole number of steps"),
    "exp-avg-sq-negative": (_tensors_edit("optimizer.safetensors", lambda t: t[next(
        k for k in t if k.endswith(".exp_avg_sq"))].view(-1).__setitem__(0, -1.0)),
        "optimizer.safetensors", "negative"),
    "epoch-beyond-the-step": (_state_edit(_put("epoch", 10**12)), "state.json", "epoch must"),
    "epoch-step-beyond": (_state_edit(_put("epoch_step", 10**9)), "state.json", "epoch_step"),
    "best-loss-nan": (_state_edit(_put("best_val_loss", float("nan"))), "state.json",
                      "best_val_loss"),
    # float16 weights resumed into a float32 model: every weight rounded, silently
    "weights-float16": (_tensors_edit("model.safetensors", lambda t: t.update(
        {(k := next(k for k in t if t[k].is_floating_point())): t[k].half()})),
        "model.safetensors", "torch.float16"),
    "weights-int": (_tensors_edit("model.safetensors", lambda t: t.update(
        {(k := next(k for k in t if t[k].is_floating_point())): t[k].to(torch.int32)})),
        "model.safetensors", "torch.int32"),
}


def test_an_incomplete_newer_checkpoint_folder_is_said(decoder_run, tmp_path, capfd):
    run = _copy_run(decoder_run, tmp_path)
    (run / "checkpoints" / "step-00000005").mkdir()  # no state.json: copied in part
    assert cli.main(["train-decoder", "--data", str(decoder_run["shards"]), "-o", str(run),
                     "--resume", *TRAIN, "steps=6"]) == 0
    err = capfd.readouterr().err
    assert "step-00000005 in " in err and "resuming from step-00000004" in err, err


def test_the_other_stages_checkpoint_is_named_as_such(decoder_run, tmp_path, capfd):
    """`train --resume` on a train-decoder run says whose checkpoint it is, and does not
    advise removing it (it is not damaged)."""
    run = _copy_run(decoder_run, tmp_path)
    before = _snapshot(run)
    line = assert_refused(["train", "--data", decoder_run["shards"], "--decoder",
                           run / "model", "-o", run, "--resume", *TRAIN, "steps=6"],
                          capfd, "step-00000004", "is a checkpoint of `train-decoder`")
    assert "remove" not in line
    assert _snapshot(run) == before


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_corrupt_checkpoint_on_resume(case, decoder_run, tmp_path, capfd):
    run = _copy_run(decoder_run, tmp_path)
    edit, name, words = BAD_CHECKPOINTS[case]
    edit(run / "checkpoints" / "step-00000004")
    before = _snapshot(run)
    line = assert_refused(["train-decoder", "--data", decoder_run["shards"], "-o", run,
                           "--resume", *TRAIN, "steps=6"], capfd, name, words)
    assert "step-00000004" in line
    assert _snapshot(run) == before  # nothing restored half-way, nothing written


@pytest.mark.parametrize("text, words", [
    ("{", "cannot read the bundle config"),
    ('{"format": "speech2face-bundle"}', "version"),
])
def test_voice_checkpoint_config_is_checked_before_a_classifier_is_built(
        text, words, decoder_run, tmp_path):
    """A resumed voice run takes the classifier's size from its checkpoint's config.json:
    read like any bundle's config (it once went straight to json.loads and nn.Linear)."""
    from speech2face.errors import WeightsError
    from speech2face.train import TrainConfig, voice_stage

    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(WeightsError, match=words) as error:
        voice_stage(decoder_run["shards"], decoder_run["run"] / "model",
                    TrainConfig.tiny(), checkpoint, progress=False)
    assert "config.json" in str(error.value)


def test_a_damaged_metrics_log_costs_its_bad_rows_not_the_resume(decoder_run, tmp_path, capfd):
    run = _copy_run(decoder_run, tmp_path)
    good = (run / "metrics.csv").read_text().splitlines()
    damaged = b"\n\xff\xfe,\x00,x\n9,train,total,high\n"  # not UTF-8, a NUL, no number
    (run / "metrics.csv").write_bytes("\n".join(good).encode() + damaged)
    status, _, err, _ = run_cli(["train-decoder", "--data", decoder_run["shards"], "-o", run,
                                 "--resume", *TRAIN, "steps=6"], capfd)
    assert status == 0, err
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[:len(good)] == good and all(r.split(",")[0].isdigit() for r in rows[1:])
    assert "high" not in "".join(rows) and "\ufffd" not in "".join(rows)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(encoder="arcface"), "unknown face encoder 'arcface'"),
    (lambda m: m.pop("mean_landmarks"), "has no mean_landmarks"),
])
def test_a_manifest_the_decoder_cannot_be_built_from(edit, words, decoder_run, tmp_path, capfd):
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(decoder_run["shards"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(["train-decoder", "--data", data, "-o", tmp_path / "run", *TRAIN],
                   capfd, "manifest.json", words, absent=[tmp_path / "run"])


def test_grad_accum_zero(decoder_run, tmp_path, capfd):
    out = tmp_path / "run"
    assert_refused(["train-decoder", "--data", decoder_run["shards"], "-o", out, *TRAIN,
                    "grad_accum=0"], capfd, "grad_accum", absent=[out])


# ---------------------------------------------------------- disk full, leftovers


def test_disk_full_is_one_line_and_the_run_recovers(decoder_run, tmp_path, capfd, monkeypatch):
    import errno

    run = _copy_run(decoder_run, tmp_path)
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while a checkpoint is written
        if "/checkpoints/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    argv = ["train-decoder", "--data", decoder_run["shards"], "-o", run, "--resume", *TRAIN,
            "steps=6"]
    assert_refused(argv, capfd, "No space left on device", "--resume")
    assert not [p for p in run.rglob("*.tmp")]  # the half-written checkpoint is gone
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == \
        ["step-00000002", "step-00000004"]
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same command goes on
    status, _, err, _ = run_cli(argv, capfd)
    assert status == 0, err
    assert (run / "checkpoints" / "step-00000006").is_dir()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(decoder_run, tmp_path, capfd):
    run = _copy_run(decoder_run, tmp_path)
    leftovers = [run / "checkpoints" / ".step-00000006.k2j4_x9a.tmp",
                 run / ".model.0a9b8c7d.tmp", run / "images" / ".val-00000006.png.q1w2e3r4.tmp"]
    for path in leftovers[:2]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    leftovers[2].write_bytes(b"half")
    beside = tmp_path / ".run.old-zzzzzzzz.tmp"  # replace_dir's, beside the run
    beside.mkdir()
    keep = run / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    status, _, err, _ = run_cli(["train-decoder", "--data", decoder_run["shards"], "-o", run,
                                 "--resume", *TRAIN, "steps=4"], capfd)
    assert status == 0, err
    assert not any(p.exists() for p in [*leftovers, beside])
    assert keep.read_text() == "mine"


def test_faces_leftovers_are_removed(tmp_path, capfd):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.crop.png.abcd1234.tmp", out / "sub" / ".b.feature.npy.x_y_z_12.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    status, _, err, _ = run_cli(["faces", tmp_path / "a.png", "-o", out, "--encoder", "none"],
                                capfd)
    assert status == 2  # a blank image has no face; the leftovers go all the same
    assert not any(p.exists() for p in stale)


def test_another_preset_on_resume_is_named_not_called_damage(decoder_run, tmp_path, capfd):
    """preset=paper over a tiny run: the checkpoint's tensors do not fit, and the line says
    why (a shape error advised removing one intact checkpoint after another)."""
    run = _copy_run(decoder_run, tmp_path)
    before = _snapshot(run)
    line = assert_refused(["train-decoder", "--data", decoder_run["shards"], "-o", run,
                           "--resume", *(a for a in TRAIN if a != "preset=tiny"),
                           "steps=6", "preset=paper"], capfd,
                          "step-00000004", "was trained with another model: preset paper "
                          "(the checkpoint's run: tiny); resume with preset=tiny")
    assert "remove" not in line
    assert _snapshot(run) == before


def test_a_damaged_validation_shard_stops_training_before_any_step(decoder_run, tmp_path,
                                                                   capfd):
    """Found at the first validation, it cost val_every steps (1,000 on the paper preset),
    and every --resume the same again: validation comes before that step's checkpoint."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(decoder_run["shards"], shards)
    val = sorted((shards / "val").glob("*.tar"))[0]
    blob = bytearray(val.read_bytes())
    blob[600] ^= 0xFF
    val.write_bytes(bytes(blob))
    run = tmp_path / "run"
    assert_refused(["train-decoder", "--data", shards, "-o", run, *TRAIN, "steps=4"], capfd,
                   val.name, "SHA-256 differs")
    assert not run.exists()


def test_resuming_with_fewer_steps_than_done_is_refused(decoder_run, tmp_path, capfd):
    run = _copy_run(decoder_run, tmp_path)
    before = _snapshot(run)
    assert_refused(["train-decoder", "--data", decoder_run["shards"], "-o", run, "--resume",
                    *TRAIN, "steps=2"], capfd, "step-00000004",
                   "is at step 4, past steps=2: resume with steps >= 4")
    assert _snapshot(run) == before  # train_config.json did not come to say steps=2


@pytest.mark.parametrize("entry, folder", [
    ("metrics.csv", True), ("checkpoints/best.json", True), ("tensorboard", False),
    ("model", False), ("images", False),
])
def test_odd_entries_in_the_run_folder_are_named(decoder_run, tmp_path, capfd, entry, folder):
    """A folder where the run writes a file, or the reverse: one line naming it (a
    traceback from the first write before)."""
    import shutil

    run = _copy_run(decoder_run, tmp_path)
    path = run / entry
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.mkdir() if folder else path.write_text("")
    assert_refused(["train-decoder", "--data", decoder_run["shards"], "-o", run, "--resume",
                    *TRAIN, "steps=6"], capfd, entry.split("/")[-1], "is in the way")


def test_too_few_samples_per_loader_worker_says_why(tmp_path, capfd):
    """15 training samples in shards of 4: enough for a batch of 8 in all, but each of 4
    loader workers batches only its own shard's. The line said 'too few samples' and no
    more; it now says how the shards are dealt out."""
    corpus, shards = tmp_path / "corpus", tmp_path / "shards"
    assert cli.main(["make-demo-data", "-o", str(corpus), "--speakers", "4", "--frames", "1"]) == 0
    assert cli.main(["prepare", "voxceleb1", "--root", str(corpus), "-o", str(shards),
                     "--samples-per-shard", "4", "--frames-per-video", "1"]) == 0
    capfd.readouterr()
    status, _, err, _ = run_cli(["train-decoder", "--data", shards, "-o", tmp_path / "run",
                                 "--no-progress", "preset=tiny", "steps=1", "batch_size=8",
                                 "num_workers=4", "val_batches=0"], capfd)
    assert status == 2 and "too few samples for one step" in err, err
    assert "1 process(es) x 4 loader worker(s)" in err and "fewer num_workers" in err


def test_an_output_that_is_a_file_or_a_broken_link_is_named_as_such(tmp_path):
    """Not "cannot create the output folder (File exists)", which reads as a bug."""
    from speech2face.errors import Speech2FaceError
    from speech2face.utils import output_lock

    (tmp_path / "afile").write_text("x")
    (tmp_path / "broken").symlink_to("nowhere/x")
    with pytest.raises(Speech2FaceError, match=r"afile: is a file; the output is a folder$"):
        with output_lock(tmp_path / "afile"):
            pass
    with pytest.raises(Speech2FaceError, match=r"broken: is a broken symbolic link \(to "
                                               r"nowhere/x\); the output is a folder$"):
        with output_lock(tmp_path / "broken"):
            pass
    for folder in (True, False):  # a file where a folder above the output must be
        with pytest.raises(Speech2FaceError,
                           match=r"sub/report.md: \S+/afile is a file, not a folder$"):
            with output_lock(tmp_path / "afile" / "sub" / "report.md", folder=folder):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "broken"]
