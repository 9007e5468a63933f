"""The web page and ``POST /reconstruct`` (speech2face.serve), over real HTTP and in Chromium.

Every server here is started by the test on a free port of 127.0.0.1. The browser tests
drive Debian's ``chromium`` with selenium and ``chromium-driver``; when those are missing,
the session installs them with apt-get (as root), and skips only where that is impossible.

The README's screenshot comes from the browser test: with ``SPEECH2FACE_SCREENSHOT=PATH``
it is also saved there, and ``SPEECH2FACE_SERVE_MODEL``, ``SPEECH2FACE_SERVE_GALLERY`` and
``SPEECH2FACE_SERVE_AUDIO`` (a bundle, prepared shards, a clip) replace the tiny random
model, its generated gallery and voice (docs/serve.md).
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from test_inference import RATE, _tiny_model

from speech2face import inference, serve
from speech2face.cli import main

pytest.importorskip("starlette", reason="the [web] extra is not installed")
pytest.importorskip("uvicorn", reason="the [web] extra is not installed")

CAP_MB = 1.0  # upload cap of the test servers: small, so over-cap bodies are cheap
GALLERY = 7


# ----------------------------------------------------------------------------- fixtures


def _voice(f0: float, seed: int, seconds: float = 2.0) -> np.ndarray:
    """A vowel-like voice at pitch ``f0``: harmonics of a wobbling pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (0.3 * wave / np.abs(wave).max() + 0.01 * rng.normal(size=t.size)).astype(np.float32)


PITCHES = (90.0, 150.0, 220.0, 320.0)  # Hz: one test voice each


def _responsive_model():
    """The tiny random model, made to give each voice its own face.

    Freshly initialised, its voice encoder's BatchNorm statistics (mean 0, variance 1)
    squash every input to nearly the same feature, its landmark head starts at zero and
    its texture is a flat grey: every voice gives the same picture, and a server that
    mixed up requests would pass. So: BatchNorm statistics measured on the test voices,
    a random landmark head, and a texture with contrast for the landmarks to move.
    """
    import torch

    from speech2face.audio import fit_duration, spectrogram

    model = _tiny_model()
    specs = spectrogram(np.stack([fit_duration(_voice(f0, 9)) for f0 in PITCHES]))
    for module in model.voice_encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over what it sees
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        model.predict_features(specs)
        model.eval()
        head = model.face_decoder.landmarks[-1]
        head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=generator))
        model.face_decoder.to_rgb.weight.mul_(30)
        model.face_decoder.to_rgb.bias.zero_()
    return model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from speech2face.model import save_model

    return save_model(_responsive_model(), tmp_path_factory.mktemp("model") / "bundle")


def _gallery(feature_dim: int) -> serve.Gallery:
    """Faces tinted apart from the bundled public-domain face, random unit features."""
    rng = np.random.default_rng(5)
    base = np.asarray(Image.open(Path(serve.__file__).with_name("assets") / "face.jpg")
                      .resize((224, 224)), dtype=float)
    faces = []
    for _ in range(GALLERY):
        tinted = np.clip(base * (0.6 + 0.4 * rng.random(3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(tinted).save(buffer, format="JPEG")
        faces.append(buffer.getvalue())
    features = rng.normal(size=(GALLERY, feature_dim)).astype(np.float32)
    return serve.Gallery(Path("generated"), "dlib", [f"id{i:02d}" for i in range(GALLERY)],
                         features, faces)


class Running:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, server: serve.FaceServer):
        import uvicorn

        self.server = server
        sock = serve.bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.uvicorn = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="error",
                                                     access_log=False))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def running(bundle):
    server = serve.FaceServer(bundle, _gallery(16), max_upload_mb=CAP_MB)
    live = Running(server)
    yield live
    live.stop()
    assert not server.upload_root.exists()  # the server's temporary folder goes with it


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    files = {}
    for i, f0 in enumerate(PITCHES):
        files[f"voice{i}"] = folder / f"voice{i}.wav"
        sf.write(files[f"voice{i}"], _voice(f0, i, seconds=1.5 + i), RATE, subtype="FLOAT")
    return files


