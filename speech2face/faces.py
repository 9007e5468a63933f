"""Face front end: image in, aligned 224 x 224 face crop with its 68 landmarks out.

The face front end (docs/faces.md): detect faces with dlib (HOG by default, the paper's CNN
detector on request), keep the largest, fit dlib's 68-point shape predictor (iBUG 300-W
order) and cut a square, margin-padded crop resized to 224 x 224.

Crop geometry (the same for every face, so the mean landmarks and the face decoder's
registered texture are meaningful):

1. Rotate about the landmarks so the line between the eye centres is horizontal.
2. The *face square* is the square around the bounding box of the 68 rotated landmarks
   (side ``s`` = the longer side of that box; brows to chin, jaw to jaw), centred on the box.
3. The crop is that square grown by ``CROP_MARGIN * s`` on every side (side
   ``(1 + 2 * CROP_MARGIN) * s``), moved up by ``CROP_RAISE * s`` so the forehead, which the
   landmarks do not cover, is in the picture; then resized to ``size``.

In the crop the face square is therefore always at :func:`aligned_face_box`, which is how
a crop can be given back to the shape predictor or to dlib's face embedder without
re-detecting the face. Pixel coordinates are (x, y) with the centre of pixel (i, j) at
x = j, y = i, as dlib reports them. dlib's models load lazily, once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speech2face.errors import ConfigError, ImageError, NoFaceError
from speech2face.face_resnet import DESCRIPTOR_DIM, MODEL_FILE
from speech2face.utils import IMAGE_SUFFIXES, is_number, is_whole

# Paper section 3: faces are cropped and resized to 224 x 224.
CROP_SIZE = 224
# Bounds of the faces command's --size: 32 px still shows a face's 68 landmarks apart;
# 4096 px (48 MB a crop) is far past any source photo's face.
MIN_CROP_SIZE, MAX_CROP_SIZE = 32, 4096
# Fraction of the face square added on each side of the crop (the face square then spans
# 1 / (1 + 2 * 0.3) = 62.5 % of the crop: 140 px of 224).
CROP_MARGIN = 0.3
# Fraction of the face square by which the crop centre moves up, towards the forehead.
CROP_RAISE = 0.1
N_LANDMARKS = 68  # iBUG 300-W
# Refuse images larger than this many pixels (decompression bombs; 12,000 x 8,000 photos
# are still fine). Checked before decoding, independently of PIL's global limit.
MAX_IMAGE_PIXELS = 100_000_000
# dlib's HOG detector margin below which a detection is dropped. dlib's own default is 0;
# with one upsampling, 0 keeps spurious low-margin boxes (astronaut(): a second "face"
# at 0.12), real frontal faces score well above 0.5.
HOG_MIN_SCORE = 0.3
# Images are downscaled for detection so that the longer side is at most this (speed:
# HOG and the CNN cost grows with the pixel count); landmarks use the full resolution.
DETECT_MAX_SIDE = 1280
# A frame that is already cut around one face (VoxCeleb's face frames and face tracks:
# the face spans half the frame or more) is detected at this size, not upsampled: its
# face is then about 100 px, above the HOG window's 80 px, and detection costs about a
# tenth of the upsampled full-size pass (docs/benchmarks.md). Landmarks use full resolution.
FACE_CROP_DETECT_SIDE = 200
# Images whose longer side is at most this are upsampled once for detection, which lets
# both detectors find faces down to about 40 px (their native minimum is about 80 px).
UPSAMPLE_MAX_SIDE = 800
# The same for the CNN detector, whose cost grows 4x per upsampling (one core: about
# 1.2 s for a 640 x 480 frame as is, 5 s upsampled), so only small images are upsampled.
CNN_UPSAMPLE_MAX_SIDE = 400
DETECTORS = ("hog", "cnn")
# The pluggable face encoders (speech2face.face_encoders), named here, without torch, so
# that prepare's main process can check a name before it starts its workers.
FACE_ENCODERS = ("dlib", "vggface")
# dlib's face chip: 150 x 150 with 25 % padding, as dlib_face_recognition_resnet_model_v1
# was trained (dlib's defaults for compute_face_descriptor).
DLIB_CHIP_PADDING = 0.25
# In an output folder of `speech2face faces`: a line per image made, with its options.
FACES_JOURNAL = ".faces.jsonl"

# Groups of the 68 iBUG landmarks (0-based, end-exclusive).
LEFT_EYE = slice(36, 42)  # the subject's right eye, on the left of the picture
RIGHT_EYE = slice(42, 48)


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous: compare fields
class Face:
    """One detected face.

    box: (left, top, right, bottom) in image pixels (the detector's box, ints).
    landmarks: float32 (68, 2), (x, y) in image pixels, iBUG 300-W order.
    score: detector confidence (HOG margin or CNN confidence; larger is surer).
    """

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


# ---------------------------------------------------------------------------- models


def model_dir() -> Path:
    """Folder with dlib's model files from the ``face-recognition-models`` package.

    Located without importing the package (it imports ``pkg_resources`` at import time).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dlib's model files are missing: pip install face-recognition-models")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.cache
def dlib_model(name: str):
    """A dlib model by name, loaded once per process.

    name: "hog" (frontal face detector), "cnn" (MMOD CNN detector), "landmarks68",
    "landmarks5" (shape predictors) or "recognition" (128-D face ResNet).
    """
    import dlib

    files = {
        "cnn": ("cnn_face_detection_model_v1", "mmod_human_face_detector.dat"),
        "landmarks68": ("shape_predictor", "shape_predictor_68_face_landmarks.dat"),
        "landmarks5": ("shape_predictor", "shape_predictor_5_face_landmarks.dat"),
        "recognition": ("face_recognition_model_v1", MODEL_FILE),
    }
    if name == "hog":
        return _frontal_face_detector()
    if name not in files:
        raise ValueError(f"unknown dlib model {name!r}; expected 'hog' or one of {sorted(files)}")
    kind, filename = files[name]
    return getattr(dlib, kind)(str(model_dir() / filename))


def _frontal_face_detector():
    """dlib's HOG face detector, from a binary copy in the user cache where there is one.

    dlib builds it from a text serialisation compiled into the library: 0.54 s of CPU
    per process, a third of ``prepare``'s start-up before it forks its workers. Saved
    with dlib's own binary serialisation (150 kB) it loads in 3 ms. The copy is written
    once per dlib version, with its SHA-256 beside it, and read only when the digest
    matches; otherwise (a missing, damaged or unwritable cache) dlib builds the detector
    as before. ``tests/test_faces.py`` checks that both find the same faces.
    """
    import hashlib
    import tempfile

    import dlib

    from speech2face.utils import cache_dir, staged_writes

    path = cache_dir() / "dlib" / f"frontal_face_detector-{dlib.__version__}.svm"
    digest_path = path.with_name(path.name + ".sha256")
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() == digest_path.read_text().strip():
            return dlib.fhog_object_detector(str(path))
    except (OSError, RuntimeError):
        pass
    detector = dlib.get_frontal_face_detector()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            saved = Path(scratch) / path.name
            detector.save(str(saved))
            data = saved.read_bytes()
        with staged_writes() as stage:  # the copy and its digest, both or neither
            with stage(path) as f:
                f.write(data)
            with stage(digest_path, "w") as f:
                f.write(hashlib.sha256(data).hexdigest() + "\n")
    except (OSError, RuntimeError):
        pass  # a read-only cache: built again next time
    return detector


# ---------------------------------------------------------------------------- images


def load_image(path_or_array, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image as uint8 RGB ``(H, W, 3)``.

    path_or_array: a path (JPEG, PNG incl. 16-bit, WebP, BMP, TIFF, ...; the EXIF
    orientation is applied) or an array: ``(H, W)`` grayscale, ``(H, W, 3)`` RGB or
    ``(H, W, 4)`` RGBA, as uint8, uint16 (full 16-bit range) or float in [0, 1].
    Transparent pixels are composited onto white. Raises ImageError (naming the file)
    for a missing, unreadable, truncated or too large image.
    """
    if isinstance(path_or_array, (str, os.PathLike)):
        return _read_image_file(Path(path_or_array), max_pixels)
    if isinstance(path_or_array, np.ndarray) or hasattr(path_or_array, "__array__"):
        return _array_to_rgb(np.asarray(path_or_array), None, max_pixels)
    raise TypeError(f"load_image expects a path or an array, not {type(path_or_array).__name__}")


def _read_image_file(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise ImageError(path, "no such file" if not path.exists() else "not a file")
    try:
        # PIL's own bomb check (a warning above its global limit, an error above twice it)
        # is global state; ours is max_pixels, checked on the header before decoding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # and PIL's UserWarnings on damaged metadata ("Corrupt EXIF data", "tag 274
            # had too many entries"): the pixels decide, the warnings went to stderr
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(
                        path,
                        f"image too large ({width} x {height} = {width * height:,} pixels; "
                        f"the limit is {max_pixels:,}): refusing a possible decompression bomb",
                    )
                _load_pixels(im, path)
                im = ImageOps.exif_transpose(im)
                return _pil_to_rgb(im, path, max_pixels)
    except Image.DecompressionBombError:  # PIL's own check, above twice its limit
        raise ImageError(
            path, f"image too large (over {max_pixels:,} pixels, the limit): refusing a "
                  f"possible decompression bomb"
        ) from None
    except UnidentifiedImageError:
        kind = _image_kind(path)
        raise ImageError(path, "not an image, or an image format PIL cannot read" if kind is None
                         else f"a {kind} file PIL cannot read (damaged, truncated, or a "
                              f"variant it does not support)") from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL reports truncated or corrupt data as OSError / SyntaxError / ValueError.
        raise ImageError(path, f"cannot decode image: {error}") from None


def _load_pixels(im, path: Path) -> None:
    """``im.load()``. A TIFF's compressed data is decoded by libtiff, which reports what
    it cannot decode (a damaged JPEG-in-TIFF strip: "JPEGLib: Unsupported marker type")
    on the C library's stderr, and PIL then keeps whatever pixels it had or says
    "decoder error -2": that report is caught here and raised as ImageError; libtiff's
    warnings are dropped."""
    if im.format != "TIFF":
        im.load()
        return
    failed = None
    with _c_stderr_caught() as said:
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as error:  # "decoder error -2"
            failed = error
    errors = [line.strip().rstrip(".") for line in said[0].splitlines()
              if line.strip() and ": Warning, " not in line]
    if errors:
        raise ImageError(path, f"damaged TIFF image data (libtiff: {errors[0]})")
    if failed is not None:
        raise failed


_C_STDERR_LOCK = threading.Lock()


@contextmanager
def _c_stderr_caught() -> Iterator[list[str]]:
    """What C code writes to file descriptor 2 during the block, in the list's one item
    (empty where the process started without a stderr, or no temporary file is to be
    had)."""
    import sys
    import tempfile

    said = [""]
    # Started with descriptor 2 closed (``2>&-``), Python has no sys.__stderr__, and the
    # next file opened takes descriptor 2: PIL's image file itself, not a stderr.
    caught = None
    if sys.__stderr__ is not None:
        try:
            os.fstat(2)
            if sys.stderr is not None:
                sys.stderr.flush()
            caught = tempfile.TemporaryFile()
        except (OSError, ValueError):  # closed since; sys.stderr closed; no temp folder
            pass
    if caught is None:
        yield said
        return
    # One capture at a time: two threads swapping descriptor 2 could each restore the
    # other's file and leave stderr pointing at a deleted temporary file.
    with caught, _C_STDERR_LOCK:
        saved = os.dup(2)
        try:
            os.dup2(caught.fileno(), 2)
            try:
                yield said
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        caught.seek(0)
        said[0] = caught.read(1 << 16).decode("utf-8", "replace")


# Signatures of the image formats PIL reads (a file it cannot identify that starts as
# one of them is damaged or a variant PIL lacks, such as a float32 RGB TIFF, not of an
# unknown kind).
_IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                     (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF87a", "GIF"),
                     (b"GIF89a", "GIF"))


def _image_kind(path: Path) -> str | None:
    """The image format ``path``'s first bytes announce, or None. WebP is RIFF....WEBP;
    BMP's two letters are taken only with the header's reserved bytes zero."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and head[6:10] == bytes(4):
        return "BMP"
    return next((kind for magic, kind in _IMAGE_SIGNATURES if head.startswith(magic)), None)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA -> uint8 RGB onto white, a band of rows at a time: in float32 at once, a
    9000 x 9000 image took 5 GB."""
    out = np.empty(rgba.shape[:2] + (3,), np.uint8)
    rows = max(1, (1 << 20) // rgba.shape[1])  # about a million pixels per band
    for top in range(0, rgba.shape[0], rows):
        band = rgba[top:top + rows].astype(np.float32)
        alpha = band[..., 3:4] / 255.0
        mixed = band[..., :3] * alpha + 255.0 * (1.0 - alpha)
        out[top:top + rows] = np.clip(np.rint(mixed), 0, 255)
    return out


def _pil_to_rgb(im, path, max_pixels: int) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (PIL gives "I;16" or "I"): convert("RGB") would clip at 255.
        return _array_to_rgb(np.asarray(im), path, max_pixels)
    if im.mode == "F":  # float TIFF: [0, 1] or 0..255
        a = np.asarray(im, dtype=np.float32)
        return _array_to_rgb(a / 255.0 if a.size and np.nanmax(a) > 1.0 else a, path, max_pixels)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _array_to_rgb(np.asarray(im.convert("RGBA")), path, max_pixels)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


FLOAT_SLACK = 1e-3  # rounding a float image may carry past 0 or 1 (clipped, not refused)


def _array_to_rgb(a: np.ndarray, path, max_pixels: int) -> np.ndarray:
    name = path if path is not None else "<array>"
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ImageError(name, f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {a.shape}")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise ImageError(name, f"image too large ({a.shape[1]} x {a.shape[0]} pixels)")
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 4:
        return _composite_on_white(a)
    if a.dtype == np.uint8:
        x = a
    elif a.dtype == np.bool_:
        x = a.astype(np.float32) * 255.0
    elif np.issubdtype(a.dtype, np.integer):
        # 16-bit images (and PIL's 32-bit "I" mode holding 16-bit PNG values). An array
        # of another integer type could hold 0..255 as well: which scale is meant is not
        # known, so it is refused rather than guessed.
        if path is None and a.dtype != np.uint16:
            raise ImageError(name, f"integer images must be uint8 (0..255) or uint16 "
                                   f"(0..65535), got {a.dtype}: convert it first")
        x = a.astype(np.float32) * (255.0 / 65535.0)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(name, "image has NaN or infinite values")
        if path is None and (a.min() < -FLOAT_SLACK or a.max() > 1 + FLOAT_SLACK):
            raise ImageError(name, f"float images must be in [0, 1], got values from "
                                   f"{a.min():.4g} to {a.max():.4g} (0..255: divide by 255)")
        x = a.astype(np.float32) * 255.0
    else:
        raise ImageError(name, f"unsupported image dtype {a.dtype}")
    if x.ndim == 3 and x.shape[2] == 4:
        alpha = x[..., 3:4].astype(np.float32) / 255.0
        x = x[..., :3] * alpha + 255.0 * (1.0 - alpha)  # onto white
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------- detection


def detect_faces(
    image,
    detector: str = "hog",
    upsample: int | None = None,
    min_score: float | None = None,
    max_side: int = DETECT_MAX_SIDE,
) -> list[Face]:
    """All faces in an image, largest first (empty list when there is none).

    image: a path or an array (see :func:`load_image`).
    detector: "hog" (fast, frontal) or "cnn" (dlib's MMOD CNN, the paper's; slow on CPU).
    upsample: times to upsample before detecting (default: once for images up to
        ``UPSAMPLE_MAX_SIDE`` px (HOG) or ``CNN_UPSAMPLE_MAX_SIDE`` px (CNN), else not).
    min_score: drop detections scoring below this (default ``HOG_MIN_SCORE`` for HOG,
        0 for the CNN).
    max_side: detect on a copy downscaled to this longer side when the image is larger
        (``FACE_CROP_DETECT_SIDE`` with ``upsample=0`` for a frame cut around one face).
    Returns Face objects with boxes and 68 landmarks (x, y) in the image's pixels.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector {detector!r}; expected one of {DETECTORS}")
    if min_score is not None and not is_number(min_score):
        raise ValueError(f"min_score must be a finite number, got {min_score!r}")
    if not is_whole(max_side, 1):
        raise ValueError(f"max_side must be a whole number of pixels >= 1, got {max_side!r}")
    image = load_image(image)
    height, width = image.shape[:2]
    # Detect on a downscaled copy of big images; the landmarks use the full image.
    scale = min(1.0, max_side / max(height, width))
    small = _resize(image, scale) if scale < 1.0 else image
    if upsample is None:
        limit = UPSAMPLE_MAX_SIDE if detector == "hog" else CNN_UPSAMPLE_MAX_SIDE
        upsample = 1 if max(small.shape[:2]) <= limit else 0
    _check_upsample(upsample, small.shape[0] * small.shape[1])
    if detector == "hog":
        min_score = HOG_MIN_SCORE if min_score is None else min_score
        rects, scores, _ = dlib_model("hog").run(small, upsample, min_score)
        found = list(zip(rects, scores, strict=True))
    else:
        min_score = 0.0 if min_score is None else min_score
        found = [
            (d.rect, d.confidence)
            for d in dlib_model("cnn")(small, upsample)
            if d.confidence >= min_score
        ]
    faces = []
    for rect, score in found:
        box = tuple(
            int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right(), rect.bottom())
        )
        faces.append(Face(box, fit_landmarks(image, box), float(score)))
    faces.sort(key=lambda f: (f.area, f.score), reverse=True)
    return faces


def largest_face(image, detector: str = "hog", name=None) -> Face:
    """The largest face in an image; raises NoFaceError naming the file if there is none.

    name: what to call the image in the error (defaults to the path when ``image`` is one).
    """
    if name is None and isinstance(image, (str, os.PathLike)):
        name = image
    faces = detect_faces(image, detector=detector)
    if not faces:
        raise NoFaceError(
            name if name is not None else "<array>", f"no face found ({detector} detector)"
        )
    return faces[0]


def fit_landmarks(image: np.ndarray, box, predictor: str = "landmarks68") -> np.ndarray:
    """dlib's shape predictor inside ``box`` = (left, top, right, bottom).

    image: uint8 (H, W, 3). Returns float32 (68, 2) (or (5, 2) for "landmarks5"), (x, y).
    """
    import dlib

    rect = dlib.rectangle(*(int(round(v)) for v in box))
    shape = dlib_model(predictor)(np.ascontiguousarray(image), rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def load_models(detector: str = "hog") -> None:
    """Load now what :func:`detect_faces` (with ``detector``), :func:`fit_landmarks` and
    :func:`face_descriptors` otherwise load on first use, once per process: e.g. before
    forking workers, which then start with them in shared memory."""
    from speech2face.face_resnet import face_resnet

    for name in (detector, "landmarks68"):
        dlib_model(name)
    face_resnet()
    _thread_controller()


def face_descriptors(crops) -> np.ndarray:
    """dlib's 128-D face descriptors of aligned crops, in one batched call.

    crops: uint8 ``(B, S, S, 3)`` (or a list of ``(S, S, 3)``) as :func:`align_face` cuts
    them. Returns float32 ``(B, 128)``. The face is where the crop geometry put it
    (:func:`aligned_face_box`), so the 68-point shape predictor runs in that box and no
    detector is needed; dlib cuts its 150 x 150 chip from those points, and its ResNet
    runs on the chips in numpy (:mod:`speech2face.face_resnet`: dlib's weights and
    arithmetic, about 6x less CPU than dlib-bin's own convolutions), on one BLAS thread
    (callers parallelise across processes). Needs numpy and dlib only (prepare's workers
    use it without importing torch); ``face_encoders.DlibFaceEncoder`` wraps it.
    """
    import dlib

    from speech2face.face_resnet import CHIP_SIZE, face_resnet

    images = np.ascontiguousarray(np.stack(crops) if isinstance(crops, (list, tuple)) else crops)
    if len(images) == 0:
        return np.zeros((0, DESCRIPTOR_DIM), np.float32)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 crops (B, S, S, 3), got {images.dtype} {images.shape}")
    height, width = images.shape[1:3]
    if height != width:
        raise ValueError(f"expected square aligned crops, got {height} x {width}")
    rect = dlib.rectangle(*(int(round(v)) for v in aligned_face_box(width)))
    predictor = dlib_model("landmarks68")
    # The chip compute_face_descriptor would cut (dlib's defaults: 150 px, 25 % padding).
    chips = np.stack([dlib.get_face_chip(image, predictor(image, rect), size=CHIP_SIZE,
                                         padding=DLIB_CHIP_PADDING) for image in images])
    with _blas_threads(1):
        return face_resnet()(chips)


@functools.cache
def _thread_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_threads(count: int):
    """A context limiting numpy's BLAS to ``count`` threads (cheap once set up)."""
    return _thread_controller().limit(limits=count, user_api="blas")


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(
        Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    )


# ---------------------------------------------------------------------------- alignment


def crop_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The similarity transform from image pixels to the aligned crop (module docstring).

    landmarks: (68, 2) (x, y) in the image. Returns float64 (2, 3) ``M`` with
    ``crop_xy = M[:, :2] @ image_xy + M[:, 2]``.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (N_LANDMARKS, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"expected finite (68, 2) landmarks, got shape {pts.shape}")
    eye_left, eye_right = pts[LEFT_EYE].mean(0), pts[RIGHT_EYE].mean(0)
    dx, dy = eye_right - eye_left
    angle = np.arctan2(dy, dx)
    cos, sin = np.cos(angle), np.sin(angle)
    rotate = np.array([[cos, sin], [-sin, cos]])  # by -angle: makes the eye line level
    rotated = pts @ rotate.T
    low, high = rotated.min(0), rotated.max(0)
    side = max(float((high - low).max()), 1.0)
    centre = (low + high) / 2 - np.array([0.0, CROP_RAISE * side])
    scale = size / ((1 + 2 * CROP_MARGIN) * side)
    # Pixel centres sit at integers, so the crop's centre is at (size - 1) / 2.
    linear = scale * rotate
    offset = (size - 1) / 2 - scale * centre
    return np.concatenate([linear, offset[:, None]], axis=1)


def aligned_face_box(size: int = CROP_SIZE) -> tuple[float, float, float, float]:
    """The face square in an aligned crop of side ``size``: (left, top, right, bottom).

    Where :func:`align_face` puts the landmarks' bounding square, so a crop can go back
    to the shape predictor (or dlib's embedder) without running a detector on it.
    """
    side = size / (1 + 2 * CROP_MARGIN)
    left = (size - 1) / 2 - side / 2
    top = left + CROP_RAISE * side
    return (left, top, left + side, top + side)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine ``matrix`` to (..., 2) points (x, y); float32 out."""
    points = np.asarray(points, dtype=np.float64)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a (2, 3) affine transform (e.g. crop pixels back to image pixels)."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -(linear @ matrix[:, 2])[:, None]], axis=1)


def _check_upsample(upsample, pixels: int) -> None:
    """Each upsampling doubles both sides: the image dlib then builds must stay within
    ``MAX_IMAGE_PIXELS`` (a 50 x 50 image upsampled 10 times needs 2.6 G pixels)."""
    from speech2face.errors import ConfigError

    if not isinstance(upsample, (int, np.integer)) or isinstance(upsample, bool) or \
            upsample < 0 or pixels * 4 ** upsample > MAX_IMAGE_PIXELS:
        raise ConfigError(None, f"upsample must be a whole number >= 0 that keeps the "
                                f"image within {MAX_IMAGE_PIXELS:,} pixels, got {upsample!r}")


def align_face(
    image, face: Face | np.ndarray, size: int = CROP_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the aligned, margin-padded square crop of a face (geometry: module docstring).

    image: a path or uint8 (H, W, 3) array. face: a Face, or its (68, 2) landmarks.
    Returns (crop uint8 (size, size, 3), landmarks float32 (68, 2) (x, y) in the crop).
    Parts of the crop outside the image are black.
    """
    from PIL import Image

    from speech2face.errors import ConfigError

    if not isinstance(size, (int, np.integer)) or not MIN_CROP_SIZE <= size <= MAX_CROP_SIZE:
        raise ConfigError(None, f"size must be a whole number of pixels from {MIN_CROP_SIZE} "
                                f"to {MAX_CROP_SIZE}, got {size!r}")
    image = load_image(image)
    landmarks = face.landmarks if isinstance(face, Face) else np.asarray(face, dtype=np.float32)
    matrix = crop_matrix(landmarks, size)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    pil = Image.fromarray(image)
    source = matrix
    # PIL's affine sampling does not low-pass: shrink by an integer factor first (box
    # filter) so a large face is not aliased, then resample at a scale near 1.
    factor = int(1.0 / scale)
    if factor >= 2:
        pil = pil.reduce(factor)
        # Pixel centre x of the reduced image sits at (x + 0.5) * factor - 0.5 in the original.
        to_original = np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2]])
        source = np.concatenate(
            [
                matrix[:, :2] @ to_original[:, :2],
                (matrix[:, :2] @ to_original[:, 2] + matrix[:, 2])[:, None],
            ],
            axis=1,
        )
    inverse = invert_matrix(source)
    # PIL maps output to input in a frame whose pixel centres are at +0.5.
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    data = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    crop = pil.transform(
        (size, size), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)
    )
    return np.asarray(crop, dtype=np.uint8).copy(), transform_points(landmarks, matrix)


