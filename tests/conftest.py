import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def private_user_cache(tmp_path_factory):
    """The tests never write the user's own cache (~/.cache/speech2face: the detector
    copy, the demo's model); commands they start inherit the setting. Tests that need
    their own cache set ``XDG_CACHE_HOME`` again."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    # and leave nothing in the machine's /tmp: the commands' own temporary files (torchrun
    # leaves a torchelastic_* folder per run) go where pytest prunes old runs
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    yield
    patch.undo()


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_test_process():
    """`make test` runs two test processes (pytest -n 2) on CI's two cores: each, and the
    commands it starts, computes on one thread (tests that are about threads set their
    own count). With two threads each, four threads shared two cores: on a 2-core Zen 1
    a fresh clone's `make test` took 486 s, and 384 s with this."""
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


@pytest.fixture
def one_thread():
    """Small problems: on a busy 2-core machine, thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def killed_in_video(n: int):
    """``prepare`` killed (KeyboardInterrupt) when it starts its ``n``-th video."""
    from speech2face.data.prepare import _Processor

    calls = {"n": 0}
    original = _Processor.__call__

    def crash(self, unit):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, unit)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Processor, "__call__", crash)
        yield


@contextlib.contextmanager
def claim_held(folder: Path, num_shards: int, command: str):
    """Another process holds ``utils.sharding_claim`` on ``folder`` (a running job of a
    ``num_shards``-part array) until the block ends; then it is killed."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from speech2face.utils import sharding_claim\n"
         "with sharding_claim(sys.argv[1], int(sys.argv[2]), sys.argv[3]):\n"
         " print('held', flush=True); time.sleep(60)", str(folder), str(num_shards), command],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# ------------------------------------------ videos of generated speakers (AVSpeech tests)

VIDEO_FPS = 10


def make_mp4(
    path: Path, frames: list[np.ndarray], audio: np.ndarray | None, seconds: float
) -> bytes:
    """Write and return an MP4 of ``frames`` shown one after another for ``seconds`` in
    all, with ``audio`` (16 kHz) under them: H.264 + ALAC (lossless and, unlike AAC,
    without priming samples), the index at the front so that a reader can seek over HTTP."""
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        # A keyframe a second, as video sites do: a reader seeks to near the segment.
        video = out.add_stream(
            "libx264", rate=VIDEO_FPS, options={"preset": "ultrafast", "g": str(VIDEO_FPS)}
        )
        video.width, video.height = frames[0].shape[1], frames[0].shape[0]
        video.pix_fmt = "yuv420p"
        astream = None
        if audio is not None:
            astream = out.add_stream("alac", rate=16000, layout="mono")
        n = int(seconds * VIDEO_FPS)
        for i in range(n):
            image = frames[i * len(frames) // n]
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        if astream is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = 16000
            out.mux(astream.encode(frame))
            out.mux(astream.encode())
    return path.read_bytes()


@pytest.fixture(scope="session")
def demo_speakers(tmp_path_factory):
    """Per generated speaker (3): its face frames (one per video, 2 videos) and 8 s of
    its speech (16 kHz float32)."""
    import soundfile as sf
    from PIL import Image

    from speech2face.demo_data import make_demo_data

    root = make_demo_data(
        tmp_path_factory.mktemp("demo") / "corpus", speakers=3, videos=(2, 2), clips=(3, 3),
        frames=1, workers=1, progress=False,
    )
    rows = (root / "vox1_meta.csv").read_text().splitlines()[1:]
    out = []
    for identity, name in sorted(tuple(r.split("\t")[:2]) for r in rows):
        clips = sorted((root / "wav" / identity).rglob("*.wav"))
        wave = np.concatenate([sf.read(p, dtype="float32")[0] for p in clips])
        frames = [np.asarray(Image.open(p).convert("RGB"))
                  for p in sorted((root / "unzippedFaces" / name).rglob("*.jpg"))]
        out.append((frames, wave[: 8 * 16000]))
    return out


def interrupt_at(monkeypatch, owner, name: str, call: int, record=lambda *args: args[0]):
    """Replace ``owner.name`` by a wrapper that appends ``record(*args)`` of each call to
    the returned list and raises KeyboardInterrupt (Ctrl-C) on call number ``call`` while
    ``wrapper.armed``. Returns ``(calls, wrapper)``."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(record(*args))
        if wrapper.armed and len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    wrapper.armed = True
    monkeypatch.setattr(owner, name, wrapper)
    return calls, wrapper