def _multipart(filename: str, data: bytes, field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _request(live: Running, method: str, path: str, body=None, headers=None):
    """``(status, content type, body bytes)`` of one request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def _post(live: Running, filename: str, data: bytes, path: str = "/reconstruct"):
    body, kind = _multipart(filename, data)
    return _request(live, "POST", path, body, {"Content-Type": kind})


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _error(status: int, kind: str, body: bytes, code: int = 400) -> str:
    assert status == code and kind == "application/json", (status, kind, body[:200])
    message = json.loads(body)["error"]
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------- HTTP


def test_endpoint_gives_the_same_face_as_the_cli(running, clips, bundle, tmp_path):
    status, kind, body = _post(running, "voice0.wav", clips["voice0"].read_bytes())
    assert status == 200 and kind == "image/png"
    out = tmp_path / "cli.png"
    assert main(["reconstruct", str(clips["voice0"]), "-o", str(out), "--model", str(bundle)]) == 0
    np.testing.assert_array_equal(_png(body), np.asarray(Image.open(out)))
    assert _png(body).shape == (224, 224, 3)


def test_page_status_and_details(running, clips, bundle):
    status, kind, page = _request(running, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="file"' in page
    state = json.loads(_request(running, "GET", "/status")[2])
    assert state["ready"] and state["gallery"] == GALLERY
    assert state["max_upload_bytes"] == CAP_MB * 1e6 and "1 MB" in state["too_large"]
    status, kind, body = _post(running, "voice1.wav", clips["voice1"].read_bytes(),
                               "/api/reconstruct")
    assert status == 200 and kind == "application/json"
    details = json.loads(body)

    def image(url: str) -> np.ndarray:
        head, data = url.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    result = inference.reconstruct_face(clips["voice1"], bundle)
    np.testing.assert_array_equal(image(details["face"]), result.image)
    assert image(details["landmarks"]).shape == (224, 224, 3)
    assert not np.array_equal(image(details["landmarks"]), result.image)
    assert image(details["spectrogram"]).shape == (257, 598, 3)  # (F, T) of 6 s
    # Nearest faces: the gallery ranked by cosine distance, as scipy ranks it.
    from scipy.spatial.distance import cdist

    gallery = running.server.gallery
    distances = cdist(result.feature[None].astype(float), gallery.features.astype(float),
                      "cosine")[0]
    expected = [gallery.identities[i] for i in np.argsort(distances)[:serve.NEIGHBOURS]]
    assert [n["identity"] for n in details["neighbours"]] == expected
    np.testing.assert_allclose([n["similarity"] for n in details["neighbours"]],
                               1 - np.sort(distances)[:serve.NEIGHBOURS], atol=1e-4)
    assert details["name"] == "voice1.wav"


def _video_without_audio(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_bad_uploads_get_one_line_400_and_the_server_keeps_serving(running, clips, tmp_path):
    _video_without_audio(tmp_path / "silent-film.mp4")
    cases = {
        "empty.wav": (b"", "empty.wav: empty file"),
        "noise.mp3": (np.random.default_rng(0).bytes(50_000), "noise.mp3: not a readable"),
        "silent-film.mp4": ((tmp_path / "silent-film.mp4").read_bytes(),
                            "silent-film.mp4: no audio track"),
        "notes.wav": (b"shopping list: eggs, milk\n" * 40, "notes.wav: not a readable"),
        "huge.wav": (b"\0" * int(CAP_MB * 1e6 + 100_000), "larger than the 1 MB cap"),
    }
    for name, (data, expected) in cases.items():
        message = _error(*_post(running, name, data))
        assert expected in message, (name, message)
        assert str(running.server.upload_root) not in message  # the client's name, not ours
    # Not multipart, and multipart without a field named "file".
    message = _error(*_request(running, "POST", "/reconstruct", b"RIFF",
                               {"Content-Type": "audio/wav"}))
    assert "multipart/form-data" in message
    body, kind = _multipart("a.wav", clips["voice0"].read_bytes(), field="audio")
    assert "field named 'file'" in _error(*_request(running, "POST", "/reconstruct", body,
                                                    {"Content-Type": kind}))
    status, kind, body = _post(running, "voice0.wav", clips["voice0"].read_bytes())
    assert status == 200 and kind == "image/png"
    assert list(running.server.upload_root.iterdir()) == []  # every upload folder removed


def test_oversize_bodies_are_refused_before_they_are_read(running):
    # Content-Length over the cap: the answer comes with no body sent at all.
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    connection.putrequest("POST", "/reconstruct")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(10**12))
    connection.endheaders()
    response = connection.getresponse()
    assert "larger than the 1 MB cap" in _error(response.status,
                                                response.getheader("Content-Type"),
                                                response.read())
    connection.close()

    # No Content-Length (chunked): cut off once the file part passes the cap.
    body, kind = _multipart("stream.wav", b"\1" * (4 * int(CAP_MB * 1e6)))
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    pieces = (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16))
    try:
        connection.request("POST", "/reconstruct", body=pieces, encode_chunked=True,
                           headers={"Content-Type": kind})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading before the end: what it should do
    response = connection.getresponse()
    assert "larger than the 1 MB cap" in _error(response.status,
                                                response.getheader("Content-Type"),
                                                response.read())
    connection.close()


def test_malformed_multipart_bodies_get_one_line_400(running, caplog):
    kind = "multipart/form-data; boundary=XyZ"
    bodies = {
        "not multipart": b"this is not multipart at all\r\n\r\n",
        "header without colon": b"--XyZ\r\nNoColonHeader\r\n\r\nabc\r\n--XyZ--\r\n",
        "junk after boundary": (b'--XyZjunk\r\nContent-Disposition: form-data; name="file"; '
                                b'filename="a.wav"\r\n\r\nabc\r\n--XyZ--\r\n'),
        "oversized header": b"--XyZ\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\nabc\r\n--XyZ--\r\n",
        # cut in half: decoded as truncated audio, it blamed the audio, not the upload
        "no closing boundary": (b'--XyZ\r\nContent-Disposition: form-data; name="file"; '
                                b'filename="a.wav"\r\n\r\nabc'),
    }
    for name, body in bodies.items():
        for path in ("/reconstruct", "/api/reconstruct"):
            status, content, reply = _request(running, "POST", path, body,
                                              {"Content-Type": kind})
            assert "multipart" in _error(status, content, reply), name
    # a boundary of 300 bytes (RFC 2046 allows 70; the parser refuses it when made): a 500
    long = "b" * 300
    body = (f'--{long}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
            f"\r\n\r\nabc\r\n--{long}--\r\n").encode()
    for path in ("/reconstruct", "/api/reconstruct"):
        status, content, reply = _request(running, "POST", path, body,
                                          {"Content-Type": f"multipart/form-data; boundary={long}"})
        assert "malformed multipart" in _error(status, content, reply)
    # the parser's own warnings ("Expected boundary character ...") stay off the log
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]


def test_a_client_that_leaves_mid_upload_costs_no_traceback(running, clips, caplog):
    """Headers and 1,000 of the 100,000 bytes announced, then the connection closes:
    uvicorn logged a 47-line "Exception in ASGI application" (ClientDisconnect)."""
    import logging
    import socket

    body, kind = _multipart("a.wav", clips["voice0"].read_bytes())
    with caplog.at_level(logging.ERROR):
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall((f"POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Content-Type: {kind}\r\nContent-Length: {len(body) + 100_000}"
                          "\r\n\r\n").encode() + body[:1000])
        time.sleep(1.0)
        status, _, _ = _request(running, "GET", "/status")
    assert status == 200
    assert not [r for r in caplog.records if "Exception in ASGI" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]


def test_chunked_bodies_count_every_part_toward_the_cap(running):
    boundary = "XyZ"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="padding"\r\n\r\n'.encode()
    body = head + b"A" * (4 * int(CAP_MB * 1e6)) + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    pieces = (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16))
    try:
        connection.request("POST", "/reconstruct", body=pieces, encode_chunked=True,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    assert "larger than the 1 MB cap" in _error(response.status,
                                                response.getheader("Content-Type"),
                                                response.read())
    connection.close()


def test_a_two_hour_recording_is_refused_undecoded(running, tmp_path, monkeypatch):
    # Two hours at 8 kHz, silent so that FLAC stores it in a few hundred kB.
    path = tmp_path / "lecture.flac"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, format="FLAC",
                      subtype="PCM_16") as f:
        block = np.zeros(8000 * 600, np.int16)
        for _ in range(12):
            f.write(block)
    assert path.stat().st_size < CAP_MB * 1e6
    decoded = []
    monkeypatch.setattr(inference, "prepare_audio", lambda *a, **k: decoded.append(a))
    message = _error(*_post(running, "lecture.flac", path.read_bytes()))
    assert message == ("lecture.flac: 7200 s long, over the 600-s cap "
                       "(only the first 6 s are used: send those)")
    assert decoded == []


def test_declared_seconds_reads_the_header_only(tmp_path):
    from test_inference import _write_av

    from speech2face.audio import declared_seconds

    wave = _voice(150.0, 0, seconds=3.0)
    sf.write(tmp_path / "a.wav", wave, RATE)
    assert declared_seconds(tmp_path / "a.wav") == 3.0
    # A cut-off WAV still declares its full length (libsndfile alone would shrink it).
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) // 3])
    assert declared_seconds(tmp_path / "cut.wav") == 3.0
    _write_av(tmp_path / "a.mp4", wave, "aac", fmt="mp4")
    assert abs(declared_seconds(tmp_path / "a.mp4") - 3.0) < 0.1  # AAC frames pad the end
    (tmp_path / "notes.wav").write_text("not audio\n")
    assert declared_seconds(tmp_path / "notes.wav") is None
    # A streamed FLAC declares 0 samples (libsndfile: an unknown length): no duration,
    # and the file decodes whole, to its end.
    sf.write(tmp_path / "stream.flac", wave, RATE, subtype="PCM_16")
    data = bytearray((tmp_path / "stream.flac").read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    data[21] &= 0xF0  # its 36-bit sample count: the low 4 bits of byte 21, bytes 22-25
    data[22:26] = bytes(4)
    (tmp_path / "stream.flac").write_bytes(data)
    assert declared_seconds(tmp_path / "stream.flac") is None
    from speech2face.audio import load_audio

    np.testing.assert_allclose(load_audio(tmp_path / "stream.flac"), wave, atol=1 / 32768)


@pytest.mark.parametrize(("host", "own"), [
    ("::1", "[::1]:7860"), ("127.0.0.2", "127.0.0.2:7860"), ("LOCALHOST", "localhost:7860"),
])
def test_bound_to_any_loopback_address_it_answers_only_loopback_names(host, own):
    """--host ::1, 127.0.0.2 or LOCALHOST is guarded against DNS rebinding as 127.0.0.1
    is (an IPv6 address is bracketed in a Host header); the guard was off for all but
    three spellings."""
    import asyncio

    assert serve.is_loopback(host) and not serve.is_loopback("0.0.0.0")
    assert not serve.is_loopback("example.org") and not serve.is_loopback("10.0.0.1")
    app = serve.create_app(serve.FaceServer(None), host)

    def status(host: str) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/status", "raw_path": b"/status",
                 "query_string": b"", "headers": [(b"host", host.encode())],
                 "scheme": "http", "server": ("::1", 7860), "client": ("::1", 5000),
                 "http_version": "1.1", "root_path": ""}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"]

    assert status("attacker.example:7860") == 400
    assert status("[::1]:7860") == 200 and status("localhost:7860") == 200


def test_concurrent_requests_do_not_mix(running, clips, bundle):
    expected = {name: inference.reconstruct(path, bundle) for name, path in clips.items()}
    faces = list(expected.values())
    # Each voice gives its own face, so a mix-up would show.
    assert all(not np.array_equal(a, b) for i, a in enumerate(faces) for b in faces[i + 1:])
    jobs = [name for name in clips for _ in range(3)]
    barrier = threading.Barrier(len(jobs))
    results: dict[int, np.ndarray] = {}
    failures = []

    def work(index: int, name: str) -> None:
        try:
            data = clips[name].read_bytes()
            barrier.wait(timeout=30)
            status, _, body = _post(running, f"{name}.wav", data)
            assert status == 200, body
            results[index] = _png(body)
        except Exception as error:  # reported below, from the test's thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(i, name)) for i, name in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    for index, name in enumerate(jobs):
        np.testing.assert_array_equal(results[index], expected[name], err_msg=name)
    assert list(running.server.upload_root.iterdir()) == []


def test_uploads_are_written_only_in_the_servers_temporary_folder(running, clips, monkeypatch):
    seen = []
    original = serve.FaceServer.reconstruct_file

    def spy(self, path, name):
        seen.append((path, path.read_bytes()))
        return original(self, path, name)

    monkeypatch.setattr(serve.FaceServer, "reconstruct_file", spy)
    data = clips["voice2"].read_bytes()
    assert _post(running, "../../etc/voice2.WAV", data)[0] == 200
    path, content = seen[0]
    # Inside a per-request folder of the server's own; the client's path is not used.
    assert path.parent.parent == running.server.upload_root and path.name == "upload.wav"
    assert content == data and not path.parent.exists()



def test_uploads_from_another_sites_page_are_refused(running, clips):
    """A page of any web site the user visits could post a form to the server on
    127.0.0.1 (a multipart POST has no preflight) and have it decode and reconstruct.
    The browser names the page's origin: another host is refused (403), as is a
    sandboxed page's "null"; the server's own page and clients without an Origin pass."""
    wav = clips["voice0"].read_bytes()
    body, kind = _multipart("a.wav", wav)
    own = f"http://127.0.0.1:{running.port}"
    for origin, expected in (("https://attacker.example", 403), ("null", 403),
                             (f"http://localhost:{running.port}", 403), (own, 200)):
        status, _, answer = _request(running, "POST", "/reconstruct", body,
                                     {"Content-Type": kind, "Origin": origin})
        assert status == expected, (origin, answer[:200])
        if expected == 403:
            assert b"another site" in answer
    assert _post(running, "a.wav", wav)[0] == 200

def test_requests_for_other_host_names_are_refused(running):
    # Bound to loopback, the app answers only loopback names (no DNS rebinding).
    status, _, _ = _request(running, "GET", "/status", headers={"Host": "attacker.example"})
    assert status == 400
    assert _request(running, "GET", "/status", headers={"Host": "localhost:1"})[0] == 200


def test_a_broken_demo_model_is_named_not_said_missing(tmp_path, monkeypatch):
    from speech2face.inference import default_model_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default_model_path().mkdir(parents=True)
    (default_model_path() / "config.json").write_text("{bad")
    state = serve.FaceServer(None).status()
    assert not state["ready"] and "No model yet" not in state["message"]
    assert "config.json" in state["message"]


def test_a_server_dropped_without_close_leaves_no_upload_folder():
    import gc

    server = serve.FaceServer(None)
    uploads = server.upload_root
    assert uploads.is_dir()
    del server
    gc.collect()
    assert not uploads.exists()
    closed = serve.FaceServer(None)
    closed.close()
    closed.close()  # twice is harmless
    assert not closed.upload_root.exists()


def test_a_cap_under_six_seconds_gives_advice_that_can_be_followed(tmp_path, bundle):
    import soundfile as sf

    sf.write(tmp_path / "three.wav", np.full(3 * RATE, 0.1, np.float32), RATE)
    server = serve.FaceServer(str(bundle), max_seconds=2)
    try:
        with pytest.raises(serve.AudioError, match=r"over the 2-s cap \(send at most 2 s\)"):
            server.reconstruct_file(tmp_path / "three.wav", "three.wav")
    finally:
        server.close()


def test_no_model_yet_says_what_to_do(tmp_path, monkeypatch, clips):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    live = Running(serve.FaceServer(None))
    try:
        state = json.loads(_request(live, "GET", "/status")[2])
        assert not state["ready"] and "make demo" in state["message"]
        assert "--model" in state["message"]
        message = _error(*_post(live, "voice0.wav", clips["voice0"].read_bytes()), code=503)
        assert message == state["message"]
    finally:
        live.stop()


def test_spectrogram_image_puts_a_tone_at_its_frequency():
    from speech2face.audio import CLIP_SAMPLES, N_FREQ, spectrogram

    t = np.arange(CLIP_SAMPLES) / 16_000
    picture = serve.spectrogram_image(spectrogram(np.sin(2 * np.pi * 2000 * t)))
    assert picture.shape == (N_FREQ, 598, 3) and picture.dtype == np.uint8
    brightness = picture.astype(int).sum(axis=(1, 2))
    # 2 kHz is bin 64 of 257 (bin k is k * 16000 / 512 Hz), and the top row is 8 kHz.
    assert int(np.argmax(brightness)) == 256 - 64


# --------------------------------------------------------------------------- gallery


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from speech2face import data
    from speech2face.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("gallery")
    make_demo_data(root / "corpus", speakers=3, seed=4, videos=(1, 1), clips=(1, 1), frames=1,
                   progress=False)
    data.prepare("voxceleb1", root / "corpus", root / "shards", progress=False)
    return root / "shards"


def test_gallery_holds_one_face_per_identity_from_the_shards(shards):
    import tarfile

    gallery = serve.load_gallery(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sorted(gallery.identities) == sorted(manifest["identities"])
    assert gallery.features.shape == (len(manifest["identities"]), manifest["feature_dim"])
    # Each identity's feature and crop as the tar holds them, read here with tarfile.
    stored = {}
    for tar_path in sorted(shards.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    key = member.name[:-len(".json")]
                    identity = json.loads(tar.extractfile(member).read())["identity"]
                    feature = np.load(io.BytesIO(tar.extractfile(key + ".feature.npy").read()))
                    stored.setdefault(identity, (feature, tar.extractfile(key + ".face.jpg")
                                                 .read()))
    for identity, feature, face in zip(gallery.identities, gallery.features, gallery.faces,
                                       strict=True):
        np.testing.assert_array_equal(feature, stored[identity][0])
        assert face == stored[identity][1]
    with pytest.raises(serve.DataError, match="no split 'nope'"):
        serve.load_gallery(shards, "nope")


def test_gallery_checks_each_shards_size_and_sha256(shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = sorted(copy.glob("*/*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1  # tar padding: still a readable tar, but not the manifest's bytes
    tar.write_bytes(bytes(data))
    with pytest.raises(serve.DataError, match="SHA-256"):
        serve.load_gallery(copy)


def test_gallery_features_are_checked_as_the_loader_checks_them(tmp_path):
    """A feature member whose header claims 1.86 TiB: refused before numpy allocates it,
    naming the shard and the sample (numpy's MemoryError before)."""
    from test_data_integrity import FEATURE_MEMBERS, _one_sample_split

    root = _one_sample_split(tmp_path, **FEATURE_MEMBERS["huge header"][0])
    with pytest.raises(serve.DataError, match="id00000/v00/00000 .*header claims") as error:
        serve.load_gallery(root)
    assert str(root / "train" / "train-000000.tar") in str(error.value)


def test_serve_command_errors_are_one_line(shards, bundle, tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["serve", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    # The tiny model predicts 16-D features; the shards hold dlib's 128-D ones.
    assert "128-D" in error("--model", str(bundle), "--gallery", str(shards))
    assert "manifest" in error("--model", str(bundle), "--gallery", str(tmp_path))
    assert str(tmp_path / "none") in error("--model", str(tmp_path / "none"))
    busy = serve.bind("127.0.0.1", 0)
    try:
        assert "cannot listen" in error("--model", str(bundle), "--port",
                                        str(busy.getsockname()[1]))
    finally:
        busy.close()
    for argv in (["--port", "99999"], ["--max-upload-mb", "0"], ["--max-seconds", "nan"],
                 ["--max-upload-mb", "1e308"], ["--max-seconds", "1e300"],
                 ["--device", "banana"], ["--port", "\u0661\u0662\u0663"]):  # Arabic digits
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2
    capsys.readouterr()
    assert "--gallery-split: takes the gallery's split: give --gallery too" in error(
        "--model", str(bundle), "--gallery-split", "test")


def _serve_process(bundle: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """``speech2face serve`` in its own process on a free port (its TMPDIR ``tmp_path``),
    once it has said its address: (process, port)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "speech2face", "serve", "--model", str(bundle), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    assert line.startswith("speech2face serve: http://127.0.0.1:"), line
    return process, int(line.split("127.0.0.1:")[1].split("/")[0])


def test_serve_command_runs_until_interrupted(bundle, clips, tmp_path):
    process, port = _serve_process(bundle, tmp_path)
    try:
        body, kind = _multipart("voice0.wav", clips["voice0"].read_bytes())
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/reconstruct", body=body, headers={"Content-Type": kind})
        response = connection.getresponse()
        assert response.status == 200 and _png(response.read()).shape == (224, 224, 3)
        connection.close()
        assert [p.name[:len("speech2face-serve-")] for p in tmp_path.iterdir()] == [
            "speech2face-serve-"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert list(tmp_path.iterdir()) == []  # its temporary folder went with it


def _answer(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (headers and body may
    come in separate packets)."""
    chunks = []
    while chunk := client.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _stalled_upload(port: int) -> socket.socket:
    """A client that sends its request's headers and the start of its body, then nothing."""
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                   b"multipart/form-data; boundary=X\r\nContent-Length: 1000\r\n\r\n--X\r\n")
    return client


def test_a_stalled_upload_is_answered_408(running, monkeypatch):
    """Headers, then nothing: the connection and its upload folder were held for as long
    as the client liked (50 such connections, 50 folders)."""
    monkeypatch.setattr(serve, "UPLOAD_IDLE_SECONDS", 0.5)
    client = _stalled_upload(running.port)
    try:
        answer = _answer(client)
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the upload stalled: nothing arrived for 0.5 s" in answer
    deadline = time.monotonic() + 5
    while any(running.server.upload_root.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running.server.upload_root.iterdir())  # its folder went



def test_an_upload_that_trickles_is_answered_408(running, monkeypatch):
    """A byte now and then, never nothing for the idle limit: the connection and its
    upload folder were held for ever. After the idle limit an upload must also average
    MIN_UPLOAD_BYTES_PER_SECOND."""
    monkeypatch.setattr(serve, "UPLOAD_IDLE_SECONDS", 1.0)
    client = _stalled_upload(running.port)
    try:
        for _ in range(40):  # a byte every 0.25 s, never idle for 1 s, until answered
            if select.select([client], [], [], 0.25)[0]:
                break
            client.sendall(b"x")
        answer = _answer(client)
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert re.search(rb"the upload stalled: \d+ bytes in \d+ s, less than 32 KiB/s", answer)
    deadline = time.monotonic() + 5
    while any(running.server.upload_root.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running.server.upload_root.iterdir())  # its folder went

def test_sigterm_stops_the_server_while_an_upload_is_stalled(bundle, tmp_path):
    """SIGTERM (or Ctrl+C) waited for the stalled client to give up (58 s): the upload is
    answered 503 at once and the command exits 0, its temporary folder removed."""
    process, port = _serve_process(bundle, tmp_path)
    try:
        client = _stalled_upload(port)
        time.sleep(0.5)  # the request is in the app, waiting for its body
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)  # (it waited for the client: 30 s here)
        answer = _answer(client)
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert answer.startswith(b"HTTP/1.1 503 ") and b"the server is stopping" in answer, answer
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- browser

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 # A generated microphone (a beep), granted without asking: the recorder runs.
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--window-size=1200,900")
DEBIAN_PACKAGES = ("chromium", "chromium-driver")


def _browser_paths() -> tuple[str, str]:
    """``(chromium, chromedriver)``: Debian's packages, installed with apt-get if missing."""

    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    if all(found()):
        return found()
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium and chromium-driver are missing and cannot be installed here "
                    "(needs apt-get as root): apt-get install chromium chromium-driver")
    # One installer at a time across pytest-xdist workers; apt waits for dpkg's own lock.
    lock = Path(tempfile.gettempdir()) / "speech2face-chromium-install.lock"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if not all(found()):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                       "-o", "DPkg::Lock::Timeout=600", *DEBIAN_PACKAGES]
            if subprocess.run(install, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                done = subprocess.run(install, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    pytest.skip("apt-get could not install chromium: "
                                + (done.stderr.strip().splitlines() or ["?"])[-1])
    if not all(found()):
        pytest.skip("chromium installed, but chromium or chromedriver is not on PATH")
    return found()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("selenium", reason="selenium (the [dev] extra) is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(bundle):
    """The tiny model and a generated gallery, or those named by the environment (the
    README's screenshot: the demo's model and its shards)."""
    model = os.environ.get("SPEECH2FACE_SERVE_MODEL") or bundle
    gallery = os.environ.get("SPEECH2FACE_SERVE_GALLERY")
    server = serve.FaceServer(model, serve.load_gallery(gallery) if gallery else _gallery(16),
                              max_upload_mb=CAP_MB)
    live = Running(server)
    yield live
    live.stop()


def _wait(driver, condition, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def _face_shown(driver, name: str):
    """The face's decoded size once the page shows the result for ``name``, else None."""
    size = driver.execute_script(
        "const img = document.getElementById('face');"
        "return !document.getElementById('result').hidden && img.complete"
        " && document.getElementById('name').textContent === arguments[0]"
        " ? [img.naturalWidth, img.naturalHeight] : null;", name)
    return size if size and size[0] else None


def _data_url_image(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head.startswith("data:image/")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_page_in_chromium(browser, page_server, clips, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)
    upload = browser.find_element(By.ID, "file")
    _wait(browser, lambda d: upload.is_enabled())
    # absolute: the browser's file input takes no relative path
    audio = Path(os.environ.get("SPEECH2FACE_SERVE_AUDIO") or clips["voice3"]).resolve()
    upload.send_keys(str(audio))
    assert _wait(browser, lambda d: _face_shown(d, audio.name)) == [224, 224]
    shown = _data_url_image(browser.find_element(By.ID, "face").get_attribute("src"))
    np.testing.assert_array_equal(shown, inference.reconstruct(
        audio, page_server.server.model_arg))
    spectrogram = browser.find_element(By.ID, "spectrogram")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                  spectrogram) == [598, 257]
    neighbours = browser.find_elements(By.CSS_SELECTOR, "#neighbours img")
    assert len(neighbours) == min(serve.NEIGHBOURS, len(page_server.server.gallery.identities))
    browser.find_element(By.ID, "show-landmarks").click()
    with_landmarks = _data_url_image(browser.find_element(By.ID, "face").get_attribute("src"))
    assert with_landmarks.shape == shown.shape and not np.array_equal(with_landmarks, shown)
    screenshot = browser.get_screenshot_as_png()
    assert Image.open(io.BytesIO(screenshot)).size[0] > 0
    (tmp_path / "serve.png").write_bytes(screenshot)
    if os.environ.get("SPEECH2FACE_SCREENSHOT"):
        # In the format the name asks for (the README's is a JPEG).
        Image.open(io.BytesIO(screenshot)).convert("RGB").save(
            os.environ["SPEECH2FACE_SCREENSHOT"], quality=85)


def test_page_shows_one_line_for_bad_files(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)
    upload = browser.find_element(By.ID, "file")
    _wait(browser, lambda d: upload.is_enabled())
    message = browser.find_element(By.ID, "message")
    notes = tmp_path / "notes.wav"
    notes.write_text("shopping list: eggs, milk\n" * 40)
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * int(CAP_MB * 1e6 + 1))
    for path, expected in ((notes, "notes.wav: not a readable audio or video file"),
                           (big, page_server.server.too_large)):
        upload.send_keys(str(path))
        _wait(browser, lambda d, e=expected: e in message.text
              and "error" in message.get_attribute("class"))
        assert len(message.text.splitlines()) == 1
        # The same line as the endpoint's JSON error.
        status, kind, body = _post(page_server, path.name, path.read_bytes())
        assert _error(status, kind, body) == message.text
    assert upload.is_enabled()  # ready for the next file


def test_page_records_from_the_microphone(browser, page_server):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)
    record = browser.find_element(By.ID, "record")
    _wait(browser, lambda d: record.is_enabled())
    record.click()
    _wait(browser, lambda d: "Stop" in record.text)
    time.sleep(1.5)
    record.click()
    assert _wait(browser, lambda d: _face_shown(d, "recording.webm")) == [224, 224]
