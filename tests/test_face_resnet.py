"""speech2face.face_resnet: dlib's face ResNet in numpy, against dlib's own implementation.

The reference is dlib itself (``face_recognition_model_v1.compute_face_descriptor`` on the
same 150 x 150 chips). Chips of random noise and of smooth random images exercise every
channel and every residual path, not only what faces activate; the face path is checked
in tests/test_faces.py (``face_descriptors`` against dlib's one-face calls).
"""

from __future__ import annotations

import numpy as np
import pytest

from speech2face import face_resnet as R
from speech2face import faces as F
from speech2face.errors import WeightsError

MODEL = R.MODEL_FILE


@pytest.fixture(scope="module")
def weights_bytes() -> bytes:
    return (F.model_dir() / MODEL).read_bytes()


def _chips(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count // 2, R.CHIP_SIZE, R.CHIP_SIZE, 3))
    # Smooth images: a low-resolution random image upsampled (blocks of 15 px).
    smooth = rng.integers(0, 256, (count - count // 2, 10, 10, 3)).repeat(15, 1).repeat(15, 2)
    return np.concatenate([noise, smooth]).astype(np.uint8)


def test_descriptors_equal_dlibs_on_the_same_chips():
    chips = _chips(6, seed=0)
    recognition = F.dlib_model("recognition")
    reference = np.array([recognition.compute_face_descriptor(np.ascontiguousarray(c))
                          for c in chips])
    ours = R.face_resnet()(chips)
    assert ours.shape == (6, 128) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # The chips differ: so do their descriptors (the comparison above is not vacuous).
    assert np.linalg.norm(reference[0] - reference[-1]) > 0.1
    # A chip's descriptor does not depend on the chips computed with it, to the bit.
    one_by_one = np.concatenate([R.face_resnet()(c[None]) for c in chips[::-1]])[::-1]
    np.testing.assert_array_equal(ours, one_by_one)
    assert R.face_resnet()(chips[:0]).shape == (0, 128)


def test_bad_chips():
    with pytest.raises(ValueError, match="expected uint8 chips"):
        R.face_resnet()(np.zeros((1, 149, 150, 3), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 chips"):
        R.face_resnet()(np.zeros((1, 150, 150, 3), np.float32))


def _flip_filter_count(data: bytes) -> bytes:
    """The first convolution's filter count (32) written as 31."""
    start = data.index(b"con_4") + len(b"con_4")
    reader = R._Reader(data, start)
    reader.tensor()
    position = reader.position  # the filter count: 0x01 0x20
    assert data[position:position + 2] == b"\x01\x20"
    return data[:position] + b"\x01\x1f" + data[position + 2:]


def _per_value_affine(data: bytes) -> bytes:
    """The first affine layer's mode (per channel, 0) written as per value (1)."""
    reader = R._Reader(data, data.index(b"affine_") + len(b"affine_"))
    reader.tensor(), reader.alias(), reader.alias()
    position = reader.position  # the mode: 0x01 0x00
    assert data[position:position + 2] == b"\x01\x00"
    return data[:position] + b"\x01\x01" + data[position + 2:]


def _nan_weight(data: bytes) -> bytes:
    """A NaN in the first convolution's weights."""
    reader = R._Reader(data, data.index(b"con_4") + len(b"con_4"))
    reader.integer(), [reader.integer() for _ in range(4)]  # tensor version, shape
    return data[:reader.position] + np.float32(np.nan).tobytes() + data[reader.position + 4:]


@pytest.mark.parametrize("damage, problem", [
    (lambda d: d[: len(d) // 2], "not dlib_face_recognition_resnet_model_v1"),
    (lambda d: d[:20], "not dlib_face_recognition_resnet_model_v1"),
    (lambda d: b"", "not dlib's face recognition network"),
    (lambda d: b"\x00" * 100, "not dlib's face recognition network"),
    (_flip_filter_count, "layer 0 is not the expected 7x7/2 convolution"),
    (_per_value_affine, "layer 0 is not the expected 7x7/2 convolution"),
    (_nan_weight, "NaN or infinite"),
])
def test_damaged_weights_are_refused_with_one_line(tmp_path, weights_bytes, damage, problem):
    path = tmp_path / MODEL
    path.write_bytes(damage(weights_bytes))
    with pytest.raises(WeightsError, match=problem) as error:
        R.load_face_resnet(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="cannot be read"):
        R.load_face_resnet(tmp_path / "missing.dat")
    # Another dlib network of the same package (the CNN face detector).
    with pytest.raises(WeightsError, match="not dlib's face recognition network"):
        R.load_face_resnet(F.model_dir() / "mmod_human_face_detector.dat")
