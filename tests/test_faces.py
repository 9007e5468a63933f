"""Face front end: detection, landmarks, alignment, image formats, the ``faces`` command.

Real photographs come from installed packages: scikit-image's astronaut (Eileen Collins,
public domain) and chelsea (a cat: no human face), and matplotlib's Grace Hopper.
"""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data

from speech2face import cli
from speech2face import faces as F
from speech2face.errors import ImageError, NoFaceError


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()  # (512, 512, 3) uint8


@pytest.fixture(scope="module")
def astronaut_face(astronaut):
    found = F.detect_faces(astronaut)
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def hopper_path():
    import matplotlib.cbook

    return matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def _inside(points, box, grow=0.0):
    left, top, right, bottom = box
    gx, gy = grow * (right - left), grow * (bottom - top)
    x, y = points[:, 0], points[:, 1]
    return (x >= left - gx) & (x <= right + gx) & (y >= top - gy) & (y <= bottom + gy)


# ---------------------------------------------------------------------------- detection


def test_one_face_in_astronaut_with_landmarks_in_the_box(astronaut_face):
    face = astronaut_face
    left, top, right, bottom = face.box
    # Her face is around (220, 125) in the 512 x 512 photograph.
    assert left < 220 < right and top < 125 < bottom
    assert 60 < right - left < 140
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    assert face.score > F.HOG_MIN_SCORE
    # dlib's box is tight (the chin can be just below it): all points within 15 %.
    assert _inside(face.landmarks, face.box, grow=0.15).all()
    assert _inside(face.landmarks, face.box).mean() > 0.7


def test_landmarks_follow_ibug_order(astronaut_face):
    lm = astronaut_face.landmarks
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    nose_tip, mouth, chin = lm[30], lm[48:68].mean(0), lm[8]
    assert eye_left[0] < nose_tip[0] < eye_right[0]  # picture left to right
    assert max(eye_left[1], eye_right[1]) < nose_tip[1] < mouth[1] < chin[1]  # top to bottom
    assert lm[0, 0] < lm[16, 0]  # jaw runs from the picture's left to its right


def test_cnn_detector_agrees_with_hog(astronaut, astronaut_face):
    # On a 300 x 300 cut around the face (the CNN's cost grows with the pixel count).
    found = F.detect_faces(astronaut[0:300, 100:400], detector="cnn", upsample=0)
    assert len(found) == 1
    found = [F.Face(found[0].box, found[0].landmarks + [100, 0], found[0].score)]
    a, b = np.array(found[0].box, float) + [100, 0, 100, 0], np.array(astronaut_face.box, float)
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    assert inter / union > 0.6
    assert np.abs(found[0].landmarks - astronaut_face.landmarks).mean() < 4.0


def _detections(detector, image):
    boxes, scores, kinds = detector.run(image, 1, -0.5)  # weak candidates too
    return [(b.left(), b.top(), b.right(), b.bottom()) for b in boxes], scores, kinds


def test_hog_detector_from_the_cache_finds_what_dlibs_own_finds(
        astronaut, hopper_path, tmp_path, monkeypatch):
    import dlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = F._frontal_face_detector()  # built by dlib, and its copy saved
    saved = tmp_path / "speech2face" / "dlib" / f"frontal_face_detector-{dlib.__version__}.svm"
    assert saved.is_file() and saved.with_name(saved.name + ".sha256").is_file()
    reference = dlib.get_frontal_face_detector()
    calls = []
    monkeypatch.setattr(dlib, "get_frontal_face_detector", lambda: calls.append(1))
    cached = F._frontal_face_detector()
    assert not calls  # read from the copy, not built again
    images = [astronaut, F.load_image(hopper_path), data.chelsea(),
              np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)]
    for image in images:
        want = _detections(reference, image)
        assert _detections(built, image) == want
        assert _detections(cached, image) == want
    assert len(_detections(reference, astronaut)[0]) >= 1


