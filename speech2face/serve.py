"""The web page: speak or upload, see the face (``speech2face serve``).

A small local web app (the optional ``[web]`` extra: Starlette on uvicorn, with
python-multipart for uploads). Its page records from the microphone or takes an audio or
video file and shows the reconstructed face (with its landmarks on request), the
spectrogram the model saw and, with ``--gallery SHARDS``, the nearest real faces of that
dataset. Beside it, ``POST /reconstruct`` with a multipart ``file`` answers ``image/png``
for scripts: the same face as ``speech2face reconstruct``, through the same
:func:`speech2face.inference.prepare_audio` and :func:`~speech2face.inference.reconstruct_waves`.
Bad input gets status 400 and ``{"error": "<one line>"}``, the line the page shows.

Safe by default: it binds 127.0.0.1 (and then answers only requests addressed to a
loopback name, so a web page cannot reach it through DNS rebinding); an upload larger
than ``--max-upload-mb`` is refused from its ``Content-Length`` before its body is read,
and cut off at the cap when it has none; a file whose header declares more than
``--max-seconds`` is refused before any audio is decoded, and of any other file only the
first 6 s are decoded; each upload lives in its own folder under one temporary folder
that is removed when the request, and the server, end.

Why Starlette and a hand-written page rather than Gradio, the usual model-demo kit: the
page needs one upload, a recorder and a few images. The ``[web]`` extra is six small
pure-Python packages (about 5 MB installed); Gradio resolves to 52 packages, pandas,
pydantic and huggingface_hub among them (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speech2face.errors import (
    AudioError,
    ConfigError,
    DataError,
    Speech2FaceError,
    WeightsError,
)

DEFAULT_HOST = "127.0.0.1"  # loopback only unless told otherwise
DEFAULT_PORT = 7860  # the port local model demos (Gradio) use, so people look there
MAX_UPLOAD_MB = 50.0  # a few minutes of WAV, an hour of compressed audio
MAX_SECONDS = 600.0  # declared duration above which a file is refused undecoded
NEIGHBOURS = 5  # nearest gallery faces shown
FRAMING_BYTES = 64 * 1024  # multipart boundaries and part headers around the file itself
CHUNK_BYTES = 1 << 16
# An upload that sends nothing for this long is answered 408 and closed: a client that
# sent its headers and then nothing held its connection, its upload folder and, on
# SIGTERM, the server's exit for as long as it liked.
UPLOAD_IDLE_SECONDS = 30.0
# After that long an upload must also average this rate: one byte every 20 s held its
# connection and folder for ever. (50 MB at this rate takes 25 minutes.)
MIN_UPLOAD_BYTES_PER_SECOND = 32 * 1024
_UPLOAD_POLL_SECONDS = 0.25  # how often a waiting upload looks at FaceServer.stopping
# Bound to an address of this machine only (is_loopback), the page answers only requests
# whose Host header names it so (no DNS rebinding). An IPv6 address is bracketed there.
_LOOPBACK_HOST_HEADERS = ("127.0.0.1", "localhost", "[::1]")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")
_ASSETS = Path(__file__).with_name("assets")


# --------------------------------------------------------------------------- gallery


@dataclass
class Gallery:
    """Real faces to compare a reconstruction with: one sample per identity of a dataset
    prepared by ``speech2face prepare``.

    ``features``: float32 ``(G, D)``, the face encoder's features of the crops;
    ``faces``: the JPEG bytes of each aligned 224 x 224 crop, as the shards hold them.
    """

    path: Path
    encoder: str
    identities: list[str]
    features: np.ndarray
    faces: list[bytes]

    def nearest(self, feature: np.ndarray, k: int = NEIGHBOURS) -> list[tuple[str, float, bytes]]:
        """``(identity, cosine similarity, jpeg)`` of the ``k`` faces nearest ``feature (D,)``."""
        from speech2face.evaluate import distance_matrix

        distances = distance_matrix(feature[None], self.features, "cosine")[0]
        order = np.argsort(distances, kind="stable")[:k]
        return [(self.identities[i], float(1.0 - distances[i]), self.faces[i]) for i in order]

    def check_model(self, model) -> None:
        """Raise DataError unless ``model`` predicts features of this gallery's kind."""
        if model.face_encoder_name != self.encoder or model.feature_dim != self.features.shape[1]:
            raise DataError(self.path, f"gallery faces are encoded by {self.encoder!r} "
                                       f"({self.features.shape[1]}-D) but the model predicts "
                                       f"{model.face_encoder_name!r} ({model.feature_dim}-D) "
                                       "features; pass shards prepared with its face encoder")