def extract_face(image, detector: str = "hog", size: int = CROP_SIZE, name=None):
    """Detect the largest face and align it: ``(crop, crop_landmarks, face)``.

    Raises NoFaceError (naming the file) when there is no face. Shapes as in
    :func:`align_face`; ``face`` is in the original image's pixels.
    """
    if name is None and isinstance(image, (str, os.PathLike)):
        name = image
    image = load_image(image)
    face = largest_face(image, detector=detector, name=name)
    crop, landmarks = align_face(image, face, size=size)
    return crop, landmarks, face


def mean_landmarks(list_of_landmarks) -> np.ndarray:
    """The mean face geometry: float32 (68, 2), the average of aligned-crop landmarks.

    list_of_landmarks: a sequence of (68, 2) arrays or an (N, 68, 2) array, all in the
    same crop frame (as :func:`align_face` returns them; alignment already removed
    position, scale and roll, so a plain mean is the Procrustes mean up to that).
    """
    stack = np.asarray(list_of_landmarks, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[1:] != (N_LANDMARKS, 2) or len(stack) == 0:
        raise ValueError(f"expected N >= 1 landmark sets of shape (68, 2), got {stack.shape}")
    if not np.all(np.isfinite(stack)):
        raise ValueError("landmarks contain NaN or infinite values")
    return stack.mean(axis=0).astype(np.float32)


def draw_landmarks(crop: np.ndarray, landmarks: np.ndarray, scale: int = 2) -> np.ndarray:
    """A picture of the landmarks on the crop (upscaled ``scale`` times): uint8 (H*s, W*s, 3).

    The square marks the face square (:func:`aligned_face_box`); points are numbered
    groups in different colours (jaw, brows, nose, eyes, mouth).
    """
    from PIL import Image, ImageDraw

    height, width = crop.shape[:2]
    im = Image.fromarray(np.asarray(crop, dtype=np.uint8)).resize(
        (width * scale, height * scale), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(im)
    groups = [
        (0, 17, "yellow"),
        (17, 22, "orange"),
        (22, 27, "orange"),
        (27, 31, "cyan"),
        (31, 36, "cyan"),
        (36, 42, "lime"),
        (42, 48, "lime"),
        (48, 60, "magenta"),
        (60, 68, "magenta"),
    ]  # jaw, brows, nose bridge and base, eyes, outer and inner lips
    box = [(v + 0.5) * scale - 0.5 for v in aligned_face_box(width)]
    draw.rectangle(box, outline="white")
    pts = (np.asarray(landmarks, dtype=np.float64) + 0.5) * scale - 0.5
    for start, stop, colour in groups:
        draw.line([tuple(p) for p in pts[start:stop]], fill=colour, width=1)
        for x, y in pts[start:stop]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return np.asarray(im)


# ---------------------------------------------------------------------------- command line


def find_images(inputs, out=None) -> list[tuple[Path, Path]]:
    """Image files named by ``inputs`` (files, or folders searched recursively, sorted),
    leaving out the output folder ``out`` (its images are this command's own).

    Returns (path, output stem relative to --out) pairs (``utils.find_inputs``: a
    folder's images keep their sub-folders; names that would clash are kept apart).
    Raises ImageError for an input that does not exist.
    """
    from speech2face.utils import find_inputs

    return find_inputs(inputs, IMAGE_SUFFIXES, ImageError, outputs=FACE_OUTPUTS, out=out)


# What ``speech2face faces`` writes for each image (the feature only with an encoder).
FACE_OUTPUTS = (".crop.png", ".landmarks.png", ".landmarks.npy", ".feature.npy")


def add_faces_arguments(parser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files or folders (searched recursively)",
    )
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        default="hog",
        help="dlib face detector (default: hog; cnn is the paper's, slower)",
    )
    parser.add_argument(
        "--encoder",
        choices=("dlib", "vggface", "none"),
        default="dlib",
        help="face encoder for the feature: dlib (default), vggface (needs --weights), or none",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="VGG-Face weights (vgg_face_dag.pth or rcmalli_vggface_tf_vgg16.h5)",
    )
    from speech2face.cli import bounded

    parser.add_argument(
        "--size", type=bounded(int, MIN_CROP_SIZE, MAX_CROP_SIZE, "crop side"), default=CROP_SIZE,
        help=f"crop side in pixels, {MIN_CROP_SIZE} to {MAX_CROP_SIZE} (default: {CROP_SIZE})",
    )


def faces_command(args) -> int:
    """Per image: NAME.crop.png, NAME.landmarks.png (overlay), NAME.landmarks.npy (68, 2)
    (x, y in the crop) and NAME.feature.npy (D,). Prints a summary; exit status 0 when at
    least one image was processed, else an ImageError (exit 2) with the first reason."""
    import io

    from speech2face.utils import input_identity, png_bytes, staged_writes
    from speech2face.utils import progress as tqdm

    if args.weights is not None and args.encoder != "vggface":
        raise ConfigError(None, f"--weights is for --encoder vggface; the {args.encoder} "
                               f"encoder takes no weights file")
    images = find_images(args.inputs, args.out)
    if not images:
        raise ImageError(
            args.inputs[0], f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    encoder = None
    if args.encoder != "none":
        from speech2face.face_encoders import load_face_encoder

        encoder = load_face_encoder(args.encoder, weights=args.weights, option="--weights FILE")
    out = Path(args.out)
    # Rerun into the same folder with the same options, images whose outputs are all
    # there are not processed again (a killed run continues; each image's files appear
    # together). Other options redo everything.
    suffixes = FACE_OUTPUTS if encoder is not None else FACE_OUTPUTS[:-1]
    options = {"detector": args.detector, "encoder": args.encoder, "size": args.size,
               "weights": None if args.weights is None else str(Path(args.weights).resolve())}
    journal = out / FACES_JOURNAL
    made = _made_with(journal)  # image -> the options its files were made with
    processed, skipped, done = 0, [], 0
    for path, stem in tqdm(images, desc="faces", unit="image", disable=len(images) < 2):
        targets = [out / stem.with_name(stem.name + suffix) for suffix in suffixes]
        if made.get(str(stem)) == (options, input_identity(path)) and \
                all(t.is_file() for t in targets):
            done += 1
            continue
        try:
            crop, landmarks, _ = extract_face(path, detector=args.detector, size=args.size)
        except ImageError as error:
            skipped.append((path, error.problem))
            if str(stem) in made:  # its files from before describe an image now gone
                _remove_outputs(out, stem, FACE_OUTPUTS)
            continue
        outputs = {
            ".crop.png": png_bytes(crop),
            ".landmarks.png": png_bytes(draw_landmarks(crop, landmarks)),
            ".landmarks.npy": _npy_bytes(io, landmarks),
        }
        if encoder is not None:
            outputs[".feature.npy"] = _npy_bytes(
                io, encoder.embed(crop[None])[0].detach().cpu().numpy()
            )
        # A file of another option set goes first (--encoder none after dlib: no feature)
        _remove_outputs(out, stem, [s for s in FACE_OUTPUTS if s not in outputs])
        with staged_writes() as stage:  # an image's files appear together or not at all
            for target, data in zip(targets, outputs.values(), strict=True):
                with stage(target) as f:
                    f.write(data)
        with open(journal, "a") as f:  # then the record that they are this run's
            f.write(json.dumps({"image": str(stem), "options": options,
                                "input": input_identity(path)}) + "\n")
        processed += 1
    if len(images) > 1:  # with one image, the error below says it all
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
    if processed + done == 0:
        path, reason = skipped[0]
        raise ImageError(path, f"{reason} (no image could be processed)")
    already = f" ({done} done by an earlier run)" if done else ""
    print(f"faces: {processed} processed, {len(skipped)} skipped{already}, written to {out}")
    return 0


def _remove_outputs(out: Path, stem: Path, suffixes) -> None:
    """Remove the files ``faces`` wrote for the image ``stem`` with these suffixes."""
    for suffix in suffixes:
        (out / stem.with_name(stem.name + suffix)).unlink(missing_ok=True)


def _made_with(journal: Path) -> dict[str, tuple]:
    """What an output folder's journal says each image's files were made with: the
    options and the input (``utils.input_identity``: an image replaced since is made
    again). The last record of each; a line cut by a kill, or damaged, is no record: that
    image is made again. Images without a record are made again too: a folder written with other
    options, or by a run killed before it recorded them, never passes for this run's."""
    from speech2face.utils import json_records

    if not journal.is_file():
        return {}
    return {record["image"]: (record.get("options"), record.get("input"))
            for record in json_records(journal, "image")}


def _npy_bytes(io, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    return buffer.getvalue()