def test_a_damaged_or_unwritable_detector_cache_is_not_used(astronaut, tmp_path, monkeypatch):
    import dlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    F._frontal_face_detector()
    saved = tmp_path / "speech2face" / "dlib" / f"frontal_face_detector-{dlib.__version__}.svm"
    good = saved.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    saved.write_bytes(bytes(damaged))
    build = dlib.get_frontal_face_detector
    calls = []
    monkeypatch.setattr(dlib, "get_frontal_face_detector", lambda: calls.append(1) or build())
    detector = F._frontal_face_detector()
    assert calls == [1]  # the damaged copy was refused and dlib built the detector
    assert saved.read_bytes() == good  # and the copy was written again
    assert len(_detections(detector, astronaut)[0]) >= 1
    # a cache that cannot be written: the detector all the same
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert len(_detections(F._frontal_face_detector(), astronaut)[0]) >= 1


def test_no_face_is_an_empty_list_or_a_typed_error():
    assert F.detect_faces(data.chelsea()) == []  # a cat
    assert F.detect_faces(np.full((300, 400, 3), 128, np.uint8)) == []
    assert F.detect_faces(np.zeros((5, 5), np.uint8)) == []  # tiny, no crash inside dlib
    with pytest.raises(NoFaceError, match="kitten.png: no face found"):
        F.largest_face(data.chelsea(), name="kitten.png")


def test_largest_face_first(astronaut):
    # Two copies of the face side by side, one at 3/4 size.
    canvas = np.full((400, 760, 3), 200, np.uint8)
    canvas[:, :400] = np.asarray(Image.fromarray(astronaut[0:400, 20:420]))
    canvas[50:350, 440:740] = np.asarray(
        Image.fromarray(astronaut[0:400, 20:420]).resize((300, 300))
    )
    found = F.detect_faces(canvas)
    assert len(found) == 2
    assert found[0].area > found[1].area
    assert found[0].box[0] < 400 <= found[1].box[0]


def test_large_image_is_detected_downscaled_but_landmarked_in_full(astronaut, astronaut_face):
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.Resampling.BICUBIC))
    found = F.detect_faces(big)  # detected at 1280 px, landmarks on the 2048 px image
    assert len(found) == 1
    expected = astronaut_face.landmarks * 4 + 1.5  # pixel centres scale about -0.5
    assert np.abs(found[0].landmarks - expected).mean() < 4.0  # 1 px of the original


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("size", [0, -5, 31, 4097, 64.0])
def test_align_face_refuses_a_size_outside_its_bounds(astronaut, astronaut_face, size):
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match="size must be a whole number of pixels"):
        F.align_face(astronaut, astronaut_face, size=size)


@pytest.mark.parametrize("upsample", [-1, 10, 1.5, True])
def test_detect_faces_refuses_an_upsampling_that_cannot_fit(upsample):
    """10 upsamplings of a 50 x 50 image would ask dlib for 2.6 G pixels (it ran out of
    memory); a negative count was a pybind TypeError."""
    from speech2face.errors import ConfigError

    with pytest.raises(ConfigError, match="upsample must be a whole number"):
        F.detect_faces(np.zeros((50, 50, 3), np.uint8), upsample=upsample)


def test_align_face_geometry(astronaut, astronaut_face):
    crop, lm = F.align_face(astronaut, astronaut_face)
    assert crop.shape == (F.CROP_SIZE, F.CROP_SIZE, 3) and crop.dtype == np.uint8
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    # Eye line level.
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    assert abs(eye_left[1] - eye_right[1]) < 0.05
    # The landmarks' bounding box is the face square: longer side 224 / 1.6 = 140 px,
    # centred horizontally, raised by CROP_RAISE of its side.
    low, high = lm.min(0), lm.max(0)
    side = 224 / (1 + 2 * F.CROP_MARGIN)
    assert max(high - low) == pytest.approx(side, abs=1e-3)
    centre = (low + high) / 2
    assert centre[0] == pytest.approx(111.5, abs=1e-3)
    assert centre[1] == pytest.approx(111.5 + F.CROP_RAISE * side, abs=1e-3)
    box = F.aligned_face_box()
    assert (box[2] - box[0], box[3] - box[1]) == pytest.approx((side, side))
    assert ((low + high) / 2) == pytest.approx(
        ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), abs=1e-3
    )