def load_gallery(shards: str | os.PathLike, split: str | None = None) -> Gallery:
    """The first sample of each identity in a prepared dataset's shards (every split, or
    ``split``); only the face crop, its feature and the identity are read.

    Raises:
        DataError: no manifest, an unknown split, an unreadable shard or a sample whose
            feature or face is missing or malformed.
    """
    from speech2face import data
    from speech2face.data.loader import sample_feature

    manifest = data.load_manifest(shards)
    root = Path(manifest["root"])
    splits = manifest["splits"]
    if split is not None and split not in splits:
        raise DataError(root, f"no split {split!r} here (it has {', '.join(sorted(splits))})")
    dim = int(manifest["feature_dim"])
    known = set(manifest["identities"])
    identities, features, faces = [], [], []
    seen: set[str] = set()
    for name in [split] if split is not None else sorted(splits):
        for shard in splits[name]["shards"]:
            for raw in data.iterate_tar(root / shard["path"], shard["size"], shard["sha256"],
                                        shard["samples"]):
                feature, identity = sample_feature(raw, dim, known, name)
                if identity in seen:
                    continue
                face = raw.get("face.jpg", b"")
                if not face.startswith(b"\xff\xd8"):
                    raise DataError(root / shard["path"], f"sample {raw['__key__']!r}: its "
                                                          f"face crop is not a JPEG")
                seen.add(identity)
                identities.append(identity)
                features.append(feature)
                faces.append(face)
    if not identities:
        raise DataError(root, "no samples in the shards")
    return Gallery(root, str(manifest["encoder"]), identities, np.stack(features), faces)


# -------------------------------------------------------------------------- the work


def spectrogram_image(spec) -> np.ndarray:
    """``(2, T, F)`` compressed complex STFT -> uint8 ``(F, T, 3)`` picture of
    ``|S|^0.3``, low frequencies at the bottom, the loudest bin brightest.

    The compression acts on the real and imaginary parts apart, so the magnitude of the
    compressed pair depends on the phase; it is undone first, and ``|S|`` compressed
    once, the same amount.
    """
    from matplotlib import colormaps

    from speech2face.audio import POWER_LAW

    parts = spec.double().abs().pow(1.0 / POWER_LAW)  # |Re S|, |Im S|
    magnitude = parts.pow(2).sum(0).sqrt().pow(POWER_LAW).T.flip(0).cpu().numpy()  # (F, T)
    scaled = magnitude / max(float(magnitude.max()), 1e-8)
    return (colormaps["magma"](scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def _data_url(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


class FaceServer:
    """What the web app does, without HTTP: model, gallery, caps and the upload folder.

    Args:
        model: a bundle path, or ``None`` for the demo model. An explicit path is loaded
            now (a bad one raises WeightsError); the demo model is looked up at each
            request, so a server started before ``speech2face demo`` finishes picks it up.
        gallery: nearest real faces to show, or ``None``.
        max_upload_mb: upload cap in MB (10^6 bytes).
        max_seconds: a file whose header declares more is refused undecoded.
    """

    def __init__(self, model=None, gallery: Gallery | None = None,
                 max_upload_mb: float = MAX_UPLOAD_MB, max_seconds: float = MAX_SECONDS,
                 device: str = "cpu"):
        self.model_arg = model
        self.gallery = gallery
        self.max_upload_bytes = int(max_upload_mb * 1e6)
        self.max_upload_mb = max_upload_mb
        self.max_seconds = max_seconds
        self.device = device
        # One forward pass at a time: each already uses every core, and a paper-size model
        # run by many requests at once would multiply its memory for no speed.
        self._model_lock = threading.Lock()
        # Set when the server is told to stop (SIGTERM, Ctrl+C): uploads still arriving
        # are answered 503 at once, so that their connections do not hold the exit.
        self.stopping = threading.Event()
        if model is not None:
            self.model()
        if gallery is not None and self.status()["ready"]:
            gallery.check_model(self.model())
        self.upload_root = Path(tempfile.mkdtemp(prefix="speech2face-serve-"))
        # Removed by close(), or when the server is garbage or the process exits (a server
        # made and dropped, as tests and notebooks do, left an empty folder in /tmp).
        self._remove_uploads = weakref.finalize(self, shutil.rmtree, self.upload_root, True)

    def model(self):
        """The loaded model (cached by path and weights' time); WeightsError if none."""
        from speech2face.inference import resolve_model

        return resolve_model(self.model_arg)

    @property
    def too_large(self) -> str:
        return f"the upload is larger than the {self.max_upload_mb:g} MB cap"

    def status(self) -> dict:
        """What the page shows before any upload: whether a model is there, the caps."""
        from speech2face.audio import CLIP_SECONDS
        from speech2face.inference import default_model_path

        try:
            self.model()
            ready, message = True, None
        except WeightsError as error:
            ready, message = False, str(error)
        if self.model_arg is None and not ready and not default_model_path().exists():
            message = (f"No model yet: run `make demo` (or `speech2face demo`) to train the demo "
                       f"model into {default_model_path()}, then reload this page; or restart "
                       "with `speech2face serve --model BUNDLE`.")
        return {
            "ready": ready,
            "message": message,
            "model": str(self.model_arg) if self.model_arg is not None else "demo",
            "gallery": None if self.gallery is None else len(self.gallery.identities),
            "max_upload_bytes": self.max_upload_bytes,
            "max_seconds": self.max_seconds,
            "clip_seconds": CLIP_SECONDS,
            "too_large": self.too_large,
        }

    def reconstruct_file(self, path: Path, name: str):
        """An uploaded file -> ``(wave, Reconstruction)``; AudioError names it ``name``."""
        from speech2face.audio import CLIP_SECONDS, declared_seconds
        from speech2face.inference import prepare_audio, reconstruct_waves

        model = self.model()
        declared = declared_seconds(path)
        if declared is not None and declared > self.max_seconds:
            advice = (f"only the first {CLIP_SECONDS:g} s are used: send those"
                      if self.max_seconds >= CLIP_SECONDS else
                      f"send at most {self.max_seconds:g} s")
            raise AudioError(name, f"{declared:.0f} s long, over the {self.max_seconds:g}-s cap "
                                   f"({advice})")
        try:
            wave = prepare_audio(path)
        except AudioError as error:
            raise AudioError(name, error.problem) from None
        with self._model_lock:
            model.to(self.device)
            return wave, reconstruct_waves(wave[None], model)[0]

    def details(self, path: Path, name: str) -> dict:
        """What the page shows: face, face with landmarks, spectrogram, nearest faces."""
        from speech2face.audio import spectrogram
        from speech2face.inference import draw_landmarks
        from speech2face.utils import png_bytes

        wave, result = self.reconstruct_file(path, name)
        neighbours = []
        if self.gallery is not None:
            self.gallery.check_model(self.model())
            neighbours = [{"identity": identity, "similarity": round(similarity, 4),
                           "face": _data_url("image/jpeg", jpeg)}
                          for identity, similarity, jpeg in self.gallery.nearest(result.feature)]
        return {
            "name": name,
            "face": _data_url("image/png", png_bytes(result.image)),
            "landmarks": _data_url("image/png", png_bytes(
                draw_landmarks(result.image, result.landmarks))),
            "spectrogram": _data_url("image/png", png_bytes(
                spectrogram_image(spectrogram(wave)))),
            "neighbours": neighbours,
        }

    def close(self) -> None:
        self._remove_uploads()


# ------------------------------------------------------------------------------ HTTP


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client closed the connection before its upload was complete."""


class _Stalled(Exception):
    """The client sent nothing for UPLOAD_IDLE_SECONDS in the middle of its upload, or
    less than MIN_UPLOAD_BYTES_PER_SECOND on average after that long (the reason)."""


class _Stopping(Exception):
    """The server is stopping while an upload is still arriving."""


async def _chunks(request, stopping: threading.Event | None):
    """``request.stream()``, raising _Stalled when nothing arrives for
    UPLOAD_IDLE_SECONDS or, after that long, less than MIN_UPLOAD_BYTES_PER_SECOND on
    average, and _Stopping as soon as ``stopping`` is set. (A read is waited on, not
    cancelled, between looks: cancelled, the stream could not go on.)"""
    import time

    stream = request.stream()
    pending = None
    start, received = time.monotonic(), 0
    try:
        while True:
            pending = asyncio.ensure_future(anext(stream))
            since = time.monotonic()
            while not pending.done():
                if stopping is not None and stopping.is_set():
                    raise _Stopping
                now = time.monotonic()
                if now - since > UPLOAD_IDLE_SECONDS:
                    raise _Stalled(f"nothing arrived for {UPLOAD_IDLE_SECONDS:g} s")
                if now - start > UPLOAD_IDLE_SECONDS and \
                        received < MIN_UPLOAD_BYTES_PER_SECOND * (now - start):
                    raise _Stalled(f"{received:,} bytes in {now - start:.0f} s, less "
                                   f"than {MIN_UPLOAD_BYTES_PER_SECOND // 1024} KiB/s")
                await asyncio.wait({pending}, timeout=_UPLOAD_POLL_SECONDS)
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            received += len(chunk)
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


def _display_name(filename: str) -> str:
    """An uploaded file's name as messages show it: its last part, printable, short."""
    name = re.split(r"[\\/]", filename)[-1]
    name = "".join(c for c in name if c.isprintable()).strip() or "upload"
    return name if len(name) <= 80 else name[:77] + "..."


async def receive_upload(request, folder: Path, cap: int,
                         stopping: threading.Event | None = None) -> tuple[Path, str]:
    """Stream the multipart body's ``file`` part into ``folder`` -> ``(path, name)``.

    Only the client's file name's suffix is kept (the decoder picks by it); the bytes go
    straight to ``folder`` and stop at ``cap``.

    Raises:
        _TooLarge: the body is over ``cap`` (from Content-Length, before reading it).
        _Stalled, _Stopping: see :func:`_chunks` (``stopping``: the server's flag).
        AudioError: not multipart, no ``file`` part, or an empty one.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
    from starlette.requests import ClientDisconnect

    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise AudioError(None, "send the audio as multipart/form-data in a field named 'file'")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap + FRAMING_BYTES:
        raise _TooLarge
    part = {"headers": {}, "field": b"", "value": b""}
    upload = {"file": None, "path": None, "name": None, "size": 0, "received": 0,
              "writing": False}

    def on_part_begin():
        part["headers"] = {}

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["field"].lower()] = part["value"]
        part["field"] = part["value"] = b""

    def on_headers_finished():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") != b"file" or upload["file"] is not None:
            return
        filename = disposition.get(b"filename", b"upload").decode("utf-8", "replace")
        suffix = Path(filename).suffix.lower()
        upload["name"] = _display_name(filename)
        upload["path"] = folder / ("upload" + (suffix if _SUFFIX.fullmatch(suffix) else ""))
        upload["file"] = open(upload["path"], "xb")  # noqa: SIM115 - closed at the part's end
        upload["writing"] = True

    def on_part_data(data, start, end):
        # every part counts toward the cap, not only the 'file' one
        upload["received"] += end - start
        if upload["received"] > cap:
            raise _TooLarge
        if upload["writing"]:
            upload["size"] += end - start
            upload["file"].write(data[start:end])

    def on_part_end():
        if upload["writing"]:
            upload["file"].close()
            upload["writing"] = False

    try:
        parser = MultipartParser(params[b"boundary"], {  # (refuses a 300-byte boundary)
            "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            "on_part_end": on_part_end})
        async for chunk in _chunks(request, stopping):
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise _Gone from None
    except FormParserError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AudioError(None, f"malformed multipart/form-data body ({reason})") from None
    finally:
        if upload["file"] is not None:
            upload["file"].close()
    if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
        raise AudioError(None, "the upload ended before its closing multipart boundary "
                               "(cut short)")
    if upload["path"] is None:
        raise AudioError(None, "no file in the upload (send it in a multipart field named 'file')")
    if upload["size"] == 0:
        raise AudioError(upload["name"], "empty file")
    return upload["path"], upload["name"]


def is_loopback(host: str) -> bool:
    """``host`` (as --host gives it) is this machine only: localhost or a loopback address
    (127.0.0.0/8, ::1), whatever its case."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(server: FaceServer, host: str = DEFAULT_HOST):
    """The Starlette app: ``GET /`` (the page), ``GET /status``, ``POST /reconstruct``
    (``image/png``) and ``POST /api/reconstruct`` (what the page shows, as JSON)."""
    import logging
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    # python-multipart logs each parse error it raises as a warning, which Python's
    # last-resort handler printed bare on the server's stderr ("Expected boundary
    # character 45, got 103 at index 2"); receive_upload answers it as a 400 with the
    # reason, and that is enough.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    page = (_ASSETS / "serve.html").read_text()

    async def handle(request, work):
        if _cross_site(request):
            return JSONResponse({"error": "a request from another site's page is refused"},
                                status_code=403)
        if not (status := await run_in_threadpool(server.status))["ready"]:
            return JSONResponse({"error": status["message"]}, status_code=503)
        folder = Path(tempfile.mkdtemp(dir=server.upload_root))
        try:
            path, name = await receive_upload(request, folder, server.max_upload_bytes,
                                              server.stopping)
            return await run_in_threadpool(work, path, name)
        except _Gone:  # the client left mid-upload: nobody reads an answer
            return Response(status_code=400, headers={"Connection": "close"})
        except _Stalled as stalled:
            return JSONResponse({"error": f"the upload stalled: {stalled}"}, status_code=408,
                                headers={"Connection": "close"})
        except _Stopping:
            return JSONResponse({"error": "the server is stopping"}, status_code=503,
                                headers={"Connection": "close"})
        except _TooLarge:
            # Closing the connection spares reading the rest of an oversize body.
            return JSONResponse({"error": server.too_large}, status_code=400,
                                headers={"Connection": "close"})
        except WeightsError as error:
            return JSONResponse({"error": str(error)}, status_code=503)
        except Speech2FaceError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def png(path, name):
        from speech2face.utils import png_bytes

        return Response(png_bytes(server.reconstruct_file(path, name)[1].image),
                        media_type="image/png")

    def details(path, name):
        return JSONResponse(server.details(path, name))

    async def index(request):
        return HTMLResponse(page)

    async def status(request):
        return JSONResponse(await run_in_threadpool(server.status))

    async def reconstruct(request):
        return await handle(request, png)

    async def api_reconstruct(request):
        return await handle(request, details)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    middleware = []
    if is_loopback(host):
        shown = host.lower() if ":" not in host else f"[{host.lower()}]"
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(
            dict.fromkeys([*_LOOPBACK_HOST_HEADERS, shown]))))
    return Starlette(routes=[
        Route("/", index), Route("/status", status),
        Route("/reconstruct", reconstruct, methods=["POST"]),
        Route("/api/reconstruct", api_reconstruct, methods=["POST"]),
    ], middleware=middleware, lifespan=lifespan)


def _cross_site(request) -> bool:
    """Whether a browser sent ``request`` from a page of another origin than this server's
    (its Origin header names another host; "null" for a sandboxed page or a local file).
    A form posted from any web site the user visits reached the page on 127.0.0.1: no
    preflight guards a multipart POST. Clients that are not browsers send no Origin."""
    from urllib.parse import urlsplit

    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); Speech2FaceError if busy."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        if sock is not None:
            sock.close()
        raise Speech2FaceError(None, f"--host {host} --port {port}: cannot listen there "
                                     f"({error.strerror or error})") from None
    return sock