def test_crop_landmarks_map_back_to_the_image(astronaut_face):
    matrix = F.crop_matrix(astronaut_face.landmarks)
    crop_lm = F.transform_points(astronaut_face.landmarks, matrix)
    back = F.transform_points(crop_lm, F.invert_matrix(matrix))
    np.testing.assert_allclose(back, astronaut_face.landmarks, atol=1e-3)
    # A similarity transform: distances scale by one factor.
    d_img = np.linalg.norm(
        astronaut_face.landmarks[:, None] - astronaut_face.landmarks[None], axis=-1
    )
    d_crop = np.linalg.norm(crop_lm[:, None] - crop_lm[None], axis=-1)
    ratio = d_crop[d_img > 10] / d_img[d_img > 10]
    assert ratio.std() < 1e-4 * ratio.mean()


@pytest.mark.parametrize("zoom", [1.0, 4.0])  # 4: face shrunk ~4x, through PIL's reduce()
def test_crop_pixels_match_scipy_resampling(astronaut_face, zoom):
    # A smooth random image; the crop must equal resampling at the inverse-mapped pixel
    # centres, computed here with scipy (linear, so compare loosely).
    rng = np.random.default_rng(0)
    h = w = int(512 * zoom)
    yy, xx = np.mgrid[0:h, 0:w] / zoom
    image = np.zeros((h, w, 3))
    for c in range(3):
        for fx, fy, phase in rng.uniform([-0.05, -0.05, 0], [0.05, 0.05, 6.3], (4, 3)):
            image[..., c] += np.sin(fx * xx + fy * yy + phase)
    image = ((image + 4) * 255 / 8).clip(0, 255).astype(np.uint8)
    landmarks = astronaut_face.landmarks * zoom + (zoom - 1) / 2  # same face, bigger picture
    crop, _ = F.align_face(image, landmarks)
    inverse = F.invert_matrix(F.crop_matrix(landmarks))
    ys, xs = np.mgrid[0:224, 0:224].astype(np.float64)
    src = np.stack([xs.ravel(), ys.ravel()], 1) @ inverse[:, :2].T + inverse[:, 2]
    reference = np.stack(
        [
            ndimage.map_coordinates(image[..., c].astype(float), [src[:, 1], src[:, 0]], order=1)
            for c in range(3)
        ],
        -1,
    ).reshape(224, 224, 3)
    # Only where the crop lies inside the picture (the rest is black).
    err = np.abs(crop.astype(float) - reference)[8:-8, 8:-8]
    assert err.mean() < 1.5 and np.percentile(err, 99) < 6


@pytest.mark.parametrize("zoom", [1.0, 4.0])
def test_crop_point_accuracy_subpixel(astronaut_face, zoom):
    # A single bright dot: its centroid in the crop lands where the matrix says.
    size = int(512 * zoom)
    dot = np.array([231.0, 140.0]) * zoom  # (x, y), near the face centre
    yy, xx = np.mgrid[0:size, 0:size]
    blob = np.exp(-((xx - dot[0]) ** 2 + (yy - dot[1]) ** 2) / (2 * (3.0 * zoom) ** 2))
    image = np.repeat((blob * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    landmarks = astronaut_face.landmarks * zoom + (zoom - 1) / 2
    crop, _ = F.align_face(image, landmarks)
    cy, cx = ndimage.center_of_mass(crop[..., 0].astype(float))
    expected = F.transform_points(dot[None], F.crop_matrix(landmarks))[0]
    assert np.hypot(cx - expected[0], cy - expected[1]) < 0.1


def test_aligned_crop_gives_back_its_landmarks(astronaut, astronaut_face):
    crop, lm = F.align_face(astronaut, astronaut_face)
    # Re-detecting works on the crop ...
    found = F.detect_faces(crop)
    assert len(found) == 1
    assert np.abs(found[0].landmarks - lm).mean() < 1.5
    # ... and so does fitting the shape predictor in the known face square.
    refit = F.fit_landmarks(crop, F.aligned_face_box())
    assert np.abs(refit - lm).mean() < 1.5


def test_extract_face_and_mean_landmarks(astronaut, hopper_path):
    crop_a, lm_a, _ = F.extract_face(astronaut)
    crop_h, lm_h, face_h = F.extract_face(hopper_path)
    assert crop_h.shape == (224, 224, 3) and face_h.box[0] > 0
    mean = F.mean_landmarks([lm_a, lm_h])
    np.testing.assert_allclose(mean, (lm_a.astype(np.float64) + lm_h) / 2, atol=1e-5)
    assert mean.shape == (68, 2) and mean.dtype == np.float32
    np.testing.assert_allclose(F.mean_landmarks(np.stack([lm_a] * 3)), lm_a, atol=1e-5)
    # Aligned faces of different people share the geometry: eyes within a few pixels.
    assert np.abs(lm_a[36:48] - lm_h[36:48]).mean() < 8
    with pytest.raises(ValueError):
        F.mean_landmarks([])
    with pytest.raises(ValueError):
        F.mean_landmarks([np.zeros((5, 2))])


def test_draw_landmarks(astronaut_face, astronaut):
    crop, lm = F.align_face(astronaut, astronaut_face)
    picture = F.draw_landmarks(crop, lm)
    assert picture.shape == (448, 448, 3) and picture.dtype == np.uint8
    x, y = np.round((lm[30] + 0.5) * 2 - 0.5).astype(int)  # nose tip is drawn in cyan
    assert tuple(picture[y, x]) == (0, 255, 255)


# ---------------------------------------------------------------------------- image formats


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_load_common_formats(tmp_path, astronaut, suffix):
    path = tmp_path / f"a.{suffix}"
    Image.fromarray(astronaut).save(path, quality=95)
    image = F.load_image(path)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    tolerance = 0 if suffix == "png" else 8
    assert np.abs(image.astype(int) - astronaut).mean() <= tolerance
    assert len(F.detect_faces(path)) == 1


def test_load_grayscale_rgba_and_16_bit(tmp_path, astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(
        F.load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, 2)
    )

    alpha = np.tile(np.linspace(0, 255, 512).round().astype(np.uint8), (512, 1))
    Image.fromarray(np.dstack([astronaut, alpha])).save(tmp_path / "rgba.png")
    expected = astronaut * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0)
    got = F.load_image(tmp_path / "rgba.png").astype(float)
    assert np.abs(got - expected).max() <= 0.5 + 1e-6

    deep = gray.astype(np.uint16) * 257 + 100  # full 16-bit range, not a multiple of 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    got = F.load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(
        got[..., 0], np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)
    )
    assert len(F.detect_faces(tmp_path / "deep.png")) == 1