# --------------------------------------------------------------------------- CLI


def _positive(high: float):
    """An argparse type: a number above 0 and at most ``high``."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {high:g}, "
                                             f"got {text}")
        return value

    parse.__name__ = "number"
    return parse


MAX_UPLOAD_MB_LIMIT = 1e6  # a terabyte: what --max-upload-mb may be set to
MAX_SECONDS_LIMIT = 1e6  # 11 days: what --max-seconds may be set to


def _port(text: str) -> int:
    import argparse

    if not (text.isascii() and text.isdigit()) or int(text) > 65535:  # not "١٢٣"
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return int(text)


def add_serve_arguments(parser) -> None:
    from speech2face.cli import device

    parser.add_argument("--model", default=None,
                        help="model bundle or training run (default: the model trained by "
                             "`speech2face demo`, in the user cache)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; "
                             "0.0.0.0 lets anyone who can reach it use it)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--gallery", type=Path, default=None, metavar="SHARDS",
                        help="shards of a prepared dataset (`speech2face prepare --out SHARDS`, "
                             "e.g. demo_out/shards after `make demo`): the page shows its "
                             f"{NEIGHBOURS} faces nearest each reconstruction")
    parser.add_argument("--gallery-split", default=None, metavar="SPLIT",
                        help="take the gallery from this split only (default: all splits)")
    parser.add_argument("--max-upload-mb", type=_positive(MAX_UPLOAD_MB_LIMIT),
                        default=MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-seconds", type=_positive(MAX_SECONDS_LIMIT),
                        default=MAX_SECONDS,
                        help="files whose header declares a longer duration are refused "
                             f"without decoding (default {MAX_SECONDS:g})")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device (default cpu)")


def serve_command(args) -> int:
    try:
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise Speech2FaceError(None, f"the web page needs the [web] extra ({error.name} is "
                                     "missing): pip install 'speech2face[web]'") from None
    if args.gallery_split is not None and args.gallery is None:
        raise ConfigError("--gallery-split", "takes the gallery's split: give --gallery too")
    gallery = None if args.gallery is None else load_gallery(args.gallery, args.gallery_split)
    server = FaceServer(args.model, gallery, args.max_upload_mb, args.max_seconds, args.device)
    try:
        sock = bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        status = server.status()
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        shown = f"model: {status['model']}"
        if gallery is not None:
            shown += f", gallery: {status['gallery']} faces"
        print(f"speech2face serve: {url}  ({shown}; Ctrl+C stops)", flush=True)
        if not status["ready"]:
            print(f"speech2face serve: {status['message']}", file=sys.stderr)
        if not is_loopback(args.host):
            print(f"speech2face serve: listening on {args.host}: anyone who can reach this "
                  "machine can use the page", file=sys.stderr)
        config = uvicorn.Config(create_app(server, args.host), log_level="warning",
                                access_log=False)

        class Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):  # SIGTERM, SIGINT: uploads stop waiting
                server.stopping.set()
                super().handle_exit(sig, frame)

        try:
            Uvicorn(config).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl+C: how a server is meant to stop
            pass
    finally:
        server.close()
    return 0