@pytest.mark.parametrize("orientation,rotate", [(6, 1), (8, -1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, astronaut, orientation, rotate):
    # Store the pixels rotated, with the EXIF tag that tells viewers how to undo it.
    stored = np.ascontiguousarray(np.rot90(astronaut[:, :480], rotate))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(F.load_image(path), astronaut[:, :480])


def test_array_inputs(astronaut):
    np.testing.assert_array_equal(F.load_image(astronaut), astronaut)
    floats = astronaut / 255.0
    np.testing.assert_array_equal(F.load_image(floats), astronaut)
    np.testing.assert_array_equal(F.load_image(astronaut.astype(np.uint16) * 257), astronaut)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(F.load_image(rgba), astronaut)
    assert F.load_image(astronaut[..., 0]).shape == (512, 512, 3)
    with pytest.raises(ImageError, match="<array>"):
        F.load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        F.load_image(np.full((4, 4, 3), np.nan))
    # whose scale is not known: refused, not guessed (int64 of 0..255 read as 16-bit gave
    # a black image; floats of 0..255 clipped to white)
    with pytest.raises(ImageError, match="must be uint8 .0..255. or uint16 .0..65535., got "
                                         "int64"):
        F.load_image(astronaut.astype(np.int64))
    with pytest.raises(ImageError, match=r"float images must be in \[0, 1\], got values "
                                         r"from 0 to 255"):
        F.load_image(astronaut.astype(np.float32))


def _png_header_only(path, width, height):
    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("size", [(12_000, 9_000), (40_000, 40_000)])  # ours / PIL's limit
def test_decompression_bomb_refused(tmp_path, size):
    path = tmp_path / "bomb.png"
    _png_header_only(path, *size)
    with pytest.raises(ImageError, match=r"bomb\.png: image too large .*100,000,000"):
        F.load_image(path)


def test_transparent_pixels_are_composited_onto_white_band_by_band():
    """RGBA, made a band of rows at a time (memory), equals the float64 formula at once."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(3000, 700, 4), dtype=np.uint8)  # 3 bands
    alpha = rgba[..., 3:4] / 255.0
    expected = np.clip(np.rint(rgba[..., :3] * alpha + 255.0 * (1 - alpha)), 0, 255)
    got = F.load_image(rgba)
    assert got.dtype == np.uint8 and got.shape == (3000, 700, 3)
    # float32 against float64 may round a .5 the other way: at most one level, rarely
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_bad_files_are_image_errors(tmp_path, astronaut):
    with pytest.raises(ImageError, match="missing.jpg: no such file"):
        F.load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        F.load_image(tmp_path / "notes.jpg")
    Image.fromarray(astronaut).save(tmp_path / "full.jpg")
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ImageError, match="cut.jpg: cannot decode"):
        F.load_image(tmp_path / "cut.jpg")
    # A damaged file PIL cannot even identify is said to be of its kind, damaged, when
    # its first bytes are an image format's (a TIFF whose directory was cut off, a PNG
    # cut inside its header): not "not an image"
    Image.fromarray(astronaut).save(tmp_path / "full.tif", compression="tiff_lzw")
    raw_tiff = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw_tiff[: len(raw_tiff) // 2])
    with pytest.raises(ImageError, match=r"cut\.tif: a TIFF file PIL cannot read \(damaged"):
        F.load_image(tmp_path / "cut.tif")
    Image.fromarray(astronaut).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:12])
    with pytest.raises(ImageError, match=r"cut\.png: a PNG file PIL cannot read \(damaged"):
        F.load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="too large"):
        F.load_image(tmp_path / "full.jpg", max_pixels=1000)
    with pytest.raises(NoFaceError, match="cat.png"):
        Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
        F.largest_face(tmp_path / "cat.png")


# ---------------------------------------------------------------------------- command


def test_faces_command_end_to_end(tmp_path, astronaut, hopper_path, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.fromarray(astronaut).save(photos / "astronaut.png")
    Image.open(hopper_path).save(photos / "sub" / "hopper.jpg")
    Image.fromarray(data.chelsea()).save(photos / "cat.png")
    out = tmp_path / "out"
    assert cli.main(["faces", str(photos), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 processed, 1 skipped" in printed and "cat.png: no face found" in printed
    for stem in ["astronaut", "sub/hopper"]:
        crop = np.asarray(Image.open(out / f"{stem}.crop.png"))
        assert crop.shape == (224, 224, 3)
        assert np.asarray(Image.open(out / f"{stem}.landmarks.png")).shape == (448, 448, 3)
        lm = np.load(out / f"{stem}.landmarks.npy")
        assert lm.shape == (68, 2) and lm.dtype == np.float32
        feature = np.load(out / f"{stem}.feature.npy")
        assert feature.shape == (128,) and np.isfinite(feature).all()
    assert not list(out.glob("cat*"))  # nothing written for a skipped image
    assert not list(out.rglob(".*.tmp"))
    # The stored landmarks are the crop's own (the predictor finds them again).
    lm = np.load(out / "astronaut.landmarks.npy")
    crop = np.asarray(Image.open(out / "astronaut.crop.png"))
    assert np.abs(F.fit_landmarks(crop, F.aligned_face_box()) - lm).mean() < 1.5

    # Rerun after a kill that left hopper without its feature: only hopper is redone.
    (out / "sub" / "hopper.feature.npy").unlink()
    before = (out / "astronaut.crop.png").stat().st_mtime_ns
    assert cli.main(["faces", str(photos), "-o", str(out)]) == 0
    assert "1 processed, 1 skipped (1 done by an earlier run)" in capsys.readouterr().out
    assert (out / "sub" / "hopper.feature.npy").is_file()
    assert (out / "astronaut.crop.png").stat().st_mtime_ns == before
    # Other options: everything is made again.
    assert cli.main(["faces", str(photos), "-o", str(out), "--encoder", "none"]) == 0
    assert "2 processed, 1 skipped, written" in capsys.readouterr().out
    # ... and a file that option set does not make goes (the dlib feature stayed)
    assert not list(out.rglob("*.feature.npy"))
    # Other options for one image only, then for all: the other image is made again too
    # (its files were of the earlier options; the folder's options are per image).
    assert cli.main(["faces", str(photos / "astronaut.png"), "-o", str(out), "--encoder",
                     "none", "--size", "128"]) == 0
    capsys.readouterr()
    assert cli.main(["faces", str(photos), "-o", str(out), "--encoder", "none",
                     "--size", "128"]) == 0
    assert "1 processed, 1 skipped (1 done by an earlier run)" in capsys.readouterr().out
    for stem in ["astronaut", "sub/hopper"]:
        assert Image.open(out / f"{stem}.crop.png").size == (128, 128)
    # An image replaced since its files were made is made again.
    shutil.copy(photos / "sub" / "hopper.jpg", photos / "astronaut.png")  # PIL reads by content
    assert cli.main(["faces", str(photos), "-o", str(out), "--encoder", "none",
                     "--size", "128"]) == 0
    assert "1 processed, 1 skipped (1 done by an earlier run)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "astronaut.crop.png")),
                                  np.asarray(Image.open(out / "sub" / "hopper.crop.png")))
    # Replaced by an image without a face: its old files go with it (they stayed).
    shutil.copy(photos / "cat.png", photos / "astronaut.png")
    assert cli.main(["faces", str(photos), "-o", str(out), "--encoder", "none",
                     "--size", "128"]) == 0
    assert "astronaut.png: no face found" in capsys.readouterr().out
    assert not list(out.glob("astronaut*")) and (out / "sub" / "hopper.crop.png").is_file()


def test_find_images_keeps_names_apart(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/a.jpg", "d/a.png", "d/sub/b.webp", "d/notes.txt", "c.JPEG"]:
        (tmp_path / name).write_bytes(b"")
    found = F.find_images([tmp_path / "d", tmp_path / "c.JPEG"])
    assert [(p.name, str(stem)) for p, stem in found] == [
        ("a.jpg", "a_jpg"),
        ("a.png", "a_png"),
        ("b.webp", "sub/b"),
        ("c.JPEG", "c"),
    ]


@pytest.mark.parametrize("where", ["out", "."])
def test_faces_command_leaves_its_output_folder_out_of_the_inputs(tmp_path, hopper_path,
                                                                  capsys, where):
    """--out inside the folder given, or the folder itself: a rerun took the last run's
    crops as inputs and made hopper.crop.crop.png, a level deeper each time."""
    import shutil

    shutil.copy(hopper_path, tmp_path / "hopper.jpg")
    out = tmp_path / where
    for said in ("1 processed, 0 skipped", "0 processed, 0 skipped (1 done by an earlier run)"):
        assert cli.main(["faces", str(tmp_path), "-o", str(out), "--encoder", "none"]) == 0
        assert said in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                  and p.name != "hopper.jpg" and p.is_file()) == [
        "hopper.crop.png", "hopper.landmarks.npy", "hopper.landmarks.png"]


def test_faces_command_fails_when_nothing_processed(tmp_path, capsys):
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    out = tmp_path / "out"
    assert (
        cli.main(["faces", str(tmp_path / "cat.png"), "--out", str(out), "--encoder", "none"]) == 2
    )
    err = capsys.readouterr().err
    assert "cat.png: no face found" in err and "no image could be processed" in err
    assert not out.exists() or not any(out.iterdir())
    assert cli.main(["faces", str(tmp_path / "nothing.png"), "--out", str(out)]) == 2
    assert "nothing.png: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- descriptors


def test_batched_descriptors_equal_dlibs_one_face_calls(astronaut, astronaut_face, hopper_path):
    # Reference: dlib's single-face API, one call per crop, with the same shape predictor
    # box and chip padding; face_descriptors runs them all in one batched call.
    import dlib

    hopper = F.load_image(hopper_path)
    crop_a, _ = F.align_face(astronaut, astronaut_face)
    crop_h, _, _ = F.extract_face(hopper)
    crops = np.stack([crop_a, crop_h, crop_a[:, ::-1], np.roll(crop_h, 5, axis=1)])
    rect = dlib.rectangle(*(round(v) for v in F.aligned_face_box(F.CROP_SIZE)))
    reference = []
    for crop in crops:
        crop = np.ascontiguousarray(crop)
        shape = F.dlib_model("landmarks68")(crop, rect)
        reference.append(
            F.dlib_model("recognition").compute_face_descriptor(crop, shape, 0, F.DLIB_CHIP_PADDING)
        )
    batched = F.face_descriptors(crops)
    assert batched.shape == (4, 128) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, np.array(reference), atol=1e-5)
    assert np.linalg.norm(batched[0] - batched[1]) > 0.6  # two people: a real difference
    assert F.face_descriptors(crops[:0]).shape == (0, 128)
    with pytest.raises(ValueError, match="square"):
        F.face_descriptors(crops[:, :200])


@pytest.mark.parametrize("option, words", [
    ({"min_score": float("nan")}, "min_score must be a finite number"),
    ({"max_side": 0}, "max_side must be a whole number"),
    ({"max_side": -5}, "max_side must be a whole number"),
    ({"max_side": None}, "max_side must be a whole number"),
])
def test_detection_options_that_find_nothing_by_construction_are_refused(astronaut, option,
                                                                           words):
    """They returned no face, and extract_face then said "no face found"."""
    with pytest.raises(ValueError, match=words):
        F.detect_faces(astronaut, **option)


def test_damaged_metadata_warnings_stay_off_stderr(tmp_path, astronaut, capfd):
    """PIL warned "Corrupt EXIF data" on stderr through Python's warnings; the image's
    pixels decide whether it is read."""
    import warnings

    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(astronaut).save(path, exif=b"Exif\0\0II*\0" + b"\xff" * 40)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # as a fresh process shows a warning once
        image = F.load_image(path)
    assert image.shape == astronaut.shape
    assert [str(w.message) for w in said] == [] and capfd.readouterr().err == ""


def test_a_tiff_whose_compressed_data_libtiff_cannot_decode_is_refused_quietly(
        tmp_path, astronaut, capfd):
    """libtiff said "JPEGLib: Unsupported marker type 0x5a." on stderr for a damaged
    JPEG-in-TIFF strip, and PIL returned the pixels it had (the detector then found no
    face) or said "decoder error -2": now one ImageError naming the file and libtiff's
    complaint, nothing on stderr; an intact JPEG-in-TIFF reads as PIL decodes it."""
    for size, (start, stop) in ((216, (1 / 4, 1 / 3)), (512, (1 / 4, 1 / 2))):
        path = tmp_path / f"whole{size}.tif"
        Image.fromarray(np.ascontiguousarray(astronaut[:size, :size])).save(
            path, compression="jpeg")
        raw = bytearray(path.read_bytes())
        for i in range(int(len(raw) * start), int(len(raw) * stop), 7):  # in the strip
            raw[i] ^= 0x5A
        (tmp_path / "damaged.tif").write_bytes(bytes(raw))
        with pytest.raises(ImageError, match=r"damaged\.tif: damaged TIFF image data "
                                             r"\(libtiff: JPEGLib: "):
            F.load_image(tmp_path / "damaged.tif")
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(F.load_image(path), expected)
        assert capfd.readouterr().err == ""


def test_images_load_where_stderr_is_closed(tmp_path, astronaut):
    """With file descriptor 2 closed (``2>&-``; sys.stderr is then None, and the image
    file opened takes descriptor 2) a TIFF loads as anywhere else: catching libtiff's
    complaints must not need a stderr, nor take the image's descriptor for one."""
    import os
    import subprocess
    import sys

    path = tmp_path / "whole.tif"
    Image.fromarray(astronaut).save(path, compression="jpeg")
    code = ("from speech2face import faces; "
            f"print(faces.load_image({str(path)!r}).shape)")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          preexec_fn=lambda: os.close(2), check=False)
    assert done.returncode == 0 and done.stdout.strip() == str(astronaut.shape)


def test_tiffs_loaded_from_threads_leave_stderr_where_it_was(tmp_path, astronaut):
    """Each TIFF load points descriptor 2 at a temporary file for a moment: loads from
    several threads at once must each get their own image and leave descriptor 2 the
    file it was."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for k in range(4):
        path = tmp_path / f"{k}.tif"
        Image.fromarray(np.ascontiguousarray(np.roll(astronaut, 40 * k, axis=1))).save(
            path, compression="tiff_lzw")
        paths.append(path)
    before = os.fstat(2)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(F.load_image, paths * 8))
    for k, image in enumerate(loaded):
        np.testing.assert_array_equal(image, np.roll(astronaut, 40 * (k % 4), axis=1))
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
